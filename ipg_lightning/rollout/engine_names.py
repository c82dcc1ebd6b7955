"""The names of the engines that sample completions, importable without torch (the commands check them first).

``hf`` is Hugging Face ``generate`` (:mod:`~ipg_lightning.rollout.sampling`); ``vllm`` is a vLLM
engine (:mod:`~ipg_lightning.rollout.vllm_engine`).
"""

from typing import Literal

#: The engines that sample completions.
Engine = Literal["hf", "vllm"]
