"""What a search found: the scored candidates of each checkpoint, the fronts, the pick, and the report files."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from stim_hf.analysis.pareto import SearchSeries, plot_search, within_margin
from stim_hf.analysis.plotting import save_figure
from stim_hf.method import Subnet

REPORT_FILES = {"json": "pareto.json", "csv": "pareto.csv", "png": "pareto.png"}
"""File names the search writes in its output directory."""

CSV_COLUMNS = (
    "checkpoint",
    "depths",
    "kept",
    "input_size",
    "flops",
    "flop_share",
    "params",
    "param_share",
    "latency_ms",
    "serving_latency_ms",
    "accuracy",
    "loss",
    "scored_images",
    "within_budget",
    "pareto_flops",
    "pareto_latency",
    "pick",
)


@dataclass(eq=False)
class Candidate:
    """A scored sub-network: what it costs and how accurate it is (fractions)."""

    subnet: Subnet
    flops: int
    params: int
    accuracy: float | None = None
    loss: float | None = None
    latency_ms: float | None = None
    serving_latency_ms: float | None = None
    scored_images: int | None = None
    within_budget: bool = True
    pareto_flops: bool = False
    pareto_latency: bool = False
    hits: Any = field(default=None, repr=False)  # which scored images it got right (the margins' paired errors)

    @property
    def depths(self) -> tuple[int, ...]:
        """Kept blocks per stage."""
        return self.subnet.depths

    @property
    def input_size(self) -> int:
        """Input side the sub-network runs at."""
        return int(self.subnet.input_size)

    def record(self, full_flops: int, full_params: int) -> dict[str, Any]:
        """The candidate as a JSON-able dict."""
        return {
            "depths": list(self.depths),
            "kept": [list(k) for k in self.subnet.kept],
            "input_size": self.input_size,
            "flops": self.flops,
            "flop_share": self.flops / full_flops,
            "params": self.params,
            "param_share": self.params / full_params,
            "latency_ms": self.latency_ms,
            "serving_latency_ms": self.serving_latency_ms,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "scored_images": self.scored_images,
            "within_budget": self.within_budget,
            "pareto_flops": self.pareto_flops,
            "pareto_latency": self.pareto_latency,
        }


def pick_candidate(candidates: Sequence[Candidate], margin: float = 0.0) -> Candidate | None:
    """The pick among ``candidates`` scored on the same images (None if there are none).

    The most accurate (ties: fewer FLOPs, lower loss, the smaller input, fewer blocks); with
    ``margin`` > 0 the one with the fewest FLOPs among those the most accurate does not beat by more
    than ``margin`` paired standard errors (:func:`~stim_hf.analysis.pareto.within_margin`), so that
    a lead of a few images does not buy a dearer sub-network.
    """
    if not candidates:
        return None
    best = min(candidates, key=lambda c: (-c.accuracy, c.flops, c.loss, c.input_size, c.subnet.kept))
    if margin <= 0 or len(candidates) == 1:
        return best
    if any(c.hits is None or len(c.hits) != len(best.hits) for c in candidates):
        raise ValueError("a pick margin needs every candidate's hits on the same scored images")
    candidates = list(candidates)
    close = [candidates[i] for i in within_margin([c.hits for c in candidates], candidates.index(best), margin)]
    return min(close, key=lambda c: (c.flops, -c.accuracy, c.loss, c.input_size, c.subnet.kept))


@dataclass
class CheckpointSearch:
    """The search over one checkpoint: every scored candidate, the fronts and the pick."""

    label: str
    path: str
    family: str
    model_class: str
    full_flops: int
    full_params: int
    full_size: int
    strategy: str
    sharing: str
    space_size: int
    candidates: list[Candidate]
    pick: Candidate | None
    timing: dict[str, Any] = field(default_factory=dict)
    most_accurate: Candidate | None = None  # under the budget; differs from the pick only with a pick margin

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's part of ``pareto.json``."""
        record = lambda c: c.record(self.full_flops, self.full_params)  # noqa: E731
        return {
            "label": self.label,
            "path": self.path,
            "family": self.family,
            "model_class": self.model_class,
            "full_network": {"flops": self.full_flops, "params": self.full_params, "input_size": self.full_size},
            "strategy": self.strategy,
            "sharing": self.sharing,
            "num_candidates_in_space": self.space_size,
            "num_scored": len(self.candidates),
            "pick": None if self.pick is None else record(self.pick),
            "most_accurate": None if self.most_accurate is None else record(self.most_accurate),
            "pareto_flops": [record(c) for c in sorted(self.candidates, key=_by_flops) if c.pareto_flops],
            "pareto_latency": [record(c) for c in sorted(self.candidates, key=_by_latency) if c.pareto_latency],
            "timing_s": self.timing,
        }


def _by_flops(candidate: Candidate) -> tuple:
    return (candidate.flops, -(candidate.accuracy or 0.0))


def _by_latency(candidate: Candidate) -> tuple:
    return (candidate.latency_ms if candidate.latency_ms is not None else math.inf, -(candidate.accuracy or 0.0))


