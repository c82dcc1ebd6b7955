"""The ``ipg`` commands that are LightningCLIs: ``attribute``, ``steer``, ``train-reasoner`` and ``train-sae``.

Each parses a LightningModule, :class:`~ipg_lightning.data.ReasoningDataModule` and a ``Trainer``
from a recipe and the command line (``--config recipe.yaml``, ``--model.steps 16``,
``--data.source ...``, ``--trainer.devices 2``), runs one Trainer entry point, and prints what the
user reads next. Their docstrings are their ``--help``.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from ipg_lightning.outputs import check_output_dir

#: Trainer defaults of the commands that train (a CSV logger, one epoch).
FIT_TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "outputs/steer"}},
    "max_epochs": 1,
}
#: Trainer defaults of ``ipg attribute``.
ATTRIBUTION_TRAINER_DEFAULTS = {
    "inference_mode": False,  # gate gradients inside validation (see ipg_lightning.attribution.module)
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
}


class CommandCLI(LightningCLI):
    """A LightningCLI that never runs on its own and adds a command's extra options.

    Args:
        extra_arguments: ``{name: (type, default, help)}`` added as top-level options.
    """

    def __init__(self, *args: Any, extra_arguments: dict[str, tuple[Any, Any, str]] | None = None, **kwargs: Any) -> None:
        self.extra_arguments = extra_arguments or {}
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        """Add the command's extra options."""
        for name, (kind, default, help_text) in self.extra_arguments.items():
            parser.add_argument(f"--{name}", type=kind, default=default, help=help_text)


def lightning_cli(module_class: type, args: list[str], command: str, help_text: str, **kwargs: Any) -> CommandCLI:
    """Parse ``args`` into ``module_class``, the data module and a Trainer (nothing runs yet)."""
    from ipg_lightning.data import ReasoningDataModule

    with warnings.catch_warnings():  # `args` is how this CLI hands over its own arguments, as intended
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        return CommandCLI(
            module_class,
            ReasoningDataModule,
            run=False,
            args=args,
            parser_kwargs={"prog": f"ipg {command}", "description": help_text, "exit_on_error": False},
            **kwargs,
        )


def parse_attribute(args: list[str]) -> CommandCLI:
    """The parsed ``ipg attribute`` command (model, data and Trainer built; nothing run, no weights loaded)."""
    from ipg_lightning.attribution import IPGAttribution

    return lightning_cli(
        IPGAttribution,
        args,
        "attribute",
        attribute.__doc__,
        trainer_defaults=ATTRIBUTION_TRAINER_DEFAULTS,
        save_config_callback=None,
        auto_configure_optimizers=False,
    )


def attribute(args: list[str]) -> None:
    """Run IPG attribution (or a baseline method) and write the report to ``--model.output_dir``."""
    cli = parse_attribute(args)
    if cli.model.hparams.output_dir is None:  # from Python a report may stay in memory; from the command line it would be lost
        raise ValueError("--model.output_dir is not set (null): the report would be computed and then lost; give a directory")
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    if cli.trainer.is_global_zero:
        print(cli.model.report.summary(cli.model.hparams.output_dir))


def parse_steer(args: list[str]) -> CommandCLI:
    """The parsed ``ipg steer`` command, with ``--ckpt_path`` to resume an interrupted run."""
    from ipg_lightning.steering.learned import GateSteering

    resume = {"ckpt_path": (str | None, None, "Resume training from this checkpoint.")}
    return lightning_cli(
        GateSteering,
        args,
        "steer",
        steer.__doc__,
        trainer_defaults=FIT_TRAINER_DEFAULTS,
        extra_arguments=resume,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
    )


