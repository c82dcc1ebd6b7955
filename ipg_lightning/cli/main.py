"""The ``ipg`` command line: which command runs, and how a failure is shown.

``attribute``, ``steer``, ``train-reasoner`` and ``train-sae`` are LightningCLIs
(:mod:`~ipg_lightning.cli.lightning_commands`); ``demo``, ``evaluate``, ``explore``, ``export`` and
``prepare-smollm2`` are typed functions whose docstrings are their ``--help``
(:mod:`~ipg_lightning.cli.commands`, :mod:`~ipg_lightning.cli.demo`, :mod:`~ipg_lightning.explorer`).
``explore`` takes the report directory as a positional argument.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from jsonargparse import CLI, ArgumentError

from ipg_lightning.cli.commands import evaluate, export, prepare_smollm2
from ipg_lightning.cli.demo import demo
from ipg_lightning.cli.errors import DEBUG_ENV, error_message
from ipg_lightning.cli.lightning_commands import attribute, steer, train_reasoner, train_sae
from ipg_lightning.explorer import explore

LIGHTNING_COMMANDS = {"attribute": attribute, "steer": steer, "train-reasoner": train_reasoner, "train-sae": train_sae}
FUNCTION_COMMANDS = {"demo": demo, "evaluate": evaluate, "explore": explore, "export": export, "prepare-smollm2": prepare_smollm2}
#: Function commands whose required arguments are positional (``ipg explore REPORT_DIR``).
POSITIONAL_COMMANDS = {"explore": explore}


def run(args: list[str]) -> None:
    """Run one ``ipg`` command; errors propagate as exceptions (for Python callers and tests)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args and args[0] in LIGHTNING_COMMANDS:
        LIGHTNING_COMMANDS[args[0]](args[1:])
        return
    if args and args[0] in POSITIONAL_COMMANDS:
        CLI(POSITIONAL_COMMANDS[args[0]], args=args[1:], as_positional=True, exit_on_error=False, prog=f"ipg {args[0]}")
        return
    CLI({**LIGHTNING_COMMANDS, **FUNCTION_COMMANDS}, args=args, as_positional=False, exit_on_error=False)


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
        sys.exit(2 if isinstance(error, ArgumentError) else 1)


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
