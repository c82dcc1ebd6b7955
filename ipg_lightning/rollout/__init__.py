"""Rollouts: sampling trajectories from the model, and scoring them under teacher forcing.

- :mod:`~ipg_lightning.rollout.trajectories`: :class:`Trajectories` and :class:`SamplingConfig`;
- :mod:`~ipg_lightning.rollout.sampling`: :func:`sample_trajectories` on either engine (HF ``generate`` here), each completion from its own seed;
- :mod:`~ipg_lightning.rollout.vllm_engine`, :mod:`~ipg_lightning.rollout.vllm_gates`, :mod:`~ipg_lightning.rollout.vllm_weights`:
  the vLLM engine, the model's gates mirrored inside it, and the check that it runs the model's weights;
- :mod:`~ipg_lightning.rollout.scoring`: log-probabilities of generated tokens and the policy-gradient surrogate;
- :mod:`~ipg_lightning.rollout.passes`: how teacher-forced passes are chunked, replayed and checkpointed.
"""
