"""The README and docs/ stay consistent with the code: links resolve, the test command is CI's, the package map is whole."""

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    REPO_ROOT / "README.md",
    REPO_ROOT / "bench" / "README.md",
    *sorted((REPO_ROOT / "docs").glob("*.md")),
    *sorted((REPO_ROOT / "docs" / "measurements").glob("**/README.md")),  # the studies' logs and the records' index
]


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO_ROOT)} -> {target}")
    assert not broken, "\n".join(broken)


def test_readme_test_command_is_the_one_ci_runs():
    readme = (REPO_ROOT / "README.md").read_text()
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    command = "python -m pytest -q"
    assert f'```bash\npip install -e ".[dev]"\n{command}\n```' in readme
    assert re.search(rf"^{re.escape(command)}$", ci, flags=re.MULTILINE)


def test_readme_names_the_five_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    for command in ("stim-hf train ", "stim-hf loafing ", "stim-hf export ", "stim-hf search ", "accelerate launch "):
        assert command in readme, command


def test_the_package_map_names_every_subpackage():
    architecture = (REPO_ROOT / "docs" / "architecture.md").read_text()
    packages = sorted(p.parent.name for p in (REPO_ROOT / "stim_hf").glob("*/__init__.py"))
    assert packages == ["analysis", "cli", "data", "method", "models", "tools", "training"]
    for package in packages:
        assert f"`stim_hf.{package}`" in architecture, package
    for module in (REPO_ROOT / "stim_hf").glob("*/*.py"):
        if module.name != "__init__.py" and module.parent.name != "models":
            assert f"`{module.name}`" in architecture, f"docs/architecture.md's package map leaves out {module}"
