"""``bench/subnet_payoff.py``: one seed end to end on tiny models and data (search, exports, report, cache)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from types import ModuleType

import torch
from conftest import REPO_ROOT

from stim_hf.data.builtin_datasets import load_builtin_dataset
from stim_hf.method.batchnorm import batchnorm_layers
from stim_hf.models.cifar_resnet import CifarResNetConfig, CifarResNetForImageClassification

SCORED = re.compile(r"^  (CT|ST\+\+) [\d,]+ @\d+: test top-1 ", re.MULTILINE)


def load_payoff() -> ModuleType:
    """The benchmark script as a module."""
    spec = importlib.util.spec_from_file_location("subnet_payoff", REPO_ROOT / "bench" / "subnet_payoff.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def save_run(folder, depth: int, full_top1: float, seed: int) -> None:
    """A finished study run: a tiny CIFAR ResNet with random weights and statistics, and its result.json."""
    torch.manual_seed(seed)
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=depth, widths=[4, 8, 8], num_labels=10))
    with torch.no_grad():
        for layer in batchnorm_layers(model):
            layer.running_var.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    (folder / "result.json").write_text(json.dumps({"full_top1": full_top1}))


def test_one_seed_end_to_end_with_its_cache_and_a_seed_not_finished(tmp_path, capsys):
    payoff = load_payoff()
    digits = load_builtin_dataset("sklearn:digits")["train"].shuffle(seed=0)
    data = tmp_path / "data"
    data.mkdir()
    digits.select(range(400)).to_parquet(str(data / "train.parquet"))
    digits.select(range(400, 480)).to_parquet(str(data / "test.parquet"))
    save_run(tmp_path / "study" / "ct_seed1", 20, 70.0, seed=1)
    save_run(tmp_path / "study" / "stpp_l1_kl-_step0_seed1", 20, 71.0, seed=2)
    save_run(tmp_path / "baseline" / "ct_seed1", 14, 72.0, seed=3)
    report = tmp_path / "report"
    argv = ["--study", str(tmp_path / "study"), "--baseline", str(tmp_path / "baseline"), "--seeds", "1,2"]
    argv += ["--report-dir", str(report), "--data-dir", str(data), "--input-sizes", "16,32"]
    argv += [
        "--holdout-samples",
        "128",
        "--search-recalibrate-bn",
        "64",
        "--recalibrate-bn",
        "32",
        "--test-samples",
        "64",
    ]
    assert payoff.main(argv) == 0
    out = capsys.readouterr().out
    assert "seed 2: not all of its runs have finished; skipped" in out
    assert SCORED.search(out)  # a line per sub-network scored on the test split
    [record] = json.loads((report / "results.json").read_text())
    # A ResNet-14 is ResNet-20's [2, 2, 2] sub-network at full size: the budget is that sub-network's FLOPs.
    assert record["baseline_flops"] < record["full_flops"]
    for label in ("CT", "ST++"):
        result = record["checkpoints"][label]
        shape = result["shape_222_at_32"]
        assert abs(shape["flop_share"] - record["budget_flop_share"]) < 1e-3
        assert result["pick"]["flop_share"] <= record["budget_flop_share"] + 1e-6
        assert result["front"] and all(0 <= f["test_top1"] <= 100 for f in result["front"])
        shares = [f["flop_share"] for f in result["front"]]
        assert shares == sorted(shares)
    assert record["baseline_test_top1"] == 72.0 and record["checkpoints"]["ST++"]["full_test_top1"] == 71.0
    text = (report / "results.md").read_text()
    assert "| 1 |" in text and "128 held-out training images" in text
    assert (report / "payoff.png").stat().st_size > 0
    assert (report / "seed1" / "search" / "pareto.json").is_file()
    # Run again: the seed comes from its cache, nothing is searched or exported again.
    assert payoff.main(argv) == 0
    assert not SCORED.search(capsys.readouterr().out)
    assert json.loads((report / "results.json").read_text()) == [record]
