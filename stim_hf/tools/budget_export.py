"""Exporting a searched front as one budget-switching model folder (``stim-hf export CHECKPOINT --front SEARCH_DIR``).

The folder holds the full network's weights once and, per point of the search's front, the kept
blocks, the input side and the BatchNorm statistics the search scored it with (re-estimated here
on the search's own re-estimation images, exactly as ``stim-hf search --export`` does for its
pick). It loads in plain transformers (``trust_remote_code=True``); ``model.set_budget(...)``
switches points (:mod:`stim_hf.models.budget_switching`). Before the folder is put in place, every
point is run from the written files against the standalone export of that point built in memory,
and the largest logit difference is recorded.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from stim_hf.analysis.scoring import reestimate_batchnorm
from stim_hf.data.transforms import build_image_processor
from stim_hf.errors import ConfigError, ModelStructureError
from stim_hf.method import ResidualFamily, ResidualStage, Subnet, find_residual_family
from stim_hf.method.batchnorm import batchnorm_layers, batchnorm_state, restore_batchnorm_state
from stim_hf.method.running import use_subnet
from stim_hf.models import budget_switching
from stim_hf.models.budget_switching import (
    STATISTICS_MODULE,
    BudgetSwitchingMixin,
    resize_to_side,
    running_batchnorm_indices,
    share_weight_renamings,
)
from stim_hf.tools.export import (
    build_subnet_model,
    check_output_dir,
    container_paths,
    load_checkpoint,
    write_model_folder,
)
from stim_hf.tools.model_cards import budget_card, hub_base_model, write_card
from stim_hf.tools.onnx_files import check_onnx_request, load_onnx_images, write_onnx_files
from stim_hf.tools.search.arguments import SearchArguments
from stim_hf.tools.search.exporting import search_data_arguments
from stim_hf.tools.search.images import SearchImages
from stim_hf.tools.search.results import REPORT_FILES, SearchResult
from stim_hf.training.modeling import without_transformers_progress_bars

logger = logging.getLogger(__name__)

WRAPPER_FILE = "modeling_budget_switching.py"
"""The small file that puts :class:`~stim_hf.models.budget_switching.BudgetSwitchingMixin` in front of the family's class."""

# A logit difference above this (relative to the logits' scale) between a point and its standalone export is an error.
CHECK_TOLERANCE = 1e-5

_WRAPPER = '''"""Budget switching for {model_class}, written by stim_hf (stim-hf export CHECKPOINT --front SEARCH_DIR).

Needs torch and transformers only: `budget_switching.py` beside it holds the switching logic.
"""

{config_import}
{model_import}

from .budget_switching import BudgetSwitchingMixin, share_weight_renamings

share_weight_renamings("{model_type}", "{model_type}_budget")


class BudgetSwitchingConfig({config_class}):
    """{config_class} with a front of points to switch between (budget_front, budget_stages, budget_point)."""

    model_type = "{model_type}_budget"


class BudgetSwitchingForImageClassification(BudgetSwitchingMixin, {model_class}):
    """{model_class} that runs any point of its front: model.set_budget(flops=0.3), set_budget(latency_ms=2)."""

    config_class = BudgetSwitchingConfig
'''


# --------------------------------------------------------------------------------------------------
# The front of a search
# --------------------------------------------------------------------------------------------------


def load_search(search_dir: str | os.PathLike) -> dict[str, Any]:
    """``pareto.json`` of a search folder; :class:`ConfigError` naming the folder when it has none or it is damaged."""
    path = Path(search_dir) / REPORT_FILES["json"]
    if not path.is_file():
        raise ConfigError(
            f"--front '{search_dir}' has no {REPORT_FILES['json']}: give the --output-dir of a 'stim-hf search' run"
        )
    try:
        record = json.loads(path.read_text())
        record["settings"], record["checkpoints"]  # noqa: B018
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"'{path}' is not a search record stim-hf search wrote ({err}); run the search again"
        ) from None
    return record


def searched_checkpoint(record: dict[str, Any], checkpoint: str | os.PathLike, search_dir) -> dict[str, Any]:
    """The part of ``record`` that searched ``checkpoint`` (matched by its resolved path)."""
    wanted = Path(checkpoint).resolve()
    for entry in record["checkpoints"]:
        if Path(entry["path"]).resolve() == wanted:
            return entry
    searched = ", ".join(f"'{e['path']}'" for e in record["checkpoints"]) or "none"
    raise ConfigError(
        f"the search in '{search_dir}' did not search '{checkpoint}' (it searched {searched}); give the checkpoint it "
        "searched, or search this one"
    )


def point_name(record: dict[str, Any]) -> str:
    """A front point's name: its depths (or kept blocks where not a prefix) and input side, e.g. ``1-1-2_13px``."""
    parts = []
    for kept in record["kept"]:
        parts.append(str(len(kept)) if kept == list(range(len(kept))) else ".".join(f"b{i}" for i in kept))
    return "-".join(parts) + f"_{record['input_size']}px"


