"""One model for every point of a searched front: switch depth, BatchNorm statistics and input size at run time.

A budget-switching folder (``stim-hf export CHECKPOINT --front SEARCH_DIR``) holds the full network's
weights once and, for each point of the search's front, which blocks it keeps, the input side it
runs at and its own re-estimated BatchNorm statistics (segments of one ``budget_statistics.pool``
tensor, each distinct segment stored once).
:class:`BudgetSwitchingMixin` gives a model class :meth:`~BudgetSwitchingMixin.set_budget`: moving
to a point changes which blocks run, which statistics the BatchNorm layers use and the size the
input is resized to, and nothing is re-estimated at load or switch time.

Self-contained (torch and transformers only): the export copies this file beside the weights, with
a small ``modeling_budget_switching.py`` that puts the mixin in front of the family's own class, so
the folder loads with ``trust_remote_code=True`` where stim_hf is not installed.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "BudgetError",
    "BudgetSwitchingMixin",
    "resize_to_side",
    "running_batchnorm_indices",
    "share_weight_renamings",
]

STATISTICS_MODULE = "budget_statistics"
"""Name of the submodule that holds every point's BatchNorm statistics."""


class BudgetError(ValueError):
    """No point of the front fits a budget, or a point or budget is named wrongly; the message names the fix."""


def resize_to_side(pixel_values: Tensor, side: int) -> Tensor:
    """Resize a batch to height ``side`` (bilinear, no antialiasing, the width keeping the aspect ratio).

    The resize stimulative training applies to a sub-network's batch, and the one the search scored
    the front with; a batch already ``side`` high is returned as is.
    """
    height, width = pixel_values.shape[-2], pixel_values.shape[-1]
    if height == side:
        return pixel_values
    new_width = side if height == width else max(1, round(int(width) * side / int(height)))
    return F.interpolate(pixel_values, size=(side, new_width), mode="bilinear", align_corners=False)


def share_weight_renamings(base_type: str, budget_type: str) -> None:
    """Let ``budget_type`` load (and save) weights under the key names ``base_type``'s folders use.

    transformers 5 renames some families' saved keys when it loads them (and back when it saves),
    looked up by ``model_type``; the switching folder's type is the family's with ``_budget``, so
    it needs the same renamings (without them a Swin, for one, would load with its blocks missing).
    Older transformers have no such table: nothing to do.
    """
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:
        return
    mapping = get_checkpoint_conversion_mapping(base_type)
    if mapping:
        register_checkpoint_conversion_mapping(budget_type, mapping, overwrite=True)


def running_batchnorm_indices(model: nn.Module, stage_paths: list[str], kept: list[list[int]]) -> list[int]:
    """Indices (module order) of the BatchNorm layers tracking statistics that a point runs: those outside the blocks
    it drops (``kept[s]``: the indices kept in the container at ``stage_paths[s]``). The export writes a point's
    statistics for these layers, and the model reads them back for the same ones."""
    dropped = tuple(
        f"{path}.{key}."
        for path, keep in zip(stage_paths, kept, strict=True)
        for index, key in enumerate(model.get_submodule(path)._modules)
        if index not in keep
    )
    names = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    return [j for j, name in enumerate(names) if not f"{name}.".startswith(dropped)]


