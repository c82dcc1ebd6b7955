"""Train a tiny reasoning model from scratch with Lightning, and save it as a plain HF checkpoint.

The model learns the built-in arithmetic task's chain-of-thought solutions (``4 + 1 = 5``, ...,
``#### 15``), some of them with "Wait, let me check" re-computations, so that both accuracy and
reasoning length have room to move when components are steered. The tokenizer is the character-level
one of :mod:`ipg_lightning.zoo.tiny` with a chat template that shows the model only the question.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ipg_lightning.checks import check_at_least
from ipg_lightning.data import ArithmeticChainTask, ReasoningBatch, ReasoningDataModule
from ipg_lightning.evaluation import evaluate_generations
from ipg_lightning.metrics import ReasoningAccuracy
from ipg_lightning.outputs import atomic_directory, atomic_write_json, atomic_write_text
from ipg_lightning.rollout.sampling import sample_trajectories
from ipg_lightning.rollout.scoring import mean_completion_nll
from ipg_lightning.rollout.trajectories import SamplingConfig, teacher_forced_trajectories
from ipg_lightning.task import ReasoningTask
from ipg_lightning.zoo.tiny import tiny_tokenizer

#: The task the shipped reasoner was trained on (recipes/train_tiny_reasoner.yaml uses the same values).
#: Splits deal one seeded stream test-first, so any data module over this task with the same seed
#: gives test and validation problems the model never saw in training.
TINY_REASONER_TASK = ArithmeticChainTask(min_steps=1, max_steps=4, max_operand=9, reflection_probability=0.25, seed=0)
#: The shipped checkpoints are package data, so a clone, an editable install and a wheel all have them.
SHIPPED_CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
#: The shipped reasoner (recipes/train_tiny_reasoner.yaml); model name ``tiny-reasoner`` (:data:`~ipg_lightning.model.loading.MODEL_DIRECTORIES`).
TINY_REASONER_PATH = str(SHIPPED_CHECKPOINTS / "tiny-reasoner")
#: The shipped reasoner after policy-gradient fine-tuning (recipes/steer_tiny_reasoner_rl.yaml, merged); model name ``tiny-reasoner-rl``.
TINY_REASONER_RL_PATH = str(SHIPPED_CHECKPOINTS / "tiny-reasoner-rl")
#: The shipped TopK SAE on the reasoner's residual stream after block 2 (recipes/train_tiny_sae.yaml).
TINY_REASONER_SAE_PATH = str(SHIPPED_CHECKPOINTS / "tiny-reasoner-sae")

#: The reasoner sees "Q: <question>\nA:" (the instruction of the prompt template is dropped).
REASONER_CHAT_TEMPLATE = "Q: {{ messages[-1]['content'].split('\n\n')[-1] }}\nA:"


def reasoner_tokenizer():
    """The character-level tokenizer with the reasoner's question-only chat template."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = REASONER_CHAT_TEMPLATE
    return tokenizer


class ReasonerTraining(ReasoningTask):
    """Next-token training of a small causal LM on reference solutions (loss on solution tokens only).

    Args:
        family: architecture (``llama`` or ``qwen2``).
        hidden_size: model width.
        num_layers: decoder blocks.
        num_heads: attention heads.
        intermediate_size: MLP width.
        learning_rate: peak AdamW learning rate.
        warmup_steps: linear warm-up steps before cosine decay.
        weight_decay: AdamW weight decay.
        eval_max_new_tokens: generation cap for validation accuracy.
        seed: weight initialisation seed.
    """

    def __init__(
        self,
        family: str = "llama",
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        intermediate_size: int = 384,
        learning_rate: float = 3e-3,
        warmup_steps: int = 100,
        weight_decay: float = 0.01,
        eval_max_new_tokens: int = 160,
        seed: int = 0,
    ) -> None:
        super().__init__(model_path=None)
        if family not in ("llama", "qwen2"):
            raise ValueError(f"family must be 'llama' or 'qwen2', got {family!r}")
        check_at_least(
            1,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            eval_max_new_tokens=eval_max_new_tokens,
        )
        check_at_least(0, warmup_steps=warmup_steps)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        if not (learning_rate > 0 and weight_decay >= 0):
            raise ValueError(f"learning_rate must be > 0 and weight_decay >= 0, got {learning_rate} and {weight_decay}")
        self.save_plain_hyperparameters()
        tokenizer = reasoner_tokenizer()
        config = AutoConfig.for_model(
            family,
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.attach_model(model, tokenizer, freeze=False)
        self.lm.train()
        self.val_accuracy = ReasoningAccuracy()

    def training_step(self, batch: ReasoningBatch, batch_idx: int) -> torch.Tensor:
        """Mean negative log-likelihood of the solution tokens (and EOS)."""
        trajectories = teacher_forced_trajectories(self.tokenizer, batch["prompt"], batch["solution"])
        loss = mean_completion_nll(self.lm, trajectories)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        return loss

    def validation_step(self, batch: ReasoningBatch, batch_idx: int) -> None:
        """Greedy accuracy on held-out problems."""
        sampling = SamplingConfig.greedy(self.hparams.eval_max_new_tokens, batch_size=len(batch["prompt"]))
        trajectories = sample_trajectories(self.lm, self.tokenizer, batch["prompt"], sampling, batch["seed"].tolist())
        self.val_accuracy.update(trajectories.completions, batch["answer"])
        self.log("val/accuracy", self.val_accuracy, prog_bar=True, batch_size=len(batch["prompt"]))

    def configure_optimizers(self):
        """AdamW with linear warm-up and cosine decay over the whole run."""
        optimizer = torch.optim.AdamW(self.lm.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay, betas=(0.9, 0.98))
        total = max(self.trainer.estimated_stepping_batches, self.hparams.warmup_steps + 1)
        warmup = self.hparams.warmup_steps

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), "interval": "step"}}