def front_points(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The FLOPs front of one searched checkpoint as switching points (cheapest first)."""
    points = []
    for record in entry["pareto_flops"]:
        points.append(
            {
                "name": point_name(record),
                "kept": [list(k) for k in record["kept"]],
                "depths": list(record["depths"]),
                "input_size": int(record["input_size"]),
                "flops": int(record["flops"]),
                "flop_share": float(record["flop_share"]),
                "params": int(record["params"]),
                "latency_ms": record.get("latency_ms"),
                "accuracy": record.get("accuracy"),
            }
        )
    if not points:
        raise ConfigError("the search's FLOPs front is empty (no candidate was scored); nothing to export")
    return sorted(points, key=lambda p: p["flops"])


def search_images(record: dict[str, Any], device: torch.device):
    """The search's scored and re-estimation images, loaded again from its recorded data and seed."""
    settings = record["settings"]
    data_args = search_data_arguments(SearchResult(settings, []))
    if data_args is None:
        raise ConfigError("the search recorded no data arguments, so its re-estimation images cannot be loaded again")
    names = {f.name for f in fields(SearchArguments) if f.init}
    values = {k: v for k, v in settings.items() if k in names}
    values.update(export=None, push_to_hub=None, output_dir=None, progress=False, device=str(device))
    return SearchImages(data_args, SearchArguments(**values), device), data_args


# --------------------------------------------------------------------------------------------------
# Statistics and the folder
# --------------------------------------------------------------------------------------------------


class StatisticsPool:
    """Every point's BatchNorm statistics as segments of one ``(2, size)`` tensor, each distinct segment once.

    Points that share the layers before their first difference (the same input size, the same
    blocks so far) get bit-identical statistics for those layers from the exact re-estimation; they
    share one segment. On the quickstart's 16-point front this stores 11,520 of 17,984 numbers.
    """

    def __init__(self) -> None:
        self._segments: list[torch.Tensor] = []
        self._offsets: dict[bytes, int] = {}
        self.size = 0

    def offset_of(self, segment: torch.Tensor) -> int:
        """The offset of ``segment`` (``(2, features)``: mean, variance) in the pool, adding it when new."""
        key = segment.shape[1].to_bytes(8, "little") + segment.numpy().tobytes()
        if key not in self._offsets:
            self._offsets[key] = self.size
            self._segments.append(segment)
            self.size += segment.shape[1]
        return self._offsets[key]

    def tensor(self) -> torch.Tensor:
        """The pool as one contiguous ``(2, size)`` float tensor (``(2, 0)`` for a model without BatchNorm)."""
        return torch.cat(self._segments, dim=1).contiguous() if self._segments else torch.zeros(2, 0)


def _subnet(point: dict[str, Any], stages: Sequence[ResidualStage]) -> Subnet:
    return Subnet(
        kept=tuple(tuple(k) for k in point["kept"]),
        num_blocks=tuple(s.num_blocks for s in stages),
        input_size=point["input_size"],
    )


def switching_class(model_class: type[PreTrainedModel], config_class: type) -> type[PreTrainedModel]:
    """The class a switching folder's ``modeling_budget_switching.py`` defines for ``model_class``, built in memory.

    The mixin in front of the family's class, and a config class of type ``<model_type>_budget``
    that shares the family's weight renamings, as the generated file does.
    """
    base_type = config_class.model_type
    config = type("BudgetSwitchingConfig", (config_class,), {"model_type": f"{base_type}_budget"})
    share_weight_renamings(base_type, f"{base_type}_budget")
    return type("BudgetSwitchingForImageClassification", (BudgetSwitchingMixin, model_class), {"config_class": config})


def _wrapper_source(model: PreTrainedModel) -> str:
    """The ``modeling_budget_switching.py`` for ``model``'s class: native classes from transformers, others from their code."""
    model_class, config_class = type(model), type(model.config)
    imports = []
    for cls in (config_class, model_class):
        if cls.__module__.startswith("transformers."):
            imports.append(f"from transformers import {cls.__name__}")
        else:
            imports.append(f"from .{Path(inspect.getfile(cls)).stem} import {cls.__name__}")
    return _WRAPPER.format(
        model_class=model_class.__name__,
        config_class=config_class.__name__,
        config_import=imports[0],
        model_import=imports[1],
        model_type=model.config.model_type,
    )


def _check_family(model: PreTrainedModel, family: ResidualFamily, points: list[dict[str, Any]], full_size: int) -> None:
    if family.resized_forward_kwargs and any(p["input_size"] != full_size for p in points):
        raise ConfigError(
            f"{type(model).__name__} ({family.name}) needs extra forward arguments below its trained size, which a "
            "switching folder cannot pass through pipeline(); search it at its trained size only (--input-sizes "
            f"{full_size}) or export each point on its own"
        )
    if not type(model).__module__.startswith("transformers.") and getattr(type(model), "_auto_class", None) is None:
        raise ModelStructureError(
            f"{type(model).__name__} is neither a transformers class nor registered for an Auto class, so its code "
            "would not be saved beside the weights; register it (register_for_auto_class) to export a switching folder"
        )


def export_budget_model(
    checkpoint: str | os.PathLike,
    search_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    command: str | None = None,
    check_images: int = 64,
    onnx: bool = False,
    int8: bool = False,
) -> dict[str, Any]:
    """Write the budget-switching folder of ``checkpoint`` for the FLOPs front of the search in ``search_dir``.

    Every point gets the BatchNorm statistics the search scored it with (re-estimated on the
    search's images at its input size). The folder is written beside ``output_dir``, each point is
    run from it against its standalone export on ``check_images`` of the search's scored images
    (a difference above :data:`CHECK_TOLERANCE` of the logits' scale is an error and nothing is put
    in place), then it is sealed and moved in. ``onnx`` writes ``onnx/<point>.onnx`` for every
    point (the switching model at that point: it takes the processor's input and resizes it
    itself), checked in ONNX Runtime and timed; ``int8`` adds ``onnx/<point>.int8.onnx`` with
    validation top-1 before and after. Returns the folder's ``export_info.json`` record.
    """
    record = load_search(search_dir)
    entry = searched_checkpoint(record, checkpoint, search_dir)
    points = front_points(entry)
    check_onnx_request(onnx, int8, search_data_arguments(SearchResult(record["settings"], [])))
    if Path(checkpoint).resolve() == Path(output_dir).resolve():
        raise ConfigError(f"the output directory '{output_dir}' is the checkpoint itself; give another --output")
    check_output_dir(output_dir, overwrite)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_checkpoint(checkpoint).to(device).eval()
    family, stages = find_residual_family(model)
    full_size = int(entry["full_network"]["input_size"])
    _check_family(model, family, points, full_size)
    paths = container_paths(model, stages)
    images, data_args = search_images(record, device)
    if model.config.num_labels != len(images.label_names):
        raise ConfigError(
            f"'{checkpoint}' has {model.config.num_labels} classes, the search's data {len(images.label_names)}"
        )

    check_batch = torch.cat(images.at(full_size).images)[:check_images]
    pool = StatisticsPool()
    standalone_logits: list[torch.Tensor] = []
    saved = batchnorm_state(model)
    layers = batchnorm_layers(model)
    for point in points:
        subnet = _subnet(point, stages)
        size = point["input_size"]
        try:
            if images.num_recalibration:
                kwargs = {} if size == full_size else family.resized_forward_kwargs
                reestimate_batchnorm(model, images.at(size).recalibration, stages, subnet, kwargs)
            point["statistics"] = []
            for j in running_batchnorm_indices(model, paths, point["kept"]):
                segment = torch.stack([layers[j].running_mean, layers[j].running_var]).detach().float().cpu()
                point["statistics"].append([j, pool.offset_of(segment)])
            standalone_logits.append(_standalone_logits(model, family, stages, subnet, point, full_size, check_batch))
        finally:
            restore_batchnorm_state(model, saved)

    config_fields = {
        "budget_front": points,
        "budget_stages": paths,
        "budget_statistics_size": pool.size,
        "budget_trained_size": full_size,
        "budget_point": max(points, key=lambda p: (p["accuracy"] or 0.0, -p["flops"]))["name"],
    }
    info: dict[str, Any] = {
        "kind": "budget switching",
        "source": str(checkpoint),
        "base_model": hub_base_model(str(checkpoint)),
        "family": family.name,
        "model_class": type(model).__name__,
        "stages": [s.name for s in stages],
        "full_depths": [s.num_blocks for s in stages],
        "trained_size": full_size,
        "search": {
            "folder": str(search_dir),
            "scored_on": record["settings"].get("scored_on"),
            "num_recalibration_images": images.num_recalibration,
            "device": record["settings"].get("device"),
            "torch_threads": record["settings"].get("torch_threads"),
            "latency_runtime": record["settings"].get("latency_runtime", "pytorch"),
            "serving_batch_size": record["settings"].get("serving_batch_size"),
        },
        "points": points,
        "default_point": config_fields["budget_point"],
        "command": command,
    }
    processor = build_image_processor(data_args)
    seed = record["settings"]["seed"]
    onnx_images = load_onnx_images(data_args, seed, None, int8) if onnx else None

    def write(folder: Path) -> None:
        with without_transformers_progress_bars():
            model.save_pretrained(folder)
        processor.save_pretrained(folder)
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise ModelStructureError(
                f"{type(model).__name__} saved sharded weights; a switching folder needs one model.safetensors"
            )
        tensors = load_file(str(weights))
        info["size_bytes"] = {"full_model_weights": weights.stat().st_size}
        save_file({**tensors, f"{STATISTICS_MODULE}.pool": pool.tensor()}, str(weights), metadata={"format": "pt"})
        info["size_bytes"]["switching_weights"] = weights.stat().st_size
        shutil.copyfile(inspect.getfile(budget_switching), folder / "budget_switching.py")
        (folder / WRAPPER_FILE).write_text(_wrapper_source(model))
        config = json.loads((folder / "config.json").read_text())
        config.update(config_fields)
        config["model_type"] = f"{model.config.model_type}_budget"
        config["architectures"] = ["BudgetSwitchingForImageClassification"]
        stem = Path(WRAPPER_FILE).stem
        config["auto_map"] = {
            "AutoConfig": f"{stem}.BudgetSwitchingConfig",
            "AutoModelForImageClassification": f"{stem}.BudgetSwitchingForImageClassification",
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        switching, info["checks"] = _check_points(
            folder, type(model), type(model.config), points, standalone_logits, check_batch
        )
        if onnx_images is not None:
            info["onnx"] = {}
            for i, point in enumerate(points, 1):
                switching.set_budget(point["name"])
                record = write_onnx_files(switching, folder / "onnx", point["name"], onnx_images)
                info["onnx"][point["name"]] = record
                logger.info(
                    "ONNX %d of %d: %s, largest logit difference %.2g, batch 1 %.2f ms in ONNX Runtime",
                    i, len(points), record["file"], record["check"]["max_abs_diff"],
                    record["latency_ms"]["onnxruntime"]["batch_1"],
                )  # fmt: skip
        (folder / "export_info.json").write_text(json.dumps(info, indent=2) + "\n")
        write_card(folder, budget_card(folder, info))

    write_model_folder(output_dir, write, "the switching folder", "--output")
    extra = info["size_bytes"]["switching_weights"] - info["size_bytes"]["full_model_weights"]
    logger.info(
        "wrote %d front points to %s: %.2f %% more than the full model's weights",
        len(points), output_dir, 100 * extra / info["size_bytes"]["full_model_weights"],
    )  # fmt: skip
    return info


def _standalone_logits(
    model: PreTrainedModel,
    family: ResidualFamily,
    stages: Sequence[ResidualStage],
    subnet: Subnet,
    point: dict[str, Any],
    full_size: int,
    batch,
) -> torch.Tensor:
    """Logits of the point's standalone export (built in memory with the statistics now in ``model``) on ``batch``."""
    size = point["input_size"]
    resized_by_model = size != full_size and family.config_for_input_size is not None
    standalone = build_subnet_model(
        model, list(subnet.depths), family, resize_input_to=size if resized_by_model else None
    ) if subnet.kept == tuple(tuple(range(len(k))) for k in subnet.kept) else None  # fmt: skip
    with torch.no_grad():
        if standalone is None:  # not a prefix: no standalone export exists; run the full model as the point
            with use_subnet(stages, subnet):
                return model(pixel_values=resize_to_side(batch, size)).logits.detach().cpu()
        pixel_values = batch if resized_by_model or size == full_size else resize_to_side(batch, size)
        return standalone(pixel_values=pixel_values).logits.detach().cpu()


def _check_points(
    folder: Path,
    model_class: type[PreTrainedModel],
    config_class: type,
    points: list[dict[str, Any]],
    expected: list[torch.Tensor],
    batch: torch.Tensor,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Load the written ``folder`` and run every point against ``expected``; the model and the differences.

    The folder is loaded as transformers loads it for a user (its ``model_type``, its weight
    renamings), with stim_hf's own copy of the classes the folder's code holds, so nothing is run
    from disk (the package never trusts remote code; the suite runs the folder's own files without stim_hf).
    """
    with without_transformers_progress_bars():
        switching = switching_class(model_class, config_class).from_pretrained(folder).eval()
    switching.to(batch.device)
    differences = {}
    for point, want in zip(points, expected, strict=True):
        switching.set_budget(point["name"])
        with torch.no_grad():
            got = switching(pixel_values=batch).logits.detach().cpu()
        difference = float((got - want).abs().max())
        scale = float(want.abs().max()) or 1.0
        if difference > CHECK_TOLERANCE * scale:
            raise ModelStructureError(
                f"front point {point['name']} of the switching folder differs from its standalone export by "
                f"{difference:.3g} (logits up to {scale:.3g}); nothing was written. Please report this"
            )
        differences[point["name"]] = difference
    return switching, {
        "images": int(batch.shape[0]),
        "max_abs_diff_to_standalone": differences,
        "what": "each point run from the written folder against its standalone export, on the search's scored images",
    }
