"""Run by tests/test_attribution_ddp.py: attribution with N CPU processes (Lightning's ddp launcher)."""

import sys

from ddp_trainer import ddp_trainer

from ipg_lightning.attribution import IPGAttribution
from ipg_lightning.data import PromptTemplate, ReasoningDataModule
from ipg_lightning.rollout.trajectories import SamplingConfig

if __name__ == "__main__":
    devices, output_dir = int(sys.argv[1]), sys.argv[2]
    module = IPGAttribution(
        model_path="tiny:llama",
        families=["attn_head", "mlp_neuron"],
        layers=[0],
        steps=3,
        sampling=SamplingConfig(num_samples=4, temperature=1.0, top_p=1.0, max_new_tokens=8),
        reward="ipg_lightning.rewards:answer_present",
        keep_trajectories=True,
        output_dir=output_dir,
    )
    data = ReasoningDataModule(num_train=0, num_val=6, num_test=0, batch_size=1, template=PromptTemplate(use_chat_template=False))
    trainer = ddp_trainer(devices, inference_mode=False)
    trainer.validate(module, datamodule=data, verbose=False)
