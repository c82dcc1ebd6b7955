"""Additive steering vectors, the baseline beside the gates: ``h <- h + alpha * v`` at a residual-stream or sub-layer site.

- :mod:`~ipg_lightning.vectors.additive`: :class:`SteeringVectors`, one vector per site, attached like gates;
- :mod:`~ipg_lightning.vectors.files`: saving and loading them (safetensors, with their model and provenance);
- :mod:`~ipg_lightning.vectors.folding`: folding them into projection biases at export.

They sit just above the model layer (gates, engines and exports use them); where vectors come from
(contrasts of the model's own trajectories, SAE decoder directions) needs sampling and rewards, and
lives in :mod:`ipg_lightning.steering.vector_sources`.
"""

from ipg_lightning.vectors.additive import VECTOR_FAMILIES, SteeringVectors
from ipg_lightning.vectors.files import load_vectors, save_vectors

__all__ = ["VECTOR_FAMILIES", "SteeringVectors", "load_vectors", "save_vectors"]
