"""Issue 30's payoff (``--front 32px``): per seed one search over the payoff plan's four runs, ST++ against the
32-px trainings alone, and its report."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from payoff.finetuning import finetune_budgets, finetune_seed, finetune_table
from payoff.scoring import TestScores, best_within, heldout_file, search
from payoff.study import CT_SETTING, PAYOFF_ST_SETTING, SCRATCH, SCRATCH_LABEL, cost_fields, finished
from payoff.tables import budget_text, mean_std, paired_t, pick_text, pick_top1


def payoff_for_seed(seed: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """Search, pick, export and score one seed's checkpoints (or read the seed's record, written before); None if one
    of its runs has not finished."""
    from stim_hf.analysis.pareto import pareto_front

    cache = args.report_dir / f"seed{seed}" / "payoff.json"
    if cache.is_file() and not args.redo:
        # A seed's record stands without its run folders, so the report can be written again on a new machine.
        record = json.loads(cache.read_text())
        if record["st_setting"] != args.st_setting:
            raise SystemExit(
                f"{cache} holds the search of {record['st_setting']}, not of --st-setting {args.st_setting}: give "
                "another --report-dir for that setting (or --redo to replace this one)"
            )
        return record
    trained = {"ST++": args.st_setting, "CT": CT_SETTING}
    settings = {**trained, **SCRATCH}
    folders = {label: args.study / f"{name}_seed{seed}" for label, name in settings.items()}
    results = {label: finished(folder) for label, folder in folders.items()}
    if any(result is None for result in results.values()):
        return None
    start = time.perf_counter()
    seed_dir = args.report_dir / f"seed{seed}"
    heldout = heldout_file(seed, results["ST++"].get("train_samples"), args)
    subnets = search({label: folders[label] for label in trained}, "full", seed_dir / "search", heldout, args)
    scratch = search({label: folders[label] for label in SCRATCH}, "0,0,0", seed_dir / "search_scratch", heldout, args)
    search_seconds = {
        c.label: round(c.timing.get("total", 0.0), 1) for c in [*subnets.checkpoints, *scratch.checkpoints]
    }
    reference = next(c for c in subnets.checkpoints if c.label == "ST++").full_flops
    score = TestScores(args, seed_dir / "test_scores.json")
    scratch_flops = {c.label: c.full_flops for c in scratch.checkpoints}

    pools = {c.label: [(c.label, x) for x in c.candidates] for c in subnets.checkpoints}
    pools[SCRATCH_LABEL] = [(c.label, x) for c in scratch.checkpoints for x in c.candidates]
    budgets = []
    for budget in args.budgets.split(","):
        share = scratch_flops[budget] / reference if budget in scratch_flops else float(budget)
        picks = {}
        for label, pool in pools.items():
            best = best_within(pool, share * reference)
            picks[label] = None if best is None else score(best[0], folders[best[0]], best[1], reference)
        budgets.append({"budget": round(share, 4), "budget_name": budget, "picks": picks})

    checkpoints = {}
    for c in subnets.checkpoints:
        front = sorted((x for x in c.candidates if x.pareto_flops), key=lambda x: x.flops)
        checkpoints[settings[c.label]] = {
            "label": c.label,
            "recipe": settings[c.label] == PAYOFF_ST_SETTING,
            "full_test_top1": results[c.label]["full_top1"],
            "search_seconds": search_seconds[c.label],
            **cost_fields(results[c.label]),
            "front": [score(c.label, folders[c.label], x, reference) for x in front],
        }
    points = [score(label, folders[label], x, reference) for label, x in pools[SCRATCH_LABEL]]
    on_front = set(pareto_front([p["flops"] for p in points], [p["heldout_top1"] for p in points]))
    for i, point in enumerate(points):
        point["on_front"] = i in on_front
    for label, name in SCRATCH.items():
        checkpoints.setdefault(name, {"label": label, "recipe": False})
        checkpoints[name] |= {
            "scratch_label": label,
            "full_test_top1": results[label]["full_top1"],
            "scratch_search_seconds": search_seconds[label],
            **cost_fields(results[label]),
        }
    record: dict[str, Any] = {
        "seed": seed,
        "reference_flops": reference,
        "recipe_setting": PAYOFF_ST_SETTING,
        "st_setting": args.st_setting,
        "checkpoints": checkpoints,
        "scratch_points": sorted(points, key=lambda p: p["flops"]),
        "budgets": budgets,
        "heldout": {"images": args.holdout_samples, "file": heldout.name, "seen_in_training": False},
        "seconds": round(time.perf_counter() - start, 1),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(record, indent=2) + "\n")
    return record


def add_finetuning(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Attach each seed's fine-tuned ST++ picks (kept per seed in ``finetune.json``) to its budgets; with
    ``--finetune-epochs``, first fine-tune the picks at the chosen budgets that have not been fine-tuned yet."""
    epochs = [int(e) for e in args.finetune_epochs.split(",") if e.strip()]
    budgets = finetune_budgets(records, args) if epochs else []
    if epochs:
        print(f"fine-tuning ST++'s picks at budgets {', '.join(budgets)} for {epochs} epochs", flush=True)
    for r in records:
        folder = args.study / f"{r['st_setting']}_seed{r['seed']}" if args.study is not None else None
        finetune_seed(r, folder, args.report_dir / f"seed{r['seed']}" / "finetune.json", budgets, epochs, args)


