"""The payoff study's names: where the data are, the study's settings and budgets, a finished run's record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = REPO.parent / "shared" / "data" / "cifar10"
# The ST++ the payoff plan trains, as the study names it: lambda 5, plain KL, cosine_up, the 5k study's pick
# (docs/results.md 2) and the CIFAR ST++ recipes' setting until section 2b moved them to lambda 2.
PAYOFF_ST_SETTING = "stpp_l5_kl_cosine_up"
CT_SETTING = "ct"
# The networks trained from scratch, by the study's setting names (the payoff plan's other depths).
SCRATCH = {"ResNet-20": "ct", "ResNet-14": "ct_r14", "ResNet-8": "ct_r8"}
# FLOPs budgets: shares of the ResNet-20 at 32 px, or a from-scratch network's FLOPs at 32 px by its name (ResNet-14:
# 65.3 %, so that the ResNet-14 itself is within its budget).
BUDGETS = "0.10,0.25,0.50,ResNet-14,1.00"
SCRATCH_LABEL = "from scratch"


def finished(folder: Path) -> dict[str, Any] | None:
    """The study's ``result.json`` of a finished run, or None."""
    path = folder / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def cost_fields(result: dict[str, Any]) -> dict[str, Any]:
    """A training's cost as the study recorded it."""
    return {key: result.get(key) for key in ("train_minutes", "wall_minutes", "images_per_second")}
