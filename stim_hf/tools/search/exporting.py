"""Exporting the pick of a search as a standalone model whose card says how it was chosen."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import PreTrainedModel

from stim_hf.analysis.scoring import reestimate_batchnorm
from stim_hf.method import ResidualStage, find_residual_family
from stim_hf.method.batchnorm import batchnorm_state, restore_batchnorm_state
from stim_hf.tools.export import export_subnet
from stim_hf.tools.search.results import Candidate, CheckpointSearch, SearchResult

if TYPE_CHECKING:
    from stim_hf.tools.search.run import SearchImages


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
    images at its input size, exports through :func:`stim_hf.tools.export.export_subnet` and restores
    ``model``'s statistics. The card and ``export_info.json`` get the accuracy, FLOPs, parameters,
    latency, input size and depths.
    """
    saved = batchnorm_state(model)
    try:
        size = candidate.input_size
        if images.num_recalibration:
            kwargs = {} if size == images.full_size else find_residual_family(model)[0].resized_forward_kwargs
            reestimate_batchnorm(model, images.at(size).recalibration, stages, candidate.subnet, kwargs)
        exported = export_subnet(
            model, list(candidate.depths), output_dir, recalibrate_bn=0, seed=result.settings["seed"],
            command=command, overwrite=result.settings["overwrite"],
        )  # fmt: skip
    finally:
        restore_batchnorm_state(model, saved)
    _describe_export(Path(output_dir), checkpoint, candidate, result)
    return exported


def _describe_export(folder: Path, checkpoint: CheckpointSearch, candidate: Candidate, result: SearchResult) -> None:
    """Add the search to the export's ``export_info.json`` and model card."""
    settings = result.settings
    record = candidate.record(checkpoint.full_flops, checkpoint.full_params)
    info_path = folder / "export_info.json"
    info = json.loads(info_path.read_text())
    info["bn_recalibration_samples"] = settings["num_recalibration_images"]
    info["input_size"] = candidate.input_size
    info["search"] = {
        "budget": settings["budget"],
        "checkpoint": checkpoint.label,
        "scored_on": settings["scored_on"],
        "num_candidates_scored": len(checkpoint.candidates),
        "strategy": checkpoint.strategy,
        "device": settings["device"],
        "torch_threads": settings["torch_threads"],
        **record,
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")

    card_path = folder / "README.md"
    card = card_path.read_text()
    recal = settings["num_recalibration_images"]
    if recal:
        bn_text = (
            f"Re-estimated for this sub-network at its input size ({candidate.input_size} px) on {recal:,} training "
            f"images (seed {settings['seed']}, training transforms) by `stim-hf search`: the exact statistics of "
            "those images, pooled over all batches. These are the statistics it was scored with."
        )
        card = re.sub(r"(## BatchNorm statistics\n\n)(.*?)(\n\n## |\n*$)", lambda m: m.group(1) + bn_text + m.group(3),
                      card, count=1, flags=re.S)  # fmt: skip
    latency = lambda v: "not measured" if v is None else f"{v:.3f} ms"  # noqa: E731
    budget = settings["budget"] or "none (the most accurate sub-network)"
    section = [
        "",
        "## Search",
        "",
        f"Chosen by `stim-hf search` from checkpoint `{checkpoint.label}` as the most accurate of "
        f"{len(checkpoint.candidates):,} scored sub-networks ({checkpoint.strategy}) under the budget "
        f"`{budget}`.",
        "",
        "| depths | input size | FLOPs per image | parameters | latency, batch 1 | "
        f"latency, batch {settings['serving_batch_size']} | top-1 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {','.join(map(str, candidate.depths))} | {candidate.input_size} px | {candidate.flops / 1e6:.2f}M "
        f"({100 * record['flop_share']:.1f}% of the full network) | {candidate.params:,} "
        f"({100 * record['param_share']:.1f}%) | {latency(candidate.latency_ms)} | "
        f"{latency(candidate.serving_latency_ms)} | {100 * candidate.accuracy:.2f}% |",
        "",
        f"Top-1 on {settings['scored_on']}"
        + (
            ", held out of the re-estimation images; the test split was not used."
            if settings["score_split"] == "train"
            else "."
        )
        + f" Latency: median of {settings['latency_repeats']} timed passes after {settings['latency_warmup']} "
        f"warm-up passes on {settings['device']} ({settings['torch_threads']} CPU threads).",
        "",
        f"The model expects {candidate.input_size} px inputs: resize the evaluation crop "
        f"({settings['eval_image_size']} px) to {candidate.input_size} px (bilinear), as the search did.",
    ]
    card_path.write_text(card.rstrip("\n") + "\n" + "\n".join(section) + "\n")
