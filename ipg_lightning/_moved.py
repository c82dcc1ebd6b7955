"""Old module paths of version 0.1, kept importable with a ``DeprecationWarning`` until 0.3.

Version 0.2 grouped the modules into ``attribution/``, ``steering/`` and ``cli/``. Importing an old
path (``ipg_lightning.report``) gives the new module (``ipg_lightning.attribution.report``) and says
where it went. Names that moved to another module than their old one's successor are listed in
``CHANGELOG.md``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: Old module path -> new module path.
MOVED_MODULES = {
    "ipg_lightning.report": "ipg_lightning.attribution.report",
    "ipg_lightning.plots": "ipg_lightning.attribution.plots",
    "ipg_lightning.estimator": "ipg_lightning.attribution.estimator",
    "ipg_lightning.activations": "ipg_lightning.attribution.activations",
    "ipg_lightning.learned": "ipg_lightning.steering.learned",
    "ipg_lightning.export": "ipg_lightning.steering.export",
    "ipg_lightning.commands": "ipg_lightning.cli.commands",
    "ipg_lightning.demo": "ipg_lightning.cli.demo",
    "ipg_lightning.cli_errors": "ipg_lightning.cli.errors",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and loads it as the module it moved to, with a warning."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102 (importlib protocol)
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):  # noqa: D102 (importlib protocol)
        return None  # a placeholder module, replaced in exec_module

    def exec_module(self, module):  # noqa: D102 (importlib protocol)
        new = MOVED_MODULES[module.__name__]
        warnings.warn(f"{module.__name__} moved to {new} in ipg_lightning 0.2; import it from there", DeprecationWarning, stacklevel=2)
        # The import system returns whatever sys.modules holds once exec_module is done.
        sys.modules[module.__name__] = importlib.import_module(new)


def install_moved_module_aliases() -> None:
    """Make the old module paths importable (once per process)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
