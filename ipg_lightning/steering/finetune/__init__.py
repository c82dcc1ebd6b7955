"""What learned steering trains besides the gates, placed from the selected components.

- :mod:`~ipg_lightning.steering.finetune.fine_tune`: :class:`FineTune`, where the fine-tune sits;
- :mod:`~ipg_lightning.steering.finetune.lora`: a PEFT LoRA adapter;
- :mod:`~ipg_lightning.steering.finetune.placement`: which weights host the selected components;
- :mod:`~ipg_lightning.steering.finetune.slices`: training only the slices of weights they own.
"""
