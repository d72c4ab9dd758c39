"""Exporting the pick of a search as a standalone model whose card says how it was chosen."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from stim_hf.analysis.scoring import reestimate_batchnorm
from stim_hf.data.image_datasets import DataArguments, EvaluationDataArguments
from stim_hf.method import ResidualFamily, ResidualStage, find_residual_family
from stim_hf.method.batchnorm import batchnorm_state, restore_batchnorm_state
from stim_hf.tools.export import export_subnet, push_export, write_export_record
from stim_hf.tools.search.images import SearchImages
from stim_hf.tools.search.results import Candidate, CheckpointSearch, SearchResult


def export_pick(
    model: PreTrainedModel,
    stages: Sequence[ResidualStage],
    candidate: Candidate,
    images: SearchImages,
    output_dir: str | os.PathLike,
    checkpoint: CheckpointSearch,
    result: SearchResult,
    command: str | None = None,
) -> PreTrainedModel:
    """Export ``candidate`` with the BatchNorm statistics it was scored with, and describe the search in its card.

    Re-estimates the statistics of ``model`` run as the candidate, on the search's re-estimation
    images at its input size, exports through :func:`stim_hf.tools.export.export_subnet` (the search's
    record added before the folder is sealed with its hashes) and restores ``model``'s statistics.
    The image processor comes from the search's data arguments (the preprocessing the candidates
    were scored with) at the candidate's input size, so ``pipeline("image-classification")`` runs
    the export as it was scored. The card and
    ``export_info.json`` get the accuracy, FLOPs, parameters, latency, input size and depths; with
    ``push_to_hub`` in the search's settings the folder is then uploaded.
    """
    family = find_residual_family(model)[0]
    size = candidate.input_size
    saved = batchnorm_state(model)
    try:
        if images.num_recalibration:
            kwargs = {} if size == images.full_size else family.resized_forward_kwargs
            reestimate_batchnorm(model, images.at(size).recalibration, stages, candidate.subnet, kwargs)
        exported = export_subnet(
            model, list(candidate.depths), output_dir, recalibrate_bn=0, data_args=search_data_arguments(result),
            seed=result.settings["seed"], command=command, overwrite=result.settings["overwrite"],
            input_size=size if _runs_alone_at(family, size, images.full_size) else None,
            describe=lambda folder: _describe_export(folder, checkpoint, candidate, result),
        )  # fmt: skip
    finally:
        restore_batchnorm_state(model, saved)
    if result.settings.get("push_to_hub"):
        push_export(output_dir, result.settings["push_to_hub"])
    return exported


def search_data_arguments(result: SearchResult) -> DataArguments | None:
    """The data arguments the search ran with, rebuilt from its settings (None when it recorded none)."""
    recorded = result.settings.get("data") or {}
    names = {f.name for f in fields(EvaluationDataArguments) if f.init}
    values = {key: value for key, value in recorded.items() if key in names}
    return EvaluationDataArguments(**values) if values else None


def _runs_alone_at(family: ResidualFamily, size: int, full_size: int) -> bool:
    """Whether a standalone model of ``family`` runs at input side ``size`` without extra forward arguments."""
    return size == full_size or (family.supports_smaller_inputs and not family.resized_forward_kwargs)


def _describe_export(folder: Path, checkpoint: CheckpointSearch, candidate: Candidate, result: SearchResult) -> None:
    """Add the search to the export's ``export_info.json`` and rewrite its model card from it."""
    settings = result.settings
    info = json.loads((folder / "export_info.json").read_text())
    info["bn_recalibration_samples"] = settings["num_recalibration_images"]
    info["input_size"] = candidate.input_size
    described: dict[str, Any] = {
        "budget": settings["budget"],
        "pick_margin": settings.get("pick_margin", 0.0),
        "checkpoint": checkpoint.label,
        "scored_on": settings["scored_on"],
        "score_split": settings["score_split"],
        "num_candidates_scored": len(checkpoint.candidates),
        "strategy": checkpoint.strategy,
        "device": settings["device"],
        "torch_threads": settings["torch_threads"],
        "eval_image_size": settings["eval_image_size"],
        "serving_batch_size": settings["serving_batch_size"],
        "latency_warmup": settings["latency_warmup"],
        "latency_repeats": settings["latency_repeats"],
    }
    info["search"] = {**described, **candidate.record(checkpoint.full_flops, checkpoint.full_params)}
    best = checkpoint.most_accurate
    if best is not None and best is not candidate:
        info["search"]["most_accurate"] = best.record(checkpoint.full_flops, checkpoint.full_params)
    write_export_record(folder, info)