def steer(args: list[str]) -> None:
    """Train the gates of selected components (and optionally a LoRA adapter or their weight slices, and steering vectors) with ``Trainer.fit``."""
    from ipg_lightning.steering.checkpoint import check_resume_settings, read_steering_checkpoint

    cli = parse_steer(args)
    resumed_at = None
    if cli.config.ckpt_path is not None and Path(cli.config.ckpt_path).exists():  # not "last", "best", ...
        checkpoint = read_steering_checkpoint(cli.config.ckpt_path)  # a damaged or foreign file is named before any work
        check_resume_settings(checkpoint["hyper_parameters"], dict(cli.model.hparams))
        resumed_at = checkpoint.get("global_step")
    # weights_only: a checkpoint to resume from is read without unpickling code.
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path, weights_only=True)
    if not cli.trainer.is_global_zero:
        return
    if resumed_at is not None and cli.trainer.global_step == resumed_at:
        print(
            f"nothing was trained: {cli.config.ckpt_path} had already reached this run's end (step {resumed_at}, "
            f"max_epochs {cli.trainer.max_epochs}, max_steps {cli.trainer.max_steps}); raise --trainer.max_epochs to train further"
        )
        return
    checkpoint = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else None
    model = cli.model
    if model.hparams.train_gates and model.gates is not None:
        print(f"trained gates: { {name: round(value, 4) for name, value in model.gate_values().items()} }")
    if model.vectors is not None:
        print(f"trained steering vectors (norm): { {name: round(value, 4) for name, value in model.vectors.norms().items()} }")
    if model.fine_tune.adapter is not None:
        print(f"trained LoRA ({model.lora.placement}) on: {', '.join(model.fine_tune.adapter.paths)}")
    if model.fine_tune.slices:
        print(f"trained weight slices of: {', '.join(model.fine_tune.sliced_modules())}")
    print(f"checkpoint (only what trained): {checkpoint}; logs: {cli.trainer.log_dir}")


def parse_train_reasoner(args: list[str]) -> CommandCLI:
    """The parsed ``ipg train-reasoner`` command, with where the finished model goes."""
    from ipg_lightning.zoo.reasoner import ReasonerTraining

    outputs = {
        "output_dir": (str, "ipg_lightning/zoo/checkpoints/tiny-reasoner", "Where the model is saved."),
        "overwrite": (bool, False, "Replace an existing output_dir."),
        "eval_examples": (int, 256, "Held-out problems measured for the model card."),
    }
    return lightning_cli(
        ReasonerTraining,
        args,
        "train-reasoner",
        train_reasoner.__doc__,
        trainer_defaults=FIT_TRAINER_DEFAULTS,
        extra_arguments=outputs,
        save_config_kwargs={"overwrite": True},
    )


def train_reasoner(args: list[str]) -> None:
    """Train the tiny reasoning model from scratch, measure it on held-out problems, save it with a card."""
    from ipg_lightning.zoo.reasoner import measure_and_save_reasoner

    started = time.perf_counter()
    cli = parse_train_reasoner(args)
    check_output_dir(cli.config.output_dir, cli.config.overwrite)  # before training, not after
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if not cli.trainer.is_global_zero:
        return
    metrics = measure_and_save_reasoner(
        cli.model,
        cli.datamodule,
        cli.config.output_dir,
        started,
        "ipg train-reasoner " + " ".join(args),
        epochs=cli.trainer.current_epoch,
        eval_examples=cli.config.eval_examples,
        overwrite=cli.config.overwrite,
    )
    print(json.dumps(metrics, indent=2))
    print(f"saved to {cli.config.output_dir} ({metrics['wall_time_min']:.1f} min)")


def parse_train_sae(args: list[str]) -> CommandCLI:
    """The parsed ``ipg train-sae`` command, with where the finished SAE goes."""
    from ipg_lightning.sae.training import SAETraining

    outputs = {
        "output_dir": (str, "outputs/sae", "Where the SAE is saved (SAELens layout, with a card)."),
        "overwrite": (bool, False, "Replace an existing output_dir."),
    }
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "outputs/train_sae"}}
    return lightning_cli(
        SAETraining,
        args,
        "train-sae",
        train_sae.__doc__,
        trainer_defaults={**FIT_TRAINER_DEFAULTS, "logger": logger},
        extra_arguments=outputs,
        save_config_kwargs={"overwrite": True},
    )


def train_sae(args: list[str]) -> None:
    """Train a TopK sparse autoencoder on one site's activations, measure it, and save it in the SAELens layout."""
    from ipg_lightning.sae import save_sae

    started = time.perf_counter()
    cli = parse_train_sae(args)
    check_output_dir(cli.config.output_dir, cli.config.overwrite)  # before training, not after
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (measured,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    if not cli.trainer.is_global_zero:
        return
    metrics = {key.removeprefix("val/"): round(float(value), 5) for key, value in measured.items()}
    cli.model.check_sae_trained(metrics)
    card = {**cli.model.card(metrics), "wall_time_min": round((time.perf_counter() - started) / 60, 2), "command": "ipg train-sae " + " ".join(args)}
    save_sae(cli.model.sae, cli.config.output_dir, card=card, model_name=cli.model.model_path, overwrite=cli.config.overwrite)
    print(json.dumps(card["metrics"], indent=2))
    for warning in card["warnings"]:
        print(f"warning: {warning}")
    print(f"saved to {cli.config.output_dir} ({card['wall_time_min']:.1f} min)")
