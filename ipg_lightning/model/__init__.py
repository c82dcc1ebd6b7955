"""The model's anatomy: loading, the site families, where components live, SAEs spliced in.

- :mod:`~ipg_lightning.model.loading`: plain loads of a model and tokenizer, and the alias registry;
- :mod:`~ipg_lightning.model.families`: the one table of site families, and decoder layouts;
- :mod:`~ipg_lightning.model.discovery` and :mod:`~ipg_lightning.model.experts`: finding a decoder's
  blocks, projections and fused experts;
- :mod:`~ipg_lightning.model.sites`: :class:`Site` and :func:`discover_sites`;
- :mod:`~ipg_lightning.model.hooks`: the one way a hook is placed on a site;
- :mod:`~ipg_lightning.model.autoencoder` and :mod:`~ipg_lightning.model.sae_splice`: sparse autoencoders
  and splicing them in;
- :mod:`~ipg_lightning.model.identity`: which model a report, checkpoint or export was made on.
"""
