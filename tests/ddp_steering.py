"""Run by tests/test_steering_ddp.py: learned gates (and weight slices) with N CPU processes (Lightning's ddp launcher)."""

import sys

import torch
from ddp_trainer import ddp_trainer

from ipg_lightning.data import PromptTemplate, ReasoningDataModule
from ipg_lightning.rollout.trajectories import SamplingConfig
from ipg_lightning.steering import ComponentSelection
from ipg_lightning.steering.learned import GateSteering

if __name__ == "__main__":
    devices, output, fine_tune = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    selection = ComponentSelection(components=("blocks.1.mlp.hook_post[3]", "blocks.0.attn.hook_z[1]", "blocks.1.hook_attn_out"))
    module = GateSteering(
        selection=selection,
        model_path="tiny:llama",
        reward="ipg_lightning.rewards:answer_present",
        sampling=SamplingConfig(max_new_tokens=8, num_samples=4, temperature=1.0, top_p=1.0),
        learning_rate=0.1,
        weight_slices=fine_tune == "weight_slices",
    )
    # Every optimisation step sees all 4 prompts: 1 process x batch 4, or 2 processes x batch 2.
    data = ReasoningDataModule(num_train=4, num_val=2, num_test=2, batch_size=4 // devices, template=PromptTemplate(use_chat_template=False))
    trainer = ddp_trainer(devices, max_epochs=3, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    if trainer.is_global_zero:
        torch.save(module.trainable_state(), output)
