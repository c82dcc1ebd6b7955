"""Run by tests/test_sae_training.py: SAE training with N CPU processes (Lightning's ddp launcher)."""

import sys

import torch
from ddp_trainer import ddp_trainer

from ipg_lightning.data import PromptTemplate, ReasoningDataModule
from ipg_lightning.sae.training import SAETraining

if __name__ == "__main__":
    devices, output = int(sys.argv[1]), sys.argv[2]
    module = SAETraining(model_path="tiny:llama", hook_name="blocks.1.hook_resid_post", expansion=4, k=4, learning_rate=0.01, dead_after_tokens=50)
    data = ReasoningDataModule(num_train=16, num_val=4, num_test=0, batch_size=8 // devices, template=PromptTemplate(use_chat_template=False))
    trainer = ddp_trainer(devices, max_epochs=3, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    state = {key: value for key, value in module.sae.state_dict().items()}
    torch.save({**state, "input_scale": torch.tensor(module.sae.input_scale)}, f"{output}.{trainer.global_rank}")
