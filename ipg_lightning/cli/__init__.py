"""The ``ipg`` command line: a thin layer over the library.

- :mod:`~ipg_lightning.cli.main`: :func:`main` (the console script) and :func:`run` (for Python callers);
- :mod:`~ipg_lightning.cli.lightning_commands`: ``attribute``, ``steer``, ``train-reasoner`` (LightningCLIs);
- :mod:`~ipg_lightning.cli.commands`: ``evaluate``, ``export``, ``prepare-smollm2`` (typed functions);
- :mod:`~ipg_lightning.cli.demo`: ``ipg demo``, the main job: its arguments, checked before anything heavy
  loads, then its stages (:mod:`~ipg_lightning.cli.demo_stages`);
- :mod:`~ipg_lightning.cli.errors`: one-line error messages.
"""

from ipg_lightning.cli.main import main, run

__all__ = ["main", "run"]
