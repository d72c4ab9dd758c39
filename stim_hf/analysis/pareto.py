"""Pareto fronts of accuracy against cost, and the search plot (accuracy against FLOPs and latency).

Figures use matplotlib's object API on an Agg canvas, as :mod:`stim_hf.analysis.plotting` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def pareto_front(costs: Sequence[float | None], accuracies: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats: none is as cheap and as accurate, and better in one.

    Points without a cost (None or NaN) are left out. Identical points are all kept. The indices
    come cheapest first.
    """
    points = [
        (float(cost), -float(accuracy), index)
        for index, (cost, accuracy) in enumerate(zip(costs, accuracies, strict=True))
        if cost is not None and not math.isnan(float(cost))
    ]
    points.sort()
    front: list[int] = []
    best: tuple[float, float] | None = None  # (cost, accuracy) of the last point that raised the accuracy
    for cost, negative_accuracy, index in points:
        accuracy = -negative_accuracy
        if best is None or accuracy > best[1] or (accuracy, cost) == (best[1], best[0]):
            front.append(index)
            best = (cost, accuracy)
    return front


def pareto_layers(costs: Sequence[float | None], accuracies: Sequence[float], count: int) -> list[int]:
    """Whole Pareto layers (the front, then the front of the rest, ...) until at least ``count`` points.

    Successive halving keeps these: the most accurate point under any cost limit is on the first
    layer, and points just behind it on the next ones. Points without a cost are never kept.
    """
    remaining = [i for i, cost in enumerate(costs) if cost is not None and not math.isnan(float(cost))]
    kept: list[int] = []
    while remaining and len(kept) < count:
        layer = [remaining[i] for i in pareto_front([costs[j] for j in remaining], [accuracies[j] for j in remaining])]
        kept += layer
        taken = set(layer)
        remaining = [i for i in remaining if i not in taken]
    return kept


def near_front(costs: Sequence[float | None], hits: Sequence[torch.Tensor], margin: float) -> list[int]:
    """Points that no point of lower or equal cost beats by more than ``margin`` paired standard errors.

    ``hits[i]`` says which of the same images point ``i`` classified correctly. Two points' accuracy
    difference on those images has the standard error of the mean per-image difference, which is far
    smaller than either accuracy's own when the points are sub-networks of one network (they err on
    the same images). Successive halving keeps these points beside its Pareto layers: a round on
    few images cannot tell them from the front, so dropping them would make its noise the
    decision. ``margin=0`` keeps the front (and points tied with it). Points without a cost are never
    kept.
    """
    valid = [i for i, cost in enumerate(costs) if cost is not None and not math.isnan(float(cost))]
    if not valid:
        return []
    x = torch.stack([hits[i].double() for i in valid])  # points x images
    n = x.shape[1]
    dof = max(n - 1, 1)
    mean = x.mean(dim=1)
    centred = x - mean[:, None]
    variance = (centred**2).sum(dim=1) / dof
    cost = torch.tensor([float(costs[i]) for i in valid], dtype=torch.float64)
    kept = []
    for start in range(0, len(valid), 256):  # chunks keep the pairwise tables small on large spaces
        rows = slice(start, start + 256)
        covariance = centred[rows] @ centred.T / dof  # rows: the judged points, columns: the others
        stderr = ((variance[rows, None] + variance[None, :] - 2 * covariance).clamp(min=0) / n).sqrt()
        lead = mean[None, :] - mean[rows, None]
        cheaper = cost[None, :] <= cost[rows, None]
        beaten = (cheaper & (lead > margin * stderr) & (lead > 0)).any(dim=1)
        kept += [valid[start + j] for j in torch.nonzero(~beaten).flatten().tolist()]
    return kept


def within_margin(hits: Sequence[torch.Tensor], reference: int, margin: float) -> list[int]:
    """Points that point ``reference`` does not beat by more than ``margin`` paired standard errors.

    ``hits[i]`` says which of the same images point ``i`` classified correctly. A point's deficit to
    the reference is the mean per-image difference of the two, judged against that mean's standard
    error (as :func:`near_front` does): sub-networks of one network err on the same images, so
    even a few images resolve a small deficit. The search's pick margin takes the cheapest of these
    points instead of the reference: a lead of a few images is not a reason to pay for more blocks.
    The reference itself is always in; ``margin=0`` adds only the points tied with it.
    """
    x = torch.stack([h.double() for h in hits])  # points x images
    deficit = x[reference][None, :] - x
    lead = deficit.mean(dim=1)
    stderr = deficit.std(dim=1, correction=1) / math.sqrt(x.shape[1]) if x.shape[1] > 1 else torch.zeros_like(lead)
    return torch.nonzero(lead <= margin * stderr).flatten().tolist()


@dataclass
class SearchSeries:
    """One checkpoint's candidates on the search plot (accuracies as fractions)."""

    label: str
    flops: Sequence[float]
    latencies_ms: Sequence[float | None]
    accuracies: Sequence[float]
    front_flops: Sequence[int]
    front_latency: Sequence[int]
    pick: int | None = None


def plot_search(
    series: Sequence[SearchSeries],
    budget_flops: float | None = None,
    budget_latency_ms: float | None = None,
    latency_label: str = "latency, batch 1 (ms)",
    title: str | None = None,
    dpi: int = 110,
) -> Figure:
    """Accuracy against FLOPs (left) and against measured latency (right), one colour per checkpoint.

    Small dots are every candidate, the line and large dots the Pareto front, a star the pick under
    the budget; dashed vertical lines are the budgets.
    """
    figure = Figure(figsize=(11.5, 4.6), dpi=dpi)
    FigureCanvasAgg(figure)
    flops_axes, latency_axes = figure.subplots(1, 2)
    any_latency = False
    for number, item in enumerate(series):
        colour = f"C{number % 10}"
        accuracy = 100 * np.asarray(item.accuracies, dtype=float)
        mflops = np.asarray(item.flops, dtype=float) / 1e6
        latency = np.asarray([math.nan if v is None else v for v in item.latencies_ms], dtype=float)
        any_latency = any_latency or bool(np.isfinite(latency).any())
        for axes, x, front in ((flops_axes, mflops, item.front_flops), (latency_axes, latency, item.front_latency)):
            shown = np.isfinite(x)
            axes.scatter(x[shown], accuracy[shown], color=colour, s=8, alpha=0.3, linewidths=0)
            if len(front):
                axes.plot(
                    x[list(front)], accuracy[list(front)], color=colour, marker="o", markersize=4, linewidth=1.2,
                    label=f"{item.label}: Pareto front",
                )  # fmt: skip
            if item.pick is not None and np.isfinite(x[item.pick]):
                axes.scatter(
                    [x[item.pick]], [accuracy[item.pick]], color=colour, marker="*", s=200, edgecolors="black",
                    linewidths=0.6, zorder=3, label=f"{item.label}: pick",
                )  # fmt: skip
    for axes, budget in ((flops_axes, budget_flops), (latency_axes, budget_latency_ms)):
        if budget is not None:
            axes.axvline(budget, color="grey", linestyle="--", linewidth=1, label="budget")
    flops_axes.set_xlabel("FLOPs per image (M)")
    latency_axes.set_xlabel(latency_label)
    if not any_latency:
        latency_axes.text(0.5, 0.5, "latency not measured", ha="center", va="center", transform=latency_axes.transAxes)
    for axes in (flops_axes, latency_axes):
        axes.set_ylabel("top-1 accuracy (%)")
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7, loc="lower right")
    figure.suptitle(title or "Sub-networks: accuracy against cost (front: no cheaper sub-network is as accurate)")
    figure.tight_layout()
    return figure