@dataclass
class SearchResult:
    """What :func:`search_subnets` found: settings, one :class:`CheckpointSearch` per checkpoint, the pick."""

    settings: dict[str, Any]
    checkpoints: list[CheckpointSearch]

    @property
    def pick(self) -> tuple[CheckpointSearch, Candidate] | None:
        """One checkpoint's pick: the most accurate of them; with a pick margin, the one with the fewest FLOPs
        within the margin of the most accurate candidate of any checkpoint (:func:`pick_candidate`: the deficit
        is judged against that candidate, so margins do not add up). Where the rule ties, the first checkpoint's."""
        picks = [(c, c.pick) for c in self.checkpoints if c.pick is not None]
        if not picks:
            return None
        best = pick_candidate([c.most_accurate or pick for c, pick in picks])
        chosen = pick_candidate([best, *(pick for _, pick in picks)], self.settings.get("pick_margin", 0.0))
        return next(
            (item for item in picks if item[1] is chosen),
            next(item for item in picks if best in (item[0].most_accurate, item[1])),
        )

    def to_dict(self) -> dict[str, Any]:
        """What ``pareto.json`` holds."""
        overall = self.pick
        return {
            "settings": self.settings,
            "checkpoints": [c.to_dict() for c in self.checkpoints],
            "pick": None
            if overall is None
            else {"checkpoint": overall[0].label, **overall[1].record(overall[0].full_flops, overall[0].full_params)},
        }

    def rows(self) -> list[dict[str, Any]]:
        """Every candidate of every checkpoint as a CSV row (:data:`CSV_COLUMNS`)."""
        rows = []
        for checkpoint in self.checkpoints:
            for candidate in checkpoint.candidates:
                record = candidate.record(checkpoint.full_flops, checkpoint.full_params)
                rows.append(
                    {
                        "checkpoint": checkpoint.label,
                        **{k: record[k] for k in CSV_COLUMNS if k in record},
                        "depths": ",".join(map(str, record["depths"])),
                        "kept": "|".join("-".join(map(str, k)) for k in record["kept"]),
                        "pick": candidate is checkpoint.pick,
                    }
                )
        return rows

    def write(self, output_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``pareto.json``, ``pareto.csv`` and ``pareto.png`` into ``output_dir``; return their paths."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        paths = {kind: output_dir / name for kind, name in REPORT_FILES.items()}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        with paths["csv"].open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for row in self.rows():
                writer.writerow({k: "" if v is None else v for k, v in row.items()})
        save_figure(self.figure(), paths["png"])
        return paths

    def figure(self) -> Figure:
        """The plot of accuracy against FLOPs and latency (a matplotlib ``Figure``)."""
        series = []
        for checkpoint in self.checkpoints:
            candidates = checkpoint.candidates
            index = {id(c): i for i, c in enumerate(candidates)}
            series.append(
                SearchSeries(
                    label=checkpoint.label,
                    flops=[c.flops for c in candidates],
                    latencies_ms=[c.latency_ms for c in candidates],
                    accuracies=[c.accuracy for c in candidates],
                    front_flops=[index[id(c)] for c in sorted(candidates, key=_by_flops) if c.pareto_flops],
                    front_latency=[index[id(c)] for c in sorted(candidates, key=_by_latency) if c.pareto_latency],
                    pick=None if checkpoint.pick is None else index[id(checkpoint.pick)],
                )
            )
        limits = {limit["key"]: limit for limit in self.settings.get("budget_limits_parsed", [])}
        flops_limit = None
        if "flops" in limits and len({c.full_flops for c in self.checkpoints}) == 1:
            flops_limit = _limit_value(limits["flops"], self.checkpoints[0].full_flops) / 1e6
        latency_limit = limits["latency_ms"]["value"] if "latency_ms" in limits else None
        where = self.settings.get("device", "")
        if self.settings.get("latency_runtime") == "onnxruntime":  # timed as ONNX files (search.run)
            where = f"ONNX Runtime, {self.settings.get('latency_device', 'cpu')}"
        return plot_search(
            series,
            budget_flops=flops_limit,
            budget_latency_ms=latency_limit,
            latency_label=f"latency, batch 1, {where} (ms)",
        )

    def summary(self) -> str:
        """A Markdown table: per checkpoint, the pick (or the best) and the front's size."""
        runtime = " ONNX Runtime" if self.settings.get("latency_runtime") == "onnxruntime" else ""
        lines = [
            f"| checkpoint | pick: depths | input | FLOPs (share) | params | latency{runtime} (ms) | top-1 (held-out) "
            "| front |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in self.checkpoints:
            front = sum(candidate.pareto_flops for candidate in c.candidates)
            if c.pick is None:
                lines.append(f"| {c.label} | none under the budget | | | | | | {front} |")
                continue
            p = c.pick
            latency = "n/a" if p.latency_ms is None else f"{p.latency_ms:.2f}"
            lines.append(
                f"| {c.label} | {','.join(map(str, p.depths))} | {p.input_size} | {p.flops / 1e6:.2f}M "
                f"({100 * p.flops / c.full_flops:.0f}%) | {p.params:,} | {latency} | {100 * p.accuracy:.2f}% | {front} |"
            )
        margin = self.settings.get("pick_margin", 0.0)
        for c in self.checkpoints:
            best = c.most_accurate
            if best is not None and best is not c.pick:
                lines.append(
                    f"\n{c.label}: the most accurate under the budget is {','.join(map(str, best.depths))} at "
                    f"{best.input_size} px, {100 * best.accuracy:.2f}% at {100 * best.flops / c.full_flops:.0f}% of "
                    f"the FLOPs; the pick (--pick-margin {margin:g}) is {100 * (best.accuracy - c.pick.accuracy):.2f} "
                    f"points behind at {100 * c.pick.flops / best.flops:.0f}% of its FLOPs."
                )
        return "\n".join(lines)


def _limit_value(limit: dict[str, Any], full: float) -> float:
    return limit["value"] * full if limit["share"] else limit["value"]
