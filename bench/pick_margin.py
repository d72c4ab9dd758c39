"""What ``stim-hf search --pick-margin`` buys: cheaper picks, for how much test accuracy.

  # after bench/subnet_payoff.py has searched and scored the payoff study's seeds
  python bench/pick_margin.py --study ~/stim_hf_study/payoff

Per seed of the payoff study (``bench/full_network_study.py --plan payoff``), its ST++ ResNet-20 (lambda 5) is searched
exactly as ``bench/subnet_payoff.py`` searches it: every prefix sub-network at each of ``--input-sizes``, BatchNorm
re-estimated on ``--search-recalibrate-bn`` training images, scored on the seed's ``--holdout-samples`` held-out
training images (the payoff study's ``heldout_seed*.parquet``, never the test split). At each of ``--budgets`` the
pick is then taken at each of ``--margins`` with the search's own rule
(:func:`stim_hf.tools.search.pick_candidate`: margin 0 is the most accurate candidate; margin m the one with
the fewest FLOPs among those the most accurate does not beat by more than m paired standard errors). Every pick is
exported (BatchNorm re-estimated on ``--recalibrate-bn`` training images) and scored on the whole test split, as
the payoff benchmark scores its picks; margin 0 reproduces its ST++ picks, which is checked.

Writes ``results.json`` and ``results.md`` (per budget and margin, over seeds: the pick's FLOPs share and test top-1,
and the paired test difference to margin 0) to ``--report-dir`` (default ``docs/measurements/pick_margin``). Test
scores are kept in the study folder (``pick_margin_scores_seed*.json``): a rerun exports only new picks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_name, "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
# bench/subnet_payoff.py's held-out images, search and test scoring, reused as they are
from payoff.scoring import TestScores, heldout_file, search  # noqa: E402
from payoff.study import BUDGETS, PAYOFF_ST_SETTING, finished  # noqa: E402
from payoff.tables import budget_text, mean_std, paired_t, pick_text  # noqa: E402

MARGINS = "0,1,2,3"
# Budgets named by a network: the FLOPs of the ResNet-20's sub-network of that depth at the full input size (the
# payoff benchmark's "ResNet-14" budget is that network's FLOPs, which its 2,2,2 sub-network matches exactly).
NAMED_DEPTHS = {"ResNet-8": (1, 1, 1), "ResNet-14": (2, 2, 2)}


def margins_for_seed(seed: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """Search one seed's ST++ checkpoint and score its pick at every budget and margin; None if it has not
    finished."""
    from stim_hf.tools.search import pick_candidate

    folder = args.study / f"{args.st_setting}_seed{seed}"
    result = finished(folder)
    if result is None:
        return None
    start = time.perf_counter()
    heldout = heldout_file(seed, result.get("train_samples"), args)
    with tempfile.TemporaryDirectory() as out:
        (searched,) = search({"ST++": folder}, "full", Path(out), heldout, args).checkpoints
    search_seconds = round(time.perf_counter() - start, 1)
    score = TestScores(args, args.study / f"pick_margin_scores_seed{seed}.json")
    reference = searched.full_flops
    budgets = []
    largest = max(c.input_size for c in searched.candidates)
    for name in args.budgets.split(","):
        if name in NAMED_DEPTHS:
            named = [c for c in searched.candidates if c.depths == NAMED_DEPTHS[name] and c.input_size == largest]
            share = named[0].flops / reference
        else:
            share = float(name)
        within = [c for c in searched.candidates if c.flops <= share * reference * (1 + 1e-9)]
        picks = {}
        for margin in args.margin_values:
            pick = pick_candidate(within, margin)
            picks[f"{margin:g}"] = None if pick is None else score("ST++", folder, pick, reference)
        budgets.append({"budget": share, "budget_name": name, "candidates_within": len(within), "picks": picks})
    return {
        "seed": seed,
        "checkpoint": folder.name,
        "full_test_top1": result["full_top1"],
        "candidates": len(searched.candidates),
        "heldout": {"images": args.holdout_samples, "file": heldout.name, "seen_in_training": False},
        "budgets": budgets,
        "search_seconds": search_seconds,
        "seconds": round(time.perf_counter() - start, 1),
    }


def check_against_payoff(record: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Where margin 0's picks differ from the ST++ picks the payoff benchmark recorded for the seed (should be none)."""
    path = args.payoff_report / f"seed{record['seed']}" / "payoff.json"
    if not path.is_file():
        return [f"seed {record['seed']}: no {path} to compare with"]
    recorded = {round(b["budget"], 4): b["picks"]["ST++"] for b in json.loads(path.read_text())["budgets"]}
    problems = []
    for budget in record["budgets"]:
        theirs, ours = recorded.get(round(budget["budget"], 4)), budget["picks"]["0"]
        if theirs is None or ours is None:
            continue
        fields = ("depths", "input_size", "heldout_top1")
        if [ours[k] for k in fields] != [theirs[k] for k in fields]:
            problems.append(f"seed {record['seed']}, budget {budget['budget']}: margin 0 picked {ours}, the payoff "
                            f"benchmark {theirs}")  # fmt: skip
    return problems


