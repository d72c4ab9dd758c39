"""``bench/pick_margin.py``: the payoff study's ST++ picks at several pick margins, on tiny models and data."""

from __future__ import annotations

import json
import sys

from conftest import REPO_ROOT
from test_subnet_payoff import digits_data, save_run

sys.path.insert(0, str(REPO_ROOT / "bench"))
import pick_margin  # noqa: E402
import subnet_payoff  # noqa: E402


def test_margin_zero_reproduces_the_payoff_picks_and_a_wide_margin_takes_the_cheapest(tmp_path, capsys):
    data = digits_data(tmp_path)
    study = tmp_path / "study"
    for i, (name, depth) in enumerate([("ct", 20), ("stpp_l5_kl_cosine_up", 20), ("ct_r14", 14), ("ct_r8", 8)]):
        save_run(study / f"{name}_seed1", depth, 70.0, seed=i + 1)
    shared = ["--study", str(study), "--seeds", "1", "--data-dir", str(data), "--input-sizes", "16,32"]
    shared += ["--holdout-samples", "96", "--search-recalibrate-bn", "64", "--recalibrate-bn", "32"]
    payoff_report = tmp_path / "payoff"
    budgets = ["--budgets", "0.25,ResNet-14,1.0"]
    argv = ["--front", "32px", *shared, *budgets, "--report-dir", str(payoff_report), "--test-samples", "64"]
    assert subnet_payoff.main(argv) == 0
    capsys.readouterr()

    report = tmp_path / "margins"
    argv = [*shared, *budgets, "--test-samples", "64", "--margins", "0,1e6", "--report-dir", str(report)]
    assert pick_margin.main([*argv, "--payoff-report", str(payoff_report)]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out  # margin 0 picked what the payoff benchmark picked, at every budget
    [record] = json.loads((report / "results.json").read_text())
    recorded = json.loads((payoff_report / "seed1" / "payoff.json").read_text())["budgets"]
    assert [round(b["budget"], 4) for b in record["budgets"]] == [b["budget"] for b in recorded]
    for ours, theirs in zip(record["budgets"], recorded, strict=True):
        exact, wide = ours["picks"]["0"], ours["picks"]["1e+06"]
        assert exact["test_top1"] == theirs["picks"]["ST++"]["test_top1"]
        # A margin nothing reaches: the cheapest candidate within the budget (the 1,1,1 at 16 px).
        assert (wide["depths"], wide["input_size"]) == ([1, 1, 1], 16) and wide["flops"] <= exact["flops"]
    text = (report / "results.md").read_text()
    assert "| 25 % | 0 |" in text and "(ResNet-14) | 1e+06 |" in text

    # A pick that differs from the payoff benchmark's is reported, not hidden.
    payoff_json = payoff_report / "seed1" / "payoff.json"
    changed = json.loads(payoff_json.read_text())
    changed["budgets"][0]["picks"]["ST++"]["input_size"] = 99
    payoff_json.write_text(json.dumps(changed))
    assert pick_margin.main([*argv, "--payoff-report", str(payoff_report)]) == 0
    assert "warning: seed 1, budget 0.25: margin 0 picked" in capsys.readouterr().out
