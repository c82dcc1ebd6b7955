"""Additive steering vectors, the baseline beside the gates: ``h <- h + alpha * v`` at a residual-stream or sub-layer site.

- :mod:`~ipg_lightning.vectors.additive`: :class:`SteeringVectors`, one vector per site, attached like gates;
- :mod:`~ipg_lightning.vectors.sources`: vectors from contrasts of the model's own trajectories, and SAE decoder directions;
- :mod:`~ipg_lightning.vectors.files`: saving and loading them (safetensors, with their model and provenance).
"""

from ipg_lightning.vectors.additive import VECTOR_FAMILIES, SteeringVectors
from ipg_lightning.vectors.files import load_vectors, save_vectors
from ipg_lightning.vectors.sources import contrast_vectors, sae_direction_vectors

__all__ = ["VECTOR_FAMILIES", "SteeringVectors", "contrast_vectors", "load_vectors", "sae_direction_vectors", "save_vectors"]
