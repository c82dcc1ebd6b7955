"""The ``ipg`` command line: each subcommand is a typed function, its docstring is its ``--help``."""

from __future__ import annotations

import os
import sys

from ipg_lightning.demo import demo

COMMANDS = {"demo": demo}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``ipg`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from jsonargparse import CLI

    CLI(COMMANDS, args=sys.argv[1:] if args is None else args, as_positional=False)


if __name__ == "__main__":
    main()