def model_card(metrics: dict[str, Any], settings: dict[str, Any], command: str, parameters: int, size_mb: float) -> str:
    """The README of the shipped checkpoint: task, size, training command, seed and measured figures."""
    return f"""# tiny-reasoner

A {parameters / 1e6:.2f} M-parameter {settings["family"]} causal LM ({settings["num_layers"]} blocks, width
{settings["hidden_size"]}, {settings["num_heads"]} heads, MLP {settings["intermediate_size"]}; {size_mb:.1f} MB of float32
weights) trained from scratch by ipg_lightning's own Lightning recipe to solve multi-step arithmetic
with chain-of-thought, ending in a GSM8K-style `#### <answer>` line. It exists so that the project's
main job and tests have a real reasoner whose accuracy and reasoning length can move.

- Task: `ipg_lightning.data.ArithmeticChainTask` ({settings["task"]}); some solution steps are followed by a
  "Wait, let me check: ..." re-computation, so reasoning length varies.
- Prompt: the tokenizer's chat template shows the model `Q: <question>\\nA:`.
- Tokenizer: character-level `tokenizers` tokenizer (100 tokens), saved here.
- Training: `{command}` (seed {settings["seed"]}), {settings["wall_time_min"]:.1f} min on 2 CPU cores.

## Measured on {metrics["num_completions"]} held-out problems (greedy decoding)

| accuracy | answer rate | mean reasoning length (tokens) | median | reflection rate |
| --- | --- | --- | --- | --- |
| {metrics["accuracy"]:.3f} | {metrics["answer_rate"]:.3f} | {metrics["reasoning_length_mean"]:.1f} \
| {metrics["reasoning_length_q50"]:.0f} | {metrics["reflection_rate"]:.3f} |

Load it with `AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)`.
"""


def save_reasoner(
    module: ReasonerTraining, output_dir: str | Path, metrics: dict[str, Any], settings: dict[str, Any], command: str, overwrite: bool = False
) -> Path:
    """Write the trained model, tokenizer, metrics and model card atomically."""
    parameters = sum(p.numel() for p in module.lm.parameters())
    size_mb = parameters * 4 / 2**20
    with atomic_directory(output_dir, overwrite=overwrite, kind="tiny reasoner checkpoint") as staging:
        module.lm.save_pretrained(staging, safe_serialization=True)
        module.tokenizer.save_pretrained(staging)
        atomic_write_json(staging / "metrics.json", {"held_out": metrics, "training": settings})
        atomic_write_text(staging / "README.md", model_card(metrics, settings, command, parameters, size_mb))
    return Path(output_dir)


def measure_and_save_reasoner(
    module: ReasonerTraining,
    data: ReasoningDataModule,
    output_dir: str | Path,
    started: float,
    command: str,
    epochs: int,
    eval_examples: int = 256,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Measure a trained reasoner greedily on held-out test problems and save it with its model card.

    Args:
        module: the trained module.
        data: its data module (the test split is never trained on).
        output_dir: where the checkpoint goes (atomically).
        started: ``time.perf_counter()`` when training started, for the card's wall time.
        command: the command that trained it, for the card.
        epochs: epochs trained.
        eval_examples: held-out problems measured (rounded to whole batches).
        overwrite: replace an earlier output of this library at ``output_dir``.

    Returns the held-out metrics.
    """
    module.eval()
    sampling = SamplingConfig.greedy(module.hparams.eval_max_new_tokens, batch_size=64)
    batches = list(data.test_dataloader())[: max(1, eval_examples // data.batch_size)]
    metrics = evaluate_generations(module.lm, module.tokenizer, batches, sampling, progress=True, description="held-out").metrics
    task = data.synthetic_task
    settings = {
        **module.plain_hparams(),
        "task": f"steps {task.min_steps}-{task.max_steps}, operands 1-{task.max_operand}, "
        f"operations {' '.join(task.operations)}, reflection probability {task.reflection_probability}",
        "train_examples": len(data.examples["train"]),
        "epochs": epochs,
        "wall_time_min": (time.perf_counter() - started) / 60,
    }
    save_reasoner(module, output_dir, metrics, settings, command, overwrite=overwrite)
    return {**metrics, "wall_time_min": settings["wall_time_min"]}
