"""Multiplicative gates on components: attaching them, folding them into weights, reading an export.

- :mod:`~ipg_lightning.gates.component_gates`: :class:`ComponentGates`, one gate vector per site (1 = untouched);
- :mod:`~ipg_lightning.gates.folding`: folding gates into the weights they scale;
- :mod:`~ipg_lightning.gates.exported`: :func:`load_steered`, reading what ``ipg export`` writes.
"""
