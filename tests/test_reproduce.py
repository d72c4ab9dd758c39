"""Smoke test of ``bench/reproduce_cifar10.py``: tiny CT and ST++ runs, then the JSON / Markdown outputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from conftest import CIFAR10_DIR, REPO_ROOT

pytestmark = pytest.mark.skipif(
    not (CIFAR10_DIR / "train.parquet").is_file(), reason="shared CIFAR-10 parquet files not present"
)

RUN_FIELDS = {
    "run",
    "method",
    "seed",
    "full_accuracy",
    "subnet_accuracy_mean",
    "subnet_accuracy_mean_bn_recalibrated",
    "loafing_gap",
    "loafing_gap_bn_recalibrated",
    "wall_s",
    "images_per_s",
}


def load_script() -> ModuleType:
    """``bench/reproduce_cifar10.py`` as a module (run in-process: one interpreter start less)."""
    spec = importlib.util.spec_from_file_location("reproduce_cifar10", REPO_ROOT / "bench" / "reproduce_cifar10.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduce_cifar10_smoke(tmp_path: Path) -> None:
    """Depth 14, 64 images, 1 epoch, seed 1, CT and ST++: every output is written with its fields."""
    out = tmp_path / "study"
    argv = [
        *("--depth", "14", "--train-samples", "64", "--eval-samples", "64", "--epochs", "1"),
        *("--seeds", "1", "--methods", "ct,stpp", "--batch-size", "32", "--num-subnets", "3"),
        *("--recalibrate-bn", "32", "--device", "cpu", "--out", str(out)),
    ]
    returned = load_script().main(argv)

    results = json.loads((out / "results.json").read_text())
    assert returned["table"] == results["table"]
    assert results["command"].startswith("python bench/reproduce_cifar10.py --depth 14")
    assert {"command", "machine", "args", "num_eval_images", "records", "table"} <= set(results)
    assert results["num_eval_images"] == 64
    assert "CPU" in results["machine"]
    runs = results["table"]["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("CT", 1), ("ST++", 1)]
    for run in runs:
        assert set(run) >= RUN_FIELDS
        for key in ("full_accuracy", "subnet_accuracy_mean", "subnet_accuracy_mean_bn_recalibrated"):
            assert 0.0 <= run[key] <= 1.0
        assert run["wall_s"] > 0 and run["images_per_s"] > 0
    assert [m["method"] for m in results["table"]["methods"]] == ["CT", "ST++"]
    assert all(m["seeds"] == [1] for m in results["table"]["methods"])

    markdown = (out / "results.md").read_text()
    for text in ("| method |", "full top-1 %", "sub-net mean %, BN re-est.", "images/s", "| ct_seed1 |", "ST++"):
        assert text in markdown
    for name in ("loafing.json", "loafing.csv", "loafing.png"):
        assert (out / "analysis" / name).is_file()
    assert (out / "ct_seed1" / "model.safetensors").is_file()
