"""The loafing plot: sub-network accuracy against the share of the full network's FLOPs.

Figures are built with matplotlib's object API on an Agg canvas (no pyplot, no global state, no
display needed), so this works in headless jobs, in threads and inside Trainer callbacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


@dataclass
class LoafingSeries:
    """One model's points on the loafing plot (accuracies and shares as fractions in [0, 1]).

    ``flop_shares`` / ``accuracies`` are the sub-networks'; ``recalibrated_accuracies`` (optional,
    same order) the same sub-networks after re-estimating BatchNorm statistics for each;
    ``full_accuracy`` (and ``full_accuracy_recalibrated``) the full network's, drawn at share 1.
    """

    label: str
    full_accuracy: float
    flop_shares: Sequence[float]
    accuracies: Sequence[float]
    recalibrated_accuracies: Sequence[float] | None = None
    full_accuracy_recalibrated: float | None = None


def plot_loafing(
    series: Sequence[LoafingSeries],
    title: str | None = None,
    chance: float | None = None,
    figsize: tuple[float, float] = (8.4, 4.4),
    dpi: int = 110,
) -> Figure:
    """Scatter of sub-network top-1 accuracy (%) against FLOP share (%), one colour per series.

    Filled circles are the sub-networks as they are (the full network's BatchNorm statistics), a
    star the full network, a dashed line each series' mean sub-network accuracy; hollow circles
    (and a hollow star, when given) the networks with BatchNorm statistics re-estimated for each.
    ``chance`` (e.g. ``1 / num_classes``) draws a dotted reference line.
    """
    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    colours = [f"C{i % 10}" for i in range(len(series))]
    any_recalibrated = False
    for colour, item in zip(colours, series, strict=True):
        shares = 100 * np.asarray(item.flop_shares, dtype=float)
        accuracies = 100 * np.asarray(item.accuracies, dtype=float)
        axes.scatter(shares, accuracies, color=colour, s=28, alpha=0.85, label=f"{item.label}: sub-networks")
        if len(accuracies):
            axes.axhline(accuracies.mean(), color=colour, linestyle="--", linewidth=1, alpha=0.7)
        axes.scatter(
            [100.0],
            [100 * item.full_accuracy],
            color=colour,
            marker="*",
            s=220,
            edgecolors="black",
            linewidths=0.6,
            zorder=3,
            label=f"{item.label}: full network",
        )
        if item.recalibrated_accuracies is not None:
            any_recalibrated = True
            axes.scatter(
                shares,
                100 * np.asarray(item.recalibrated_accuracies, dtype=float),
                facecolors="none",
                edgecolors=colour,
                s=40,
                linewidths=1.2,
            )
        if item.full_accuracy_recalibrated is not None:
            axes.scatter(
                [100.0],
                [100 * item.full_accuracy_recalibrated],
                marker="*",
                s=220,
                facecolors="none",
                edgecolors=colour,
                linewidths=1.2,
                zorder=3,
            )
    if chance is not None:
        axes.axhline(100 * chance, color="grey", linestyle=":", linewidth=1, label="chance")
    if any_recalibrated:
        axes.scatter(
            [], [], facecolors="none", edgecolors="black", s=40, label="hollow: BN re-estimated per sub-network"
        )
    axes.set_xlabel("share of the full network's FLOPs (%)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_ylim(0, 100)
    axes.grid(True, alpha=0.3)
    axes.set_xlim(right=104)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    axes.set_title(title or "Loafing: sub-networks on their own (dashed: mean)", fontsize=10)
    figure.tight_layout()
    return figure


def figure_to_array(figure: Figure) -> np.ndarray:
    """Render ``figure`` to an ``(H, W, 3)`` uint8 RGB array (for ``SummaryWriter.add_image``)."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG to ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
