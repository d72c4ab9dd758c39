"""The report's cells: mean ± std, the paired t test, a pick and a budget as text, picks paired by seed, and the
bar's verdict (issue 41)."""

from __future__ import annotations

import statistics
from typing import Any

from payoff.study import SCRATCH


def mean_std(values: list[float], digits: int = 2) -> str:
    """``mean ± std`` of ``values`` (one value alone; ``-`` for none)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def paired_t(diffs: list[float]) -> str:
    """The one-sample t test of paired differences against 0, ``t (p ...)``; ``-`` below two or with no spread."""
    if len(diffs) < 2 or statistics.stdev(diffs) < 1e-9:
        return "-"
    from scipy.stats import ttest_1samp

    test = ttest_1samp(diffs, 0.0)
    return f"{test.statistic:.2f} (p {test.pvalue:.3f})"


def pick_text(pick: dict[str, Any] | None, network: bool = False) -> str:
    """A pick as ``top-1 (shape @size, FLOPs share)``, its network's name for the shape with ``network``."""
    if pick is None:
        return "-"
    shape = pick["network"] if network else ",".join(map(str, pick["depths"]))
    return f"{pick['test_top1']:.2f} ({shape} @{pick['input_size']}, {100 * pick['flop_share']:.0f}%)"


def budget_text(budget: dict[str, Any]) -> str:
    """``10 %``, or ``65.3 % (ResNet-14)`` for a budget given as a network's FLOPs."""
    name = budget.get("budget_name", "")
    if name in SCRATCH:
        return f"{100 * budget['budget']:.1f} % ({name})"
    return f"{100 * budget['budget']:.0f} %"


def pick_top1(record: dict[str, Any], index: int, label: str) -> float | None:
    """The test top-1 of the ``label`` pick at budget ``index`` of a seed record (None: no pick there)."""
    pick = record["budgets"][index]["picks"][label]
    return None if pick is None else pick["test_top1"]


def paired_top1(records: list[dict[str, Any]], index: int, first: str, second: str) -> list[tuple[float, float]]:
    """The test top-1 of the ``first`` and ``second`` picks at budget ``index``, by seed, where a seed has both."""
    pairs = [(pick_top1(r, index, first), pick_top1(r, index, second)) for r in records]
    return [(a, b) for a, b in pairs if a is not None and b is not None]


def seed_pairs(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    """Two settings' seed records paired by seed, over the seeds both have (in ``first``'s order)."""
    return [(a, b) for a in first for b in second if a["seed"] == b["seed"]]


def paired_st_top1(pairs: list[tuple[dict, dict]], index: int) -> list[tuple[float, float]]:
    """The test top-1 of each pair's two ST++ picks at budget ``index``, where both records have one."""
    both = [(pick_top1(a, index, "ST++"), pick_top1(b, index, "ST++")) for a, b in pairs]
    return [(x, y) for x, y in both if x is not None and y is not None]


def bar_verdict(diffs: list[float]) -> str:
    """Issue 41's bar at one budget, from ST++'s pick minus the fair front's by seed: ``lead`` (at least +0.5 in the
    mean and ahead on every seed), ``level`` (at least level in the mean) or ``short``."""
    if not diffs:
        return "-"
    if statistics.mean(diffs) >= 0.5 and all(d > 0 for d in diffs):
        return "lead"
    return "level" if statistics.mean(diffs) >= 0 else "short"
