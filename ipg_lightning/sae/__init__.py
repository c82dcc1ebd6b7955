"""Sparse autoencoders: reading and writing their file formats, splicing them into models, training them.

After :func:`attach_sae` an SAE's features are ``sae_feature`` sites (named like
``blocks.3.hook_resid_post.sae[17]``) for attribution, steering and export.
"""

from ipg_lightning.model.autoencoder import SparseAutoencoder, attached_saes
from ipg_lightning.sae.attach import attach_sae, attach_saes, detach_saes
from ipg_lightning.sae.formats import load_sae, save_sae

#: How a report names an SAE that was attached in memory and never saved.
IN_MEMORY_SAE = "in-memory SAE"

__all__ = ["IN_MEMORY_SAE", "SparseAutoencoder", "attach_sae", "attach_saes", "attached_saes", "detach_saes", "load_sae", "save_sae"]
