"""ST++ against the fair front at each data size side by side (``--data-sizes``), from the fair reports alone."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from payoff.study import SCRATCH_LABEL
from payoff.tables import bar_verdict, budget_text, mean_std, paired_top1


def _fair_records_by_setting(report_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """A written fair report's seed records (``fair/results.json`` in ``report_dir``), by ST++ setting."""
    path = report_dir / "fair" / "results.json"
    if not path.is_file():
        raise SystemExit(
            f"{path}: no fair report there; write it first (python bench/subnet_payoff.py --report-dir {report_dir})"
        )
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for record in json.loads(path.read_text()):
        by_setting.setdefault(record["st_setting"], []).append(record)
    return by_setting


def _report_link(folder: Path, report_dir: Path) -> str:
    """A markdown link from ``report_dir`` to the fair report in ``folder``."""
    target = os.path.relpath(folder / "fair" / "results.md", report_dir)
    return f"[{target}]({target})"


def _size_name(records: list[dict[str, Any]]) -> str:
    return f"{records[0]['train_samples']:,} images × {records[0]['epochs']} epochs"


def _fair_cells(records: list[dict[str, Any]], budget_name: str) -> tuple[str, str, str, str]:
    """ST++'s pick, the fair front's, their paired difference and the bar's verdict at one budget, over the seeds."""
    names = [b["budget_name"] for b in records[0]["budgets"]]  # a seed's budgets are its report's, in order
    pairs = paired_top1(records, names.index(budget_name), "ST++", SCRATCH_LABEL) if budget_name in names else []
    if not pairs:  # a budget this data size's report does not hold
        return "-", "-", "-", "-"
    diffs = [a - b for a, b in pairs]
    return (mean_std([a for a, _ in pairs]), mean_std([b for _, b in pairs]), mean_std(diffs),
            f"{bar_verdict(diffs)} ({sum(d > 0 for d in diffs)} of {len(diffs)})")  # fmt: skip


def by_data_size_report(args: argparse.Namespace) -> int:
    """ST++ against the fair front at each data size side by side (``--data-sizes``: the fair reports' folders, e.g.
    the 5k and the full-data one): ``by_data_size.md`` and ``by_data_size.png`` in ``--report-dir``."""
    folders = [Path(d).expanduser().resolve() for d in args.data_sizes.split(",")]
    sizes = [(folder, _fair_records_by_setting(folder)) for folder in folders]
    first = next(iter(sizes[0][1].values()))
    budgets = [(b["budget_name"], b) for b in first[0]["budgets"]]
    columns = [(folder, setting, records) for folder, by_setting in sizes for setting, records in by_setting.items()]
    lines = [
        "ST++'s searched sub-networks against the fair front (every network trained alone: at 32 px, at the random "
        "sizes ST++ draws, at dedicated sizes) by data size, CIFAR-10, test top-1 (%) as exported on all test images, "
        "mean ± std over seeds, paired by seed; bar: `lead` is at least +0.5 in the mean and ahead on every seed, "
        "`level` at least level in the mean (seeds ahead in brackets). Per data size: "
        + "; ".join(
            f"{_size_name(records)}, {records[0]['st_network']}, seeds {', '.join(str(r['seed']) for r in records)} "
            f"({_report_link(folder, args.report_dir)})"
            for folder, _, records in columns
        )
        + ".",
        "",
        "| budget | "
        + " | ".join(
            f"{_size_name(r)}, {r[0]['st_network']}: ST++ / fair front / ST++ − it / bar" for _, _, r in columns
        )
        + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for name, budget in budgets:
        cells = [" / ".join(_fair_cells(records, name)) for _, _, records in columns]
        lines.append(f"| {budget_text(budget)} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    args.report_dir.mkdir(parents=True, exist_ok=True)
    (args.report_dir / "by_data_size.md").write_text(text)
    by_data_size_plot(sizes, args.report_dir / "by_data_size.png")
    print(text)
    return 0


def by_data_size_plot(sizes: list[tuple[Path, dict[str, list[dict[str, Any]]]]], path: Path) -> None:
    """One panel per data size: each ST++ setting's picks and the fair front's against the budget (mean, std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    colors = ["tab:orange", "tab:red", "tab:purple", "tab:green"]
    for ax, (_, by_setting) in zip(axes[0], sizes, strict=True):
        curves = [
            (r[0]["st_network"], "ST++", r, colors[i % len(colors)], "o-") for i, r in enumerate(by_setting.values())
        ]
        front = next(iter(by_setting.values()))
        curves.append(("fair front (trained alone)", SCRATCH_LABEL, front, "black", "D--"))
        for label, key, records, color, style in curves:
            shares, means, stds = [], [], []
            for i, budget in enumerate(records[0]["budgets"]):
                values = [r["budgets"][i]["picks"][key]["test_top1"] for r in records if r["budgets"][i]["picks"][key]]
                if values:
                    shares.append(100 * budget["budget"])
                    means.append(statistics.mean(values))
                    stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            ax.errorbar(shares, means, yerr=stds, fmt=style, color=color, capsize=3, label=label, ms=4)
        ax.set(xlabel="budget (FLOPs, % of ResNet-20 at 32 px)", ylabel="test top-1 (%)", title=_size_name(front))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