def report_markdown(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The table over seeds, then each seed's picks."""
    seeds = ", ".join(str(r["seed"]) for r in records)
    margins = [f"{m:g}" for m in args.margin_values]
    lines = [
        f"The ST++ ResNet-20 of the payoff study (`{args.st_setting}`; seeds {seeds}): its pick at each FLOPs "
        f"budget and pick margin (paired standard errors on {args.holdout_samples:,} held-out training images; 0: the "
        "most accurate). "
        "Test top-1 on the whole test split, each pick exported with its BatchNorm statistics re-estimated; mean ± "
        "std over seeds, the difference to margin 0 paired by seed.",
        "",
        "| budget (FLOPs of ResNet-20) | margin | FLOPs of the pick (share) | held-out top-1 | test top-1 "
        "| test Δ to margin 0 | t (p) | seeds with a cheaper pick |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, budget in enumerate(records[0]["budgets"]):
        base = [r["budgets"][i]["picks"]["0"] for r in records]
        for margin in margins:
            picks = [r["budgets"][i]["picks"][margin] for r in records]
            if any(p is None for p in picks):
                continue
            diffs = [p["test_top1"] - b["test_top1"] for p, b in zip(picks, base, strict=True)]
            cheaper = sum(p["flops"] < b["flops"] for p, b in zip(picks, base, strict=True))
            delta = "-" if margin == "0" else mean_std(diffs)
            t = "-" if margin == "0" else paired_t(diffs)
            lines.append(
                f"| {budget_text(budget)} | {margin} | {mean_std([100 * p['flop_share'] for p in picks], 1)} % "
                f"| {mean_std([p['heldout_top1'] for p in picks])} | {mean_std([p['test_top1'] for p in picks])} "
                f"| {delta} | {t} | {'-' if margin == '0' else f'{cheaper} of {len(picks)}'} |"
            )
    lines += ["", "Each seed's picks (test top-1, depths @ input size, FLOPs share):", ""]
    lines += ["| seed | budget | " + " | ".join(f"margin {m}" for m in margins) + " |"]
    lines += ["| --- | --- |" + " --- |" * len(margins)]
    for record in records:
        for budget in record["budgets"]:
            cells = [pick_text(budget["picks"][m]) for m in margins]
            lines.append(f"| {record['seed']} | {budget_text(budget)} | " + " | ".join(cells) + " |")
    lines += ["", "Search seconds per seed: " + ", ".join(f"{r['seed']}: {r['search_seconds']}" for r in records)]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings (the search's and the exports' as ``bench/subnet_payoff.py`` has them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, required=True, help="--out of the full-network study's payoff plan")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--margins", default=MARGINS, help="pick margins in paired standard errors (0: most accurate)")
    parser.add_argument(
        "--budgets", default=BUDGETS,
        help="FLOPs budgets: shares of the ResNet-20 at 32 px, or ResNet-8 / ResNet-14 (their FLOPs)",
    )  # fmt: skip
    parser.add_argument("--st-setting", default=PAYOFF_ST_SETTING, help="the study setting searched")
    parser.add_argument("--report-dir", type=Path, default=REPO / "docs" / "measurements" / "pick_margin")
    parser.add_argument(
        "--payoff-report", type=Path, default=REPO / "docs" / "measurements" / "subnet_payoff",
        help="the payoff benchmark's report, whose ST++ picks margin 0 must reproduce",
    )  # fmt: skip
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--input-sizes", default="13,19,26,32")
    parser.add_argument("--holdout-samples", type=int, default=2000)
    parser.add_argument("--search-recalibrate-bn", type=int, default=2000)
    parser.add_argument("--recalibrate-bn", type=int, default=1024)
    parser.add_argument("--test-samples", type=int, default=0, help="test images (0: all 10,000)")
    args = parser.parse_args(argv)
    args.margin_values = [float(m) for m in args.margins.split(",")]
    if args.margin_values[0] != 0 or any(m < 0 for m in args.margin_values):
        parser.error("--margins must start with 0 (the reference) and hold no negative margin")
    args.study = args.study.expanduser().resolve()
    args.report_dir = args.report_dir.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    """Search and score every finished seed; write the report."""
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    records = []
    for seed in (int(s) for s in args.seeds.split(",")):
        record = margins_for_seed(seed, args)
        if record is None:
            print(f"seed {seed}: its ST++ run has not finished; skipped", flush=True)
            continue
        for problem in check_against_payoff(record, args):
            print(f"warning: {problem}", flush=True)
        print(f"seed {seed}: done in {record['seconds']} s", flush=True)
        records.append(record)
    if not records:
        print("no seed's ST++ run has finished", file=sys.stderr)
        return 1
    args.report_dir.mkdir(parents=True, exist_ok=True)
    (args.report_dir / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    text = report_markdown(records, args)
    (args.report_dir / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
