"""The module paths from before the subpackages, still importable, with a ``DeprecationWarning``.

``import stim_hf.trainer`` gives the module :mod:`stim_hf.training.trainer` itself (the same object,
so the same classes and functions, and monkeypatching either name patches both) and warns once, naming
the new path. Old packages carry their submodules: ``stim_hf.subnets.sampling`` is
:mod:`stim_hf.method.sampling`, ``stim_hf.search.run`` is :mod:`stim_hf.tools.search.run`.

The aliases are an import hook instead of one shim file per old path so that no file stays at a
moved path: git then sees each move as a rename and carries edits made elsewhere to the old path
over to the new one when branches merge.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

#: Old module path -> new module path. ``stim_hf.data`` and ``stim_hf.cli`` are packages now, at the
#: same path, re-exporting what the old modules offered.
MOVED_MODULES: dict[str, str] = {
    "stim_hf.batchnorm": "stim_hf.method.batchnorm",
    "stim_hf.losses": "stim_hf.method.losses",
    "stim_hf.subnets": "stim_hf.method",
    "stim_hf.builtin_datasets": "stim_hf.data.builtin_datasets",
    "stim_hf.transforms": "stim_hf.data.transforms",
    "stim_hf.predecoded": "stim_hf.data.predecoded",
    "stim_hf.device_color": "stim_hf.data.device_color",
    "stim_hf.device_augmentation": "stim_hf.data.device_augmentation",
    "stim_hf.evaluation": "stim_hf.analysis.evaluation",
    "stim_hf.flops": "stim_hf.analysis.flops",
    "stim_hf.costs": "stim_hf.analysis.costs",
    "stim_hf.scoring": "stim_hf.analysis.scoring",
    "stim_hf.pareto": "stim_hf.analysis.pareto",
    "stim_hf.plotting": "stim_hf.analysis.plotting",
    "stim_hf.config": "stim_hf.training.config",
    "stim_hf.trainer": "stim_hf.training.trainer",
    "stim_hf.reliable_trainer": "stim_hf.training.reliable_trainer",
    "stim_hf.checkpointing": "stim_hf.training.checkpointing",
    "stim_hf.callbacks": "stim_hf.training.callbacks",
    "stim_hf.collapse": "stim_hf.training.collapse",
    "stim_hf.model_walks": "stim_hf.training.model_walks",
    "stim_hf.optimizers": "stim_hf.training.optimizers",
    "stim_hf.pace": "stim_hf.training.pace",
    "stim_hf.profiling": "stim_hf.training.profiling",
    "stim_hf.modeling": "stim_hf.training.modeling",
    "stim_hf.metrics": "stim_hf.training.metrics",
    "stim_hf.parser": "stim_hf.training.parser",
    "stim_hf.loafing": "stim_hf.tools.loafing",
    "stim_hf.export": "stim_hf.tools.export",
    "stim_hf.search": "stim_hf.tools.search",
    "stim_hf.train": "stim_hf.cli.train",
}


def new_module_path(old: str) -> str | None:
    """The current path of the module that was at ``old`` (submodules of moved packages included), or None."""
    if old in MOVED_MODULES:
        return MOVED_MODULES[old]
    package, _, rest = old.rpartition(".")
    while package:
        if package in MOVED_MODULES:
            return f"{MOVED_MODULES[package]}.{old[len(package) + 1 :]}"
        package, _, _ = package.rpartition(".")
    return None


class _MovedModuleLoader(importlib.abc.Loader):
    """Loads an old path as the module at its new path, warning once."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # a placeholder; exec_module puts the real module in its place

    def exec_module(self, module: ModuleType) -> None:
        old = module.__name__
        warnings.warn(
            f"{old} moved to {self.new}; import it from there ({old} will be removed)",
            DeprecationWarning,
            stacklevel=2,
        )
        # The import system returns what sys.modules holds under the old name once this returns:
        # the module at the new path, not the placeholder.
        sys.modules[old] = importlib.import_module(self.new)


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old module paths of :data:`MOVED_MODULES` (before the file system, which has none)."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = new_module_path(fullname) if fullname.startswith("stim_hf.") else None
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedModuleLoader(new))


def install() -> None:
    """Put :class:`MovedModuleFinder` first on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
