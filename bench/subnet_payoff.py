"""The payoff of ST++ for deployment: its searched sub-networks against CT's and a network trained from scratch.

  # the checkpoints: the full-network study's CT and ST++ (lambda 1) ResNet-20s, and a ResNet-14 trained as CT
  python bench/full_network_study.py --plan cpu --out ~/stim_hf_study/cpu --parallel 2
  python bench/full_network_study.py --plan r14 --out ~/stim_hf_study/r14
  # the benchmark (every seed whose three runs have finished; run it again as more finish)
  python bench/subnet_payoff.py --study ~/stim_hf_study/cpu --baseline ~/stim_hf_study/r14

For each seed, with the CT and the ST++ ResNet-20 of that seed (same data, epochs, schedule and seed) and
the ResNet-14 trained from scratch the same way:

1. ``stim_hf.tools.search.search_subnets`` over both ResNet-20s at once: every prefix sub-network (27 depth
   combinations) at ``--input-sizes`` (the sizes ST++ trains on), each with its BatchNorm statistics
   re-estimated on ``--search-recalibrate-bn`` (2,000) training images, scored on ``--holdout-samples``
   (2,000) held-out **training** images (never the test split), under a FLOPs budget equal to the
   ResNet-14's FLOPs (65 % of the ResNet-20's). Its ``pareto.json`` / ``pareto.csv`` / ``pareto.png`` go
   to ``--report-dir/seed<N>/search``.
2. Every sub-network on either accuracy-FLOPs front, each checkpoint's pick under the budget, and the
   ``[2, 2, 2]`` sub-network at 32 px (the ResNet-14's shape) of each, exported with
   ``stim_hf.tools.export.export_subnet`` (BatchNorm re-estimated on ``--recalibrate-bn`` training images) and
   scored on the whole test split.
3. The ResNet-14's and the ResNet-20s' full-network test top-1 from the study's own analysis
   (``result.json``: the whole test split).

Writes ``results.json`` (every figure), ``results.md`` (per seed, then mean and std over seeds, with the
paired difference ST++ pick minus ResNet-14 per seed) and ``payoff.png`` (test top-1 against FLOPs:
both fronts, the picks, the ResNet-14 and the full networks) to ``--report-dir``
(default ``docs/measurements/subnet_payoff``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_name, "1")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data" / "cifar10"
RUNS = {"CT": "ct_seed{seed}", "ST++": "stpp_l1_kl-_step0_seed{seed}"}
BASELINE = "ct_seed{seed}"
SHAPE = (2, 2, 2)  # a CIFAR ResNet-14's blocks per stage


def finished(folder: Path) -> dict[str, Any] | None:
    """The study's ``result.json`` of a finished run, or None."""
    path = folder / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def data_arguments(args: argparse.Namespace, with_test: bool):
    """CIFAR-10 as the recipes load it; the test split only where a figure is meant to be a test figure."""
    from stim_hf.data.image_datasets import DataArguments

    return DataArguments(
        train_file=str(args.data_dir / "train.parquet"),
        validation_file=str(args.data_dir / "test.parquet") if with_test else None,
        max_eval_samples=args.test_samples or None,
        image_size=32,
        augmentation="cifar",
    )


def model_flops(folder: Path, size: int = 32) -> int:
    """FLOPs of one image through the saved model at ``size`` px."""
    import torch

    from stim_hf.analysis.flops import count_flops
    from stim_hf.tools.export import load_checkpoint

    model = load_checkpoint(folder).eval()
    return int(count_flops(model, torch.zeros(1, 3, size, size)))


def test_top1(checkpoint: Path, depths, input_size: int, args: argparse.Namespace) -> float:
    """Top-1 (%) on the test split of a sub-network, exported with re-estimated BatchNorm statistics."""
    from stim_hf.tools.export import export_subnet

    with tempfile.TemporaryDirectory() as out:
        export_subnet(
            str(checkpoint),
            list(depths),
            Path(out) / "export",
            recalibrate_bn=args.recalibrate_bn,
            data_args=data_arguments(args, with_test=True),
            evaluate=True,
            seed=42,
            input_size=input_size,
        )
        info = json.loads((Path(out) / "export" / "export_info.json").read_text())
    return round(100 * info["metrics"]["accuracy"], 2)


