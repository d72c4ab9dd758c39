#!/usr/bin/env bash
# The oldest versions pyproject.toml claims, checked: a fresh virtual environment with every dependency (and every
# package of the "dev" extra) at the floor its ">=" names, then the test suite in it (docs/compatibility.md).
#
#   bash scripts/check_dependency_floors.sh                            # the whole suite (python -m pytest -q)
#   bash scripts/check_dependency_floors.sh tests/test_trainer.py -x   # other pytest arguments
#
# FLOORS_VENV: where the environment goes (default: $TMPDIR or /tmp, stim_hf_floors); it is rebuilt every run,
# unless FLOORS_REUSE=1 and it is there already. FLOORS_PYTHON: the interpreter it is made from (default: python).
# Not at their floors: torchcodec (optional, "fast-decode"; each release is built for one torch release, and the
# floor's torch takes none of those the extra allows: not installed, PIL decodes) and ruff (not used by the tests).
# Everything else pip chooses (the dependencies' own dependencies) is the newest release that fits.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${FLOORS_VENV:-${TMPDIR:-/tmp}/stim_hf_floors}
PYTHON=${FLOORS_PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1

if [ "${FLOORS_REUSE:-0}" != 1 ] || [ ! -x "$VENV/bin/python" ]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # "name>=X" of [project] dependencies and the dev extra, as "name==X" (constraints) plus the dev names to install.
  "$VENV/bin/python" - "$VENV" <<'EOF'
import re
import sys
import tomllib
from pathlib import Path

LEFT_AT_NEWEST = {"torchcodec", "ruff"}
project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
floors, dev = [], []
for group, requirements in (("main", project["dependencies"]), ("dev", project["optional-dependencies"]["dev"])):
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
        floor = re.search(r">=\s*([^,;\s]+)", requirement)
        if floor is None:
            sys.exit(f"{requirement!r} in pyproject.toml names no floor (>=): give it one")
        if name in LEFT_AT_NEWEST:
            continue
        floors.append(f"{name}=={floor.group(1)}")
        if group == "dev":
            dev.append(name)
venv = Path(sys.argv[1])
(venv / "floors.txt").write_text("\n".join(floors) + "\n")
(venv / "dev.txt").write_text("\n".join(dev) + "\n")
EOF
  echo "floors: $(tr '\n' ' ' <"$VENV/floors.txt")"
  # -c: every direct dependency at its floor; --no-deps for the project itself would hide a missing one.
  "$VENV/bin/python" -m pip install --quiet -c "$VENV/floors.txt" -e . -r "$VENV/dev.txt"
fi

"$VENV/bin/python" -m pip list --format=freeze 2>/dev/null \
  | grep -iE '^(torch|torchvision|transformers|accelerate|datasets|evaluate|huggingface.hub|safetensors|numpy|timm)=='
if [ "$#" -eq 0 ]; then
  set -- -q
fi
# The interpreter of the environment; PYTHONPATH would let another checkout's stim_hf in.
env -u PYTHONPATH "$VENV/bin/python" -m pytest "$@"