def budget_table(records: list[dict[str, Any]]) -> list[str]:
    """Per budget, over seeds: ST++'s pick, the from-scratch pick, the paired difference, CT's pick."""
    lines = [
        "| budget (FLOPs of ResNet-20) | ST++ pick | from-scratch pick | ST++ − from scratch (paired) | t (p) "
        "| seeds ST++ ahead | CT pick |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, budget in enumerate(records[0]["budgets"]):
        st = [pick_top1(r, i, "ST++") for r in records]
        scratch = [pick_top1(r, i, SCRATCH_LABEL) for r in records]
        ct = [pick_top1(r, i, "CT") for r in records]
        diffs = [a - b for a, b in zip(st, scratch, strict=True) if a is not None and b is not None]
        lines.append(
            f"| {budget_text(budget)} | {mean_std([v for v in st if v is not None])} "
            f"| {mean_std([v for v in scratch if v is not None])} | {mean_std(diffs)} | {paired_t(diffs)} "
            f"| {sum(d > 0 for d in diffs)} of {len(diffs)} | {mean_std([v for v in ct if v is not None])} |"
        )
    return lines


def cost_table(records: list[dict[str, Any]]) -> list[str]:
    """One ST++ training plus its search against the three dedicated trainings plus theirs, per seed."""
    lines = [
        "| seed | ST++ ResNet-20: train / wall min, search s | CT ResNet-20: train / wall min | ST++ / CT wall "
        "| ResNet-14, ResNet-8: train / wall min | three from scratch: train / wall min, search s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        by_label = {c["label"]: c for c in r["checkpoints"].values()}
        st, ct = by_label["ST++"], r["checkpoints"][CT_SETTING]
        small = [r["checkpoints"][SCRATCH[name]] for name in ("ResNet-14", "ResNet-8")]
        scratch = [r["checkpoints"][name] for name in SCRATCH.values()]
        total = lambda key, runs: sum(run.get(key) or 0.0 for run in runs)  # noqa: E731
        minutes = lambda run: f"{run['train_minutes']} / {run['wall_minutes']}"  # noqa: E731
        ratio = st["wall_minutes"] / ct["wall_minutes"] if st.get("wall_minutes") and ct.get("wall_minutes") else None
        lines.append(
            f"| {r['seed']} | {st['train_minutes']} / {st['wall_minutes']}, {st['search_seconds']} "
            f"| {ct['train_minutes']} / {ct['wall_minutes']} | {'-' if ratio is None else f'{ratio:.2f}'} "
            f"| {', '.join(minutes(s) for s in small)} "
            f"| {total('train_minutes', scratch):.1f} / {total('wall_minutes', scratch):.1f}, "
            f"{total('scratch_search_seconds', scratch):.1f} |"
        )
    return lines


def report_markdown(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The budget table over seeds, then per seed: the picks, the full networks, the fronts; the cost."""
    test = f"{args.test_samples} CIFAR-10 test images" if args.test_samples else "the whole CIFAR-10 test split"
    setting = records[0]["st_setting"]
    lines = [
        f"Test top-1 (%) on {test}. ST++: `{setting}`"
        + (
            " (the 5k study's pick, the CIFAR ST++ recipes' setting until docs/results.md 2b moved them to λ 2)"
            if setting == PAYOFF_ST_SETTING
            else ""
        )
        + f"; seeds {', '.join(str(r['seed']) for r in records)}. Every pick is chosen on "
        f"{args.holdout_samples:,} held-out training images (training-split images none of the seed's networks "
        "trained on) with BatchNorm re-estimated at its input size on "
        f"{args.search_recalibrate_bn:,} training images (the from-scratch networks exactly as ST++'s candidates), "
        f"then exported with BatchNorm re-estimated on {args.recalibrate_bn:,} training images and scored on the "
        "test split. From scratch: the best of ResNet-8, ResNet-14 and ResNet-20 (CT) at input sizes "
        f"{args.input_sizes} px within the budget.",
        "",
        *budget_table(records),
        "",
        "Per seed (test top-1, shape @ input size, FLOPs share of the ResNet-20 at 32 px):",
        "",
        "| seed | budget | ST++ pick | from-scratch pick | CT pick |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in records:
        for b in r["budgets"]:
            picks = b["picks"]
            lines.append(
                f"| {r['seed']} | {budget_text(b)} | {pick_text(picks['ST++'])} "
                f"| {pick_text(picks[SCRATCH_LABEL], network=True)} | {pick_text(picks['CT'])} |"
            )
    lines += [
        "",
        "| seed | ST++ full ResNet-20 | CT full ResNet-20 | ResNet-14 | ResNet-8 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in records:
        c = r["checkpoints"]
        st = next(v for v in c.values() if v["label"] == "ST++")
        lines.append(
            f"| {r['seed']} | {st['full_test_top1']:.2f} | {c[CT_SETTING]['full_test_top1']:.2f} "
            f"| {c[SCRATCH['ResNet-14']]['full_test_top1']:.2f} | {c[SCRATCH['ResNet-8']]['full_test_top1']:.2f} |"
        )
    finetuned = finetune_table(records)
    if finetuned:
        lines += [
            "",
            "Fine-tuning ST++'s pick (`stim-hf finetune`'s defaults: KL from its frozen ResNet-20, SGD lr 0.01 cosine, "
            "on the 5,000 training images it was trained on; BatchNorm re-estimated; test top-1 before and after):",
            "",
            *finetuned,
        ]
    lines += ["", "Cost (minutes of training from the logged pace / wall clock with two runs at once; search seconds):"]
    lines += ["", *cost_table(records)]
    lines += ["", "Accuracy-FLOPs fronts (test top-1; chosen on held-out training images):", ""]
    for r in records:
        for c in r["checkpoints"].values():
            if "front" in c:
                cells = ", ".join(
                    f"{','.join(map(str, f['depths']))} @{f['input_size']}: {100 * f['flop_share']:.0f}% -> "
                    f"{f['test_top1']:.2f}"
                    for f in c["front"]
                )
                lines.append(f"- seed {r['seed']}, {c['label']}: {cells}")
        cells = ", ".join(
            f"{p['network']} @{p['input_size']}: {100 * p['flop_share']:.0f}% -> {p['test_top1']:.2f}"
            + ("" if p["on_front"] else " (off the front)")
            for p in r["scratch_points"]
        )
        lines.append(f"- seed {r['seed']}, from scratch: {cells}")
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Per seed: the fronts on the test split, the from-scratch points and the picks; last: picks against budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ST++": "tab:orange", "CT": "tab:blue", SCRATCH_LABEL: "black"}
    fig, axes = plt.subplots(1, len(records) + 1, figsize=(5.5 * (len(records) + 1), 4.5), squeeze=False)
    for ax, r in zip(axes[0], records, strict=False):
        for c in r["checkpoints"].values():
            if "front" in c:
                front = c["front"]
                ax.plot([100 * f["flop_share"] for f in front], [f["test_top1"] for f in front], "o-",
                        color=colors[c["label"]], label=f"{c['label']} front", ms=4)  # fmt: skip
        points = r["scratch_points"]
        front = [p for p in points if p["on_front"]]
        ax.plot([100 * p["flop_share"] for p in front], [p["test_top1"] for p in front], "D--", color="black",
                label="from-scratch front (ResNet-8/14/20 at each size)", ms=4)  # fmt: skip
        ax.plot([100 * p["flop_share"] for p in points], [p["test_top1"] for p in points], "D", color="black",
                ms=3, alpha=0.35)  # fmt: skip
        for b in r["budgets"]:
            ax.axvline(100 * b["budget"], ls=":", color="gray", lw=0.8)
        ax.set(xlabel="FLOPs (% of ResNet-20 at 32 px)", ylabel="test top-1 (%)", title=f"seed {r['seed']}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    ax = axes[0][-1]
    shares = [100 * b["budget"] for b in records[0]["budgets"]]
    for label, color in colors.items():
        values = [[pick_top1(r, i, label) for r in records] for i in range(len(shares))]
        means = [statistics.mean(v) if None not in v else float("nan") for v in values]
        stds = [statistics.stdev(v) if None not in v and len(v) > 1 else 0.0 for v in values]
        ax.errorbar(shares, means, yerr=stds, fmt="o-", color=color, capsize=3,
                    label=f"{label} pick" if label != SCRATCH_LABEL else "from-scratch pick")  # fmt: skip
    ax.set(xlabel="budget (FLOPs, % of ResNet-20)", ylabel="test top-1 (%)",
           title=f"picks, mean ± std over {len(records)} seed{'s' * (len(records) > 1)}")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