class BudgetSwitchingMixin:
    """Put in front of an image classifier whose config carries a front (``budget_front``); adds :meth:`set_budget`.

    The config fields it reads: ``budget_front`` (one dict per point: ``name``, ``kept`` block
    indices per stage, ``input_size``, ``flops``, ``flop_share``, ``latency_ms``, ``accuracy``,
    ``statistics``: ``[layer, offset]`` for every BatchNorm layer it runs, in module order),
    ``budget_statistics_size`` (the pool's length),
    ``budget_stages`` (the module path of each stage's block container), ``budget_trained_size``
    (the input side the full network was trained at) and ``budget_point`` (the active point's name,
    saved with the model). Meant for inference (``eval()``): in train mode the BatchNorm layers
    would update the active point's statistics.
    """

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        """Build the family's model, then the per-point statistics buffers, and activate ``config.budget_point``."""
        super().__init__(config, *args, **kwargs)
        front = getattr(config, "budget_front", None)
        stages = getattr(config, "budget_stages", None)
        if not front or not stages:
            raise BudgetError(
                "this config has no budget_front / budget_stages: it is not a budget-switching model; write one with "
                "'stim-hf export CHECKPOINT --front SEARCH_DIR --output DIR'"
            )
        self._budget_containers = [self.get_submodule(path) for path in stages]
        for path, container in zip(stages, self._budget_containers, strict=True):
            if not isinstance(getattr(container, "_modules", None), dict) or not len(container._modules):
                raise BudgetError(f"budget_stages names '{path}', which holds no blocks")
        named = [(n, m) for n, m in self.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        self._budget_bn_layers = [m for _, m in named]
        self._budget_statistics: list[list[tuple[int, int, int]]] = []  # per point: (layer, offset, features)
        for point in front:
            self._check_point(point)
            active = running_batchnorm_indices(self, stages, point["kept"])
            offsets = {int(j): int(offset) for j, offset in point["statistics"]}
            if sorted(offsets) != active:
                raise BudgetError(
                    f"point {point['name']!r} has statistics for BatchNorm layers {sorted(offsets)}, but runs "
                    f"{active}: the folder does not belong to this model; export it again"
                )
            self._budget_statistics.append([(j, offsets[j], named[j][1].num_features) for j in active])
        size = int(config.budget_statistics_size)
        if any(offset + n > size for point in self._budget_statistics for _, offset, n in point):
            raise BudgetError("budget_statistics_size is smaller than the points' statistics: export the folder again")
        statistics = nn.Module()
        # Every point's running means (row 0) and variances (row 1), each distinct segment once: points that share
        # the layers before their first difference share those layers' statistics exactly.
        statistics.register_buffer("pool", torch.zeros(2, size))
        self.add_module(STATISTICS_MODULE, statistics)
        names = [p["name"] for p in front]
        if len(set(names)) != len(names):
            raise BudgetError(f"budget_front has repeated point names: {names}")
        self._budget_index = names.index(config.budget_point) if config.budget_point in names else self._best_index()

    # ------------------------------------------------------------------------------------------------
    # Choosing a point
    # ------------------------------------------------------------------------------------------------

    @property
    def budget_points(self) -> list[dict[str, Any]]:
        """Every point of the front (cheapest first), as recorded at export: name, kept blocks, size, costs, accuracy."""
        return [dict(p) for p in self.config.budget_front]

    @property
    def active_budget(self) -> dict[str, Any]:
        """The point the model runs now."""
        return dict(self.config.budget_front[self._budget_index])

    def set_budget(
        self, point: str | None = None, *, flops: float | None = None, latency_ms: float | None = None
    ) -> dict[str, Any]:
        """Run the model as one point of the front from now on; returns that point.

        Exactly one of: ``point`` (a point's name), ``flops`` (the most accurate point whose FLOPs
        are at most this share of the full network's when <= 1, else this many FLOPs), or
        ``latency_ms`` (the most accurate point whose latency, as measured at export, is at most
        this). A budget no point fits raises :class:`BudgetError` naming the cheapest point.
        """
        given = [
            name
            for name, value in (("point", point), ("flops", flops), ("latency_ms", latency_ms))
            if value is not None
        ]
        if len(given) != 1:
            raise BudgetError(f"set_budget takes exactly one of point=, flops=, latency_ms= (got {given or 'none'})")
        front = self.config.budget_front
        if point is not None:
            names = [p["name"] for p in front]
            if point not in names:
                raise BudgetError(f"no front point is named {point!r}; the points are {', '.join(names)}")
            index = names.index(point)
        else:
            key, limit = ("flops", flops) if flops is not None else ("latency_ms", latency_ms)
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
                raise BudgetError(f"set_budget({key}={limit!r}): the budget must be a positive number")
            fits = [i for i, p in enumerate(front) if self._cost(p, key, limit) <= limit]
            if not fits:
                raise BudgetError(self._none_fits(key, limit))
            index = max(fits, key=lambda i: (front[i]["accuracy"] or 0.0, -front[i]["flops"]))
        self._budget_index = index
        self.config.budget_point = front[index]["name"]
        return self.active_budget

    def _best_index(self) -> int:
        front = self.config.budget_front
        return max(range(len(front)), key=lambda i: (front[i]["accuracy"] or 0.0, -front[i]["flops"]))

    @staticmethod
    def _cost(point: dict[str, Any], key: str, limit: float) -> float:
        if key == "flops":
            return point["flop_share"] if limit <= 1 else point["flops"]
        return math.inf if point.get("latency_ms") is None else point["latency_ms"]

    def _none_fits(self, key: str, limit: float) -> str:
        front = self.config.budget_front
        if key == "latency_ms" and all(p.get("latency_ms") is None for p in front):
            return "set_budget(latency_ms=...): this front has no latencies (the search measured none); use flops="
        cheapest = min(front, key=lambda p: self._cost(p, key, math.inf if key == "flops" and limit > 1 else 1.0))
        asked = f"{100 * limit:.1f} % of the full network's FLOPs" if key == "flops" and limit <= 1 else f"{limit:g}"
        return (
            f"no front point fits {key} <= {asked}; the cheapest is {cheapest['name']!r}: "
            f"{100 * cheapest['flop_share']:.1f} % of the FLOPs"
            + (f", {cheapest['latency_ms']:.2f} ms" if cheapest.get("latency_ms") is not None else "")
            + (f", held-out top-1 {100 * cheapest['accuracy']:.2f} %" if cheapest.get("accuracy") is not None else "")
        )

    def _check_point(self, point: dict[str, Any]) -> None:
        missing = [
            k for k in ("name", "kept", "input_size", "flops", "flop_share", "accuracy", "statistics") if k not in point
        ]
        if missing:
            raise BudgetError(f"budget_front point {point.get('name', point)!r} lacks {missing}")
        kept = point["kept"]
        if len(kept) != len(self._budget_containers):
            raise BudgetError(
                f"point {point['name']!r} keeps blocks of {len(kept)} stages, the model has {len(self._budget_containers)}"
            )
        for s, (indices, container) in enumerate(zip(kept, self._budget_containers, strict=True)):
            if (
                not indices
                or any(not 0 <= i < len(container._modules) for i in indices)
                or list(indices) != sorted(set(indices))
            ):
                raise BudgetError(f"point {point['name']!r}: kept blocks {indices} of stage {s} are not valid indices")

    # ------------------------------------------------------------------------------------------------
    # Running a point
    # ------------------------------------------------------------------------------------------------

    @contextmanager
    def _budget_applied(self) -> Iterator[None]:
        """Inside the block, the stages hold the active point's blocks and BatchNorm layers use its statistics."""
        index = self._budget_index
        point = self.config.budget_front[index]
        pool = getattr(self, STATISTICS_MODULE).get_buffer("pool")
        saved_modules = [container._modules for container in self._budget_containers]
        saved_buffers = []
        try:
            for container, kept in zip(self._budget_containers, point["kept"], strict=True):
                keys = list(container._modules)
                container._modules = OrderedDict((keys[i], container._modules[keys[i]]) for i in kept)
            for j, offset, features in self._budget_statistics[index]:
                layer = self._budget_bn_layers[j]
                saved_buffers.append((layer, layer._buffers["running_mean"], layer._buffers["running_var"]))
                layer._buffers["running_mean"] = pool[0, offset : offset + features]
                layer._buffers["running_var"] = pool[1, offset : offset + features]
            yield
        finally:
            for container, modules in zip(self._budget_containers, saved_modules, strict=True):
                container._modules = modules
            for layer, mean, var in saved_buffers:
                layer._buffers["running_mean"], layer._buffers["running_var"] = mean, var

    def forward(self, pixel_values: Tensor | None = None, *args: Any, **kwargs: Any):
        """Classify ``pixel_values`` as the active point: resized to its input side, its blocks, its statistics."""
        point = self.config.budget_front[self._budget_index]
        if pixel_values is not None and point["input_size"] != self.config.budget_trained_size:
            pixel_values = resize_to_side(pixel_values, point["input_size"])
        with self._budget_applied():
            return super().forward(pixel_values, *args, **kwargs)