def score_candidate(candidate, role: str, checkpoint, folder: Path, scored: dict, args: argparse.Namespace) -> dict:
    """The test figure of one searched candidate (each depths-and-size scored once), with its roles."""
    key = (tuple(candidate.depths), candidate.input_size)
    if key not in scored:
        scored[key] = {
            "depths": list(candidate.depths),
            "input_size": candidate.input_size,
            "flop_share": round(candidate.flops / checkpoint.full_flops, 4),
            "heldout_top1": round(100 * candidate.accuracy, 2),
            "test_top1": test_top1(folder, candidate.depths, candidate.input_size, args),
            "roles": [],
        }
        depths = ",".join(map(str, candidate.depths))
        print(
            f"  {checkpoint.label} {depths} @{candidate.input_size}: test top-1 {scored[key]['test_top1']}", flush=True
        )
    scored[key]["roles"].append(role)
    return scored[key]


def payoff_for_seed(seed: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """Search, export and score one seed's checkpoints; None if one of its runs has not finished."""
    from stim_hf.tools.search import SearchArguments, search_subnets

    folders = {label: args.study / pattern.format(seed=seed) for label, pattern in RUNS.items()}
    baseline = args.baseline / BASELINE.format(seed=seed)
    results = {label: finished(folder) for label, folder in folders.items()}
    baseline_result = finished(baseline)
    if baseline_result is None or any(r is None for r in results.values()):
        return None
    cache = args.report_dir / f"seed{seed}" / "payoff.json"
    if cache.is_file() and not args.redo:
        return json.loads(cache.read_text())
    start = time.perf_counter()
    full_flops = model_flops(folders["ST++"])
    baseline_flops = model_flops(baseline)
    share = baseline_flops / full_flops
    search_dir = args.report_dir / f"seed{seed}" / "search"
    search = search_subnets(
        [str(folders["CT"]), str(folders["ST++"])],
        data_arguments(args, with_test=False),
        SearchArguments(
            budget=f"flops={share:.6f}",
            sampling="prefix",
            sample_space="full",
            input_sizes=args.input_sizes,
            labels=list(RUNS),
            holdout_samples=args.holdout_samples,
            recalibrate_bn=args.search_recalibrate_bn,
            halving_rounds=1,  # 108 candidates per checkpoint: every one on all the held-out images
            latency="none",  # a shared CPU's latencies say little; FLOPs are the budget here
            device="cpu",
            output_dir=str(search_dir),
            overwrite=True,
            progress=False,
        ),
    )
    record: dict[str, Any] = {
        "seed": seed,
        "full_flops": full_flops,
        "baseline_flops": baseline_flops,
        "budget_flop_share": round(share, 4),
        "baseline_test_top1": baseline_result["full_top1"],
        "checkpoints": {},
    }
    for checkpoint in search.checkpoints:
        folder = folders[checkpoint.label]
        scored: dict[tuple, dict[str, Any]] = {}
        context = (checkpoint, folder, scored, args)
        front = [c for c in checkpoint.candidates if c.pareto_flops]
        for candidate in sorted(front, key=lambda c: c.flops):
            score_candidate(candidate, "front", *context)
        pick = score_candidate(checkpoint.pick, "pick", *context) if checkpoint.pick is not None else None
        shape = next(c for c in checkpoint.candidates if tuple(c.depths) == SHAPE and c.input_size == 32)
        record["checkpoints"][checkpoint.label] = {
            "full_test_top1": results[checkpoint.label]["full_top1"],
            "pick": pick,
            "shape_222_at_32": score_candidate(shape, "shape", *context),
            "front": [v for v in scored.values() if "front" in v["roles"]],
        }
    record["seconds"] = round(time.perf_counter() - start, 1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def report_markdown(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Per-seed and aggregate tables."""
    lines = [
        f"Test top-1 (%) on {f'{args.test_samples} CIFAR-10 test images' if args.test_samples else 'the whole CIFAR-10 test split'} "
        "(the ResNet-14's and the full networks': the whole split); sub-networks with BatchNorm statistics re-estimated on "
        f"{args.recalibrate_bn} training images; picks chosen on {args.holdout_samples:,} held-out training images under the ResNet-14's "
        "FLOPs.",
        "",
        "| seed | budget (share of ResNet-20) | CT pick | ST++ pick | CT [2,2,2] @32 | ST++ [2,2,2] @32 | ResNet-14 "
        "from scratch | ST++ pick - ResNet-14 | CT full | ST++ full |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def pick_text(p):
        if p is None:
            return "-"
        return (
            f"{p['test_top1']:.2f} ({','.join(map(str, p['depths']))} @{p['input_size']}, {100 * p['flop_share']:.0f}%)"
        )

    for r in records:
        ct, st = r["checkpoints"]["CT"], r["checkpoints"]["ST++"]
        delta = st["pick"]["test_top1"] - r["baseline_test_top1"] if st["pick"] else None
        lines.append(
            f"| {r['seed']} | {100 * r['budget_flop_share']:.1f}% | {pick_text(ct['pick'])} | {pick_text(st['pick'])} | "
            f"{ct['shape_222_at_32']['test_top1']:.2f} | {st['shape_222_at_32']['test_top1']:.2f} | "
            f"{r['baseline_test_top1']:.2f} | {'-' if delta is None else f'{delta:+.2f}'} | "
            f"{ct['full_test_top1']:.2f} | {st['full_test_top1']:.2f} |"
        )
    if len(records) > 1:

        def column(f):
            return [f(r) for r in records]

        lines += [
            "",
            f"Over {len(records)} seeds (mean ± std): CT pick "
            f"{_mean_std(column(lambda r: r['checkpoints']['CT']['pick']['test_top1']))}, ST++ pick "
            f"{_mean_std(column(lambda r: r['checkpoints']['ST++']['pick']['test_top1']))}, ResNet-14 from scratch "
            f"{_mean_std(column(lambda r: r['baseline_test_top1']))}; ST++ pick - ResNet-14 "
            f"{_mean_std(column(lambda r: r['checkpoints']['ST++']['pick']['test_top1'] - r['baseline_test_top1']))}.",
        ]
    lines += ["", "Accuracy-FLOPs fronts (test top-1 of each front member; chosen on held-out training images):", ""]
    for r in records:
        for label in RUNS:
            front = r["checkpoints"][label]["front"]
            cells = ", ".join(
                f"{','.join(map(str, f['depths']))} @{f['input_size']}: {100 * f['flop_share']:.0f}% -> {f['test_top1']:.2f}"
                for f in front
            )
            lines.append(f"- seed {r['seed']}, {label}: {cells}")
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Test top-1 against FLOPs share: the fronts, the picks, ResNet-14 and the full networks, per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(6 * len(records), 4.5), squeeze=False)
    colors = {"CT": "tab:blue", "ST++": "tab:orange"}
    for ax, r in zip(axes[0], records, strict=True):
        for label, color in colors.items():
            c = r["checkpoints"][label]
            front = sorted(c["front"], key=lambda f: f["flop_share"])
            ax.plot(
                [100 * f["flop_share"] for f in front],
                [f["test_top1"] for f in front],
                "o-",
                color=color,
                label=f"{label} front",
            )
            if c["pick"]:
                ax.plot(
                    100 * c["pick"]["flop_share"],
                    c["pick"]["test_top1"],
                    "*",
                    ms=14,
                    color=color,
                    label=f"{label} pick",
                )
            ax.plot(100, c["full_test_top1"], "s", color=color, label=f"{label} full ResNet-20")
        ax.plot(
            100 * r["budget_flop_share"], r["baseline_test_top1"], "D", color="black", label="ResNet-14 from scratch"
        )
        ax.axvline(100 * r["budget_flop_share"], ls="--", color="gray", lw=1)
        ax.set(xlabel="FLOPs (% of ResNet-20)", ylabel="test top-1 (%)", title=f"seed {r['seed']}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, required=True, help="--out of the full-network study's cpu plan")
    parser.add_argument("--baseline", type=Path, required=True, help="--out of the study's r14 plan")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--report-dir", type=Path, default=REPO / "docs" / "measurements" / "subnet_payoff")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder with CIFAR-10 train/test.parquet")
    parser.add_argument("--input-sizes", default="13,19,26,32", help="input sizes searched (ST++ trains on 13..32)")
    parser.add_argument(
        "--holdout-samples", type=int, default=2000, help="held-out training images the search scores on"
    )
    parser.add_argument(
        "--search-recalibrate-bn", type=int, default=2000, help="training images for each candidate's BatchNorm"
    )
    parser.add_argument("--recalibrate-bn", type=int, default=1024, help="images for each export's BatchNorm")
    parser.add_argument("--test-samples", type=int, default=0, help="test images (0: all 10,000)")
    parser.add_argument("--redo", action="store_true", help="search and score seeds done before again")
    args = parser.parse_args(argv)
    args.study, args.baseline = args.study.expanduser().resolve(), args.baseline.expanduser().resolve()
    args.report_dir = args.report_dir.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    """Score every seed whose runs have finished and write the report."""
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one loading and one writing bar per export otherwise
    records = []
    for seed in (int(s) for s in args.seeds.split(",")):
        record = payoff_for_seed(seed, args)
        if record is None:
            print(f"seed {seed}: not all of its runs have finished; skipped", flush=True)
            continue
        print(f"seed {seed}: done in {record['seconds']} s", flush=True)
        records.append(record)
    if not records:
        print("no seed has all three runs finished yet", file=sys.stderr)
        return 1
    args.report_dir.mkdir(parents=True, exist_ok=True)
    (args.report_dir / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    text = report_markdown(records, args)
    (args.report_dir / "results.md").write_text(text)
    plot(records, args.report_dir / "payoff.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
