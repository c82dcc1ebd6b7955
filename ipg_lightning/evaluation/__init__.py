"""Evaluating reasoning benchmarks: protocols, generation with metrics, and lm-evaluation-harness.

- :mod:`~ipg_lightning.evaluation.protocols`: named protocols (greedy at a token budget, sampled
  with k samples per problem) and the record of the full protocol that goes with every number;
- :mod:`~ipg_lightning.evaluation.generations`: sample completions (gated or not) and measure them;
- :mod:`~ipg_lightning.evaluation.lm_eval_model`: an lm-eval model whose forward and generate run
  with the gates attached.
"""

from ipg_lightning.evaluation.generations import EvaluationResult, evaluate_generations
from ipg_lightning.evaluation.protocols import PROTOCOLS, Protocol, apply_protocol, protocol_record

__all__ = ["PROTOCOLS", "EvaluationResult", "Protocol", "apply_protocol", "evaluate_generations", "protocol_record"]
