"""The package layout holds: imports go one way between the subpackages, and the old module paths still work."""

import ast
import importlib
import importlib.util
import re
import sys
import warnings
from pathlib import Path

import pytest

from stim_hf._moved import MOVED_MODULES

PACKAGE = Path(__file__).resolve().parents[1] / "stim_hf"

# Bottom to top (docs/architecture.md, "Package map"): a module imports only from its own layer or below.
LAYERS = (
    ("stim_hf.errors", "stim_hf._moved"),
    ("stim_hf.models",),
    ("stim_hf.method",),
    ("stim_hf.data",),
    ("stim_hf.analysis",),
    ("stim_hf.training",),
    ("stim_hf.tools",),
    ("stim_hf.cli",),
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer: add its subpackage to LAYERS and to docs/architecture.md")


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(imported stim_hf module, line) of every import in ``tree``: module level, in functions, under TYPE_CHECKING."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("stim_hf")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "stim_hf":  # from stim_hf import models: the submodules named
                found += [(f"stim_hf.{alias.name}", node.lineno) for alias in node.names]
            elif name.startswith("stim_hf."):
                found.append((name, node.lineno))
    return found


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "metric_modules" not in p.parts)


def test_every_module_is_in_a_layer():
    for path in _sources():
        module = _module_name(path)
        if module != "stim_hf":
            _layer(module)


def test_imports_point_down_the_layers():
    upward = []
    for path in _sources():
        module = _module_name(path)
        if module == "stim_hf":  # the public API re-exports from every layer
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for imported, line in _imports(tree, module, path.name == "__init__.py"):
            if imported == "stim_hf":
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports the top-level stim_hf package")
            elif imported in MOVED_MODULES or any(imported.startswith(old + ".") for old in MOVED_MODULES):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports the old path {imported}")
            elif _layer(imported) > _layer(module):
                upward.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {module} imports {imported} (a higher layer)"
                )
    assert not upward, "\n".join(upward)


def test_module_level_imports_have_no_cycles():
    graph = {}
    for path in _sources():
        module = _module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        # What runs at import: the module body's imports (and those in its try blocks), not those in
        # functions (deferred) or under ``if TYPE_CHECKING:`` (never run).
        body = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom, ast.Try))]
        top = ast.Module(body=body, type_ignores=[])
        graph[module] = {name for name, _ in _imports(top, module, path.name == "__init__.py") if name != module}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == 2 or module not in graph:
            return
        assert state.get(module) != 1, "import cycle: " + " -> ".join([*trail[trail.index(module) :], module])
        state[module] = 1
        for imported in sorted(graph[module]):
            visit(imported, [*trail, module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])


@pytest.mark.parametrize("old", [*sorted(MOVED_MODULES), "stim_hf.subnets.sampling", "stim_hf.search.run"])
def test_old_module_path_warns_and_is_the_new_module(old):
    from stim_hf._moved import new_module_path

    new = new_module_path(old)
    expected = importlib.import_module(new)
    for name in [name for name in sys.modules if name == old or name.startswith(old + ".")]:
        del sys.modules[name]
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is expected
    public = [name for name in vars(expected) if not name.startswith("_")]
    assert public and all(getattr(module, name) is getattr(expected, name) for name in public)


def test_old_import_statements_still_work():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from stim_hf.batchnorm import recalibrate_batchnorm
        from stim_hf.export import export_subnet
        from stim_hf.trainer import StimulativeTrainer
    from stim_hf import StimulativeTrainer as public_trainer
    from stim_hf.data import DataArguments, image_datasets, load_image_datasets  # a package now, at the same path
    from stim_hf.method import batchnorm
    from stim_hf.tools import export

    assert StimulativeTrainer is public_trainer
    assert recalibrate_batchnorm is batchnorm.recalibrate_batchnorm and export_subnet is export.export_subnet
    assert DataArguments is image_datasets.DataArguments and load_image_datasets is image_datasets.load_image_datasets


def test_public_api():
    import stim_hf

    for name in stim_hf.__all__:
        assert getattr(stim_hf, name) is not None
    assert callable(importlib.import_module("stim_hf.cli").main)


def test_the_training_step_figure_draws(tmp_path):
    """docs/figures/training_step.py, which draws docs/figures/training_step.png for docs/architecture.md, runs."""
    path = PACKAGE.parent / "docs" / "figures" / "training_step.py"
    spec = importlib.util.spec_from_file_location("training_step_figure", path)
    figure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figure)
    output = figure.draw(tmp_path / "training_step.png")
    assert output.stat().st_size > 10_000
    owners = " ".join(owner for _, owner, _ in figure.STEPS) + " ".join(owner for _, _, owner, _ in figure.AROUND)
    named = re.findall(r"\b((?:data|method|training|analysis|tools|cli)/\w+\.py)", owners)
    assert len(named) >= 10
    for name in named:
        assert (PACKAGE / name).is_file(), f"the figure names {name}, which does not exist"


SCRIPTS = sorted((PACKAGE.parent / "bench").rglob("*.py")) + sorted((PACKAGE.parent / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_scripts_import_only_what_the_package_has(script):
    """Every ``stim_hf`` name a benchmark or script imports, at module level or inside a function, exists: a
    renamed or removed function breaks the script when it runs, hours into a study, not when it is imported."""
    tree = ast.parse(script.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("stim_hf"):
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stim_hf"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                has = hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}") is not None
                assert has, f"{script.name}:{node.lineno} imports {alias.name} from {node.module}, which has none"
