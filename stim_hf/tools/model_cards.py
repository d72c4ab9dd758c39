"""Model cards (``README.md``) of the folders stim_hf writes: the Hub's metadata header and a body that says how to load them.

The header is the Hub's model-card YAML (written with ``huggingface_hub.ModelCardData``):
``library_name``, ``pipeline_tag``, ``tags``, ``datasets`` (only a Hub data set that was used),
``base_model`` (only a Hub repository id) and a ``model-index`` of the accuracies that were measured,
never others. The body says how to load the folder with transformers alone, stim_hf not installed.
Cards are built from measured records only: a training run's final evaluation, an export's
``export_info.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from stim_hf.data.builtin_datasets import is_builtin_dataset_name
from stim_hf.data.image_datasets import DataArguments
from stim_hf.tools.hub import PROCESSOR_FILE, code_files
from stim_hf.training.checkpointing import TRAINING_ARGS_JSON_NAME

CARD_NAME = "README.md"
BASE_TAGS = ("stim_hf", "stimulative-training", "sub-network")
# stim_method -> how a card names it.
METHODS = {"ct": "common training (no sub-networks)", "st": "stimulative training (ST)", "stpp": "ST++"}


# --------------------------------------------------------------------------------------------------
# Where the data and the model come from
# --------------------------------------------------------------------------------------------------


def describe_data(data_args: DataArguments, seed: int) -> dict[str, Any]:
    """Where the training and the validation images come from, in words, and the evaluation crop."""
    train = data_args.dataset_name or data_args.train_file or data_args.train_dir
    carved = f"{data_args.train_val_split:.0%} of the training data carved off (seed {seed})"
    if data_args.validation_file or data_args.validation_dir:
        validation = data_args.validation_file or data_args.validation_dir
    elif data_args.validation_split:
        validation = f"{train}, split '{data_args.validation_split}'"
    elif data_args.dataset_name and not is_builtin_dataset_name(data_args.dataset_name):
        validation = f"{train}: its 'validation' or 'test' split if it has one, else {carved}"
    else:
        validation = f"{train}: {carved}"
    return {
        "train": train,
        "validation": validation,
        "image_size": data_args.resolved_eval_image_size(),
        "type": data_kind(data_args),
        "hub_dataset": hub_dataset(data_args),
    }


def hub_dataset(data_args: DataArguments) -> str | None:
    """The Hub data set the images come from (``dataset_name`` when it is no builtin and no local folder), else None."""
    name = data_args.dataset_name
    if name is None or is_builtin_dataset_name(name) or os.path.exists(os.path.expanduser(name)):
        return None
    return name


def data_kind(data_args: DataArguments) -> str:
    """The ``dataset.type`` of a model-index entry: the Hub id, the builtin's name, or the loader of local files."""
    if data_args.dataset_name is not None:
        return hub_dataset(data_args) or (
            data_args.dataset_name if is_builtin_dataset_name(data_args.dataset_name) else "local"
        )
    files = data_args.train_file or data_args.validation_file
    if files:
        return "arrow" if str(files).endswith(".arrow") else "parquet"
    return "imagefolder"


def hub_base_model(source: str | os.PathLike | None) -> str | None:
    """The Hub repository a model came from: ``source`` itself when it is a repository id and no local folder,
    else the ``hub_model_id`` the training run in ``source`` pushed to; None when neither is known."""
    if not source:
        return None
    path = Path(os.path.expanduser(str(source)))
    if path.exists():
        for folder in (path, path.parent):  # a checkpoint-N folder, or the run's output_dir
            try:
                recorded = json.loads((folder / TRAINING_ARGS_JSON_NAME).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(recorded, dict) and recorded.get("push_to_hub") and recorded.get("hub_model_id"):
                return str(recorded["hub_model_id"])
        return None
    try:
        validate_repo_id(str(source))
    except HFValidationError:
        return None
    return str(source)


# --------------------------------------------------------------------------------------------------
# The header
# --------------------------------------------------------------------------------------------------


def accuracy_result(value: float, name: str, dataset: dict[str, str], metric_type: str = "accuracy") -> EvalResult:
    """One measured accuracy for the ``model-index`` (``dataset``: ``type``, ``name``, ``split``)."""
    return EvalResult(
        task_type="image-classification",
        task_name="Image classification",
        dataset_type=dataset["type"],
        dataset_name=dataset["name"],
        dataset_split=dataset["split"],
        metric_type=metric_type,
        metric_value=float(value),
        metric_name=name,
    )


def card_header(
    model_name: str,
    results: Sequence[EvalResult],
    tags: Sequence[str] = (),
    datasets: Sequence[str] = (),
    base_model: str | None = None,
) -> str:
    """The Hub metadata block (``---`` YAML ``---``) of a card: what the Hub indexes and shows beside the model."""
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=list(dict.fromkeys([*BASE_TAGS, *tags])),
        datasets=list(datasets) or None,
        base_model=base_model,
        model_name=model_name if results else None,
        eval_results=list(results) or None,
    )
    return f"---\n{data.to_yaml()}\n---\n"


# --------------------------------------------------------------------------------------------------
# Usage
# --------------------------------------------------------------------------------------------------


def usage_section(folder: str | os.PathLike, family: str | None = None, input_size: int | None = None) -> list[str]:
    """How to load the model in ``folder`` with transformers alone: the lines of the card's "Usage" section."""
    code = code_files(folder)
    has_processor = (Path(folder) / PROCESSOR_FILE).is_file()
    trust = ", trust_remote_code=True" if code else ""
    lines = ["## Usage", ""]
    if code:
        lines += [
            f"The folder holds the model's code ({', '.join(f'`{name}`' for name in code)}, needing only torch and "
            "transformers), so it loads with transformers alone, stim_hf not installed; `trust_remote_code=True` "
            "runs those files: read them first. Where stim_hf is imported, its own registered classes (the same "
            "code) load the folder instead.",
            "",
        ]
    elif family and family.startswith("timm"):
        lines += ["A transformers model class around a timm model: it loads with transformers and timm installed.", ""]
    else:
        lines += ["A model class that transformers ships: it loads with transformers alone.", ""]
    if has_processor:
        crop = f", centre crop to {input_size} px" if input_size else ""
        lines += [
            f"The folder's image processor prepares images (resize{crop}, normalisation):",
            "",
            "```python",
            "from transformers import pipeline",
            "",
            f'classify = pipeline("image-classification", model="path/to/this/folder"{trust})',
            'print(classify("image.png"))',
            "```",
        ]
    lines += [
        *([""] if has_processor else []),
        "```python",
        "from transformers import AutoModelForImageClassification",
        "",
        f'model = AutoModelForImageClassification.from_pretrained("path/to/this/folder"{trust})',
        "```",
    ]
    return lines


# --------------------------------------------------------------------------------------------------
# A training run's output folder
# --------------------------------------------------------------------------------------------------


def training_card(
    folder: str | os.PathLike,
    model_class: str,
    data_args: DataArguments,
    training: dict[str, Any],
    metrics: dict[str, Any],
    subnets: Sequence[dict[str, Any]] = (),
    base_model: str | None = None,
) -> str:
    """The ``README.md`` of a training run's output folder, from its final evaluation.

    ``training`` holds ``stim_method``, ``num_subnets`` and ``seed``; ``metrics`` the final
    evaluation (``eval_accuracy``, ``eval_top5_accuracy``, ``eval_samples`` and, with evaluated
    sub-networks, their means); ``subnets`` the per-sub-network results of ``evaluate_subnets``.
    """
    data = describe_data(data_args, training["seed"])
    dataset = {"type": data["type"], "name": data["validation"], "split": "validation"}
    method = training.get("stim_method") or "stpp"
    samples = subnets[0]["bn_recalibration_samples"] if subnets else 0
    bn = f"BatchNorm re-estimated on {samples} training images each" if samples else "BatchNorm inherited"
    results = [accuracy_result(metrics["eval_accuracy"], "Top-1 accuracy, full network", dataset)]
    if "eval_top5_accuracy" in metrics:
        results.append(
            accuracy_result(metrics["eval_top5_accuracy"], "Top-5 accuracy, full network", dataset, "top_5_accuracy")
        )
    if subnets:
        name = f"Top-1 accuracy, mean of {len(subnets)} sub-networks"
        results.append(accuracy_result(metrics["eval_subnet_accuracy_mean"], f"{name}, {bn}", dataset))
        if samples:
            results.append(
                accuracy_result(
                    metrics["eval_subnet_accuracy_mean_inherited_bn"], f"{name}, BatchNorm inherited", dataset
                )
            )
    title = f"{model_class} trained with {METHODS.get(method, method)}"
    lines = [
        card_header(
            title,
            results,
            tags=[method],
            datasets=[data["hub_dataset"]] if data["hub_dataset"] else (),
            base_model=base_model,
        ),
        f"# {title}",
        "",
        f"Trained with stim_hf (`stim_method: {method}`"
        + (f", {training['num_subnets']} sampled sub-network(s) per step" if training.get("num_subnets") else "")
        + f") on {data['train']}. Its residual stages can also run shallower: the sub-networks below are the "
        "same weights with blocks dropped.",
        "",
        "## Accuracy",
        "",
        f"On {metrics.get('eval_samples', 0):,} validation images ({data['validation']}), at {data['image_size']} px:",
        "",
        "| network | top-1 | top-5 |",
        "| --- | --- | --- |",
        f"| full network | {_pct(metrics['eval_accuracy'])} | {_pct(metrics.get('eval_top5_accuracy'))} |",
    ]
    if subnets:
        lines += [
            "",
            f"Sub-networks (depths: the first `depths[s]` blocks of each stage, or the blocks kept), {bn}"
            + (
                "; beside it with the full network's statistics (inherited), the papers' loafing measure:"
                if samples
                else ":"
            ),
            "",
            "| depths | share of blocks | top-1 | top-5 |" + (" top-1, inherited BatchNorm |" if samples else ""),
            "| --- | --- | --- | --- |" + (" --- |" if samples else ""),
        ]
        for r in subnets:
            row = f"| {_blocks(r)} | {r['depth_fraction']:.0%} | {_pct(r['accuracy'])} | "
            row += f"{_pct(r.get('top5_accuracy'))} |"
            lines.append(row + (f" {_pct(r['accuracy_inherited_bn'])} |" if samples else ""))
        mean = f"| mean of {len(subnets)} | | {_pct(metrics['eval_subnet_accuracy_mean'])} | |"
        lines.append(mean + (f" {_pct(metrics['eval_subnet_accuracy_mean_inherited_bn'])} |" if samples else ""))
    lines += [
        "",
        *usage_section(folder, input_size=data["image_size"]),
        "",
        "## Sub-networks as models of their own",
        "",
        "`stim-hf export` (stim_hf needed for that step only) writes one sub-network as a standalone model that "
        "loads the same way, its BatchNorm statistics re-estimated for it; `stim-hf search` finds the most accurate "
        "one under a FLOPs, parameter or latency budget.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# An exported sub-network
# --------------------------------------------------------------------------------------------------


def export_card(folder: str | os.PathLike, info: dict[str, Any]) -> str:
    """The ``README.md`` of an exported sub-network, from its ``export_info.json`` record ``info``."""
    depths = ",".join(map(str, info["depths"]))
    tuned = info.get("finetune")
    title = f"Sub-network depths={depths} of {info['source']}" + (", fine-tuned" if tuned else "")
    lines = [
        card_header(
            title,
            _export_results(info),
            tags=[info["family"].replace("_", "-")],
            datasets=[info["data"]["hub_dataset"]] if info.get("data", {}).get("hub_dataset") else (),
            base_model=info.get("base_model"),
        ),
        f"# {title}",
        "",
        f"A standalone {info['model_class']} exported with stim_hf from `{info['source']}` "
        f"({info['family']} family): it keeps the first `depths[s]` residual blocks of each stage of the "
        "full model, with their trained weights; everything else is copied unchanged."
        + (
            f" Then fine-tuned for {tuned['epochs']} epoch(s) towards the full model's outputs (`stim-hf finetune`, "
            "below)."
            if tuned
            else ""
        )
        + _input_text(info),
        "",
        "## Kept blocks",
        "",
        "| stage | blocks kept | of |",
        "| --- | --- | --- |",
    ]
    for name, kept, total in zip(info["stages"], info["depths"], info["full_depths"], strict=True):
        blocks = f"blocks 0-{kept - 1}" if kept > 1 else "block 0"
        lines.append(f"| `{name}` | {kept} ({blocks}) | {total} |")
    full, params = info["full_num_parameters"], info["num_parameters"]
    lines += [
        "",
        "## Parameters",
        "",
        f"{params:,} parameters, {100 * params / full:.1f}% of the full model's {full:,} "
        f"({info['dropped_block_parameters']:,} in the dropped blocks).",
        "",
        "## BatchNorm statistics",
        "",
        _batchnorm_text(info),
    ]
    if "metrics" in info:
        sub, ref = info["metrics"], info["full_metrics"]
        lines += [
            "",
            "## Accuracy",
            "",
            f"On {sub['num_samples']:,} validation images ({info['data']['validation']}), this sub-network at "
            f"{info['input_size']} px, the full model at {info['data']['image_size']} px:",
            "",
            "| model | top-1 | top-5 |",
            "| --- | --- | --- |",
            f"| this sub-network (depths={depths}) | {_pct(sub['accuracy'])} | {_pct(sub['top5_accuracy'])} |",
            f"| full model | {_pct(ref['accuracy'])} | {_pct(ref['top5_accuracy'])} |",
        ]
    if tuned:
        lines += ["", *_finetune_section(info)]
    if "search" in info:
        lines += ["", *_search_section(info)]
    if info.get("onnx"):
        lines += ["", *onnx_section({"model": info["onnx"]})]
    processor_size = (info.get("image_processor_size") or info["input_size"]) if info["image_processor"] else None
    lines += ["", *usage_section(folder, info["family"], processor_size)]
    if info.get("command"):
        lines += ["", "Exported with:", "", "```bash", info["command"], "```"]
    if tuned and tuned.get("command"):
        lines += ["", "Fine-tuned with:", "", "```bash", tuned["command"], "```"]
    return "\n".join(lines) + "\n"


def onnx_section(records: dict[str, dict[str, Any]], folder_prefix: str = "") -> list[str]:
    """The card's "ONNX" section: per file, its check against PyTorch, its latency in both runtimes, int8 before/after."""
    first = next(iter(records.values()))
    lines = [
        "## ONNX",
        "",
        f"Exported with torch {first['torch_version']} ({first['exporter']} exporter, opset {first['opset']}), checked "
        f"in ONNX Runtime {first['onnxruntime_version']} against PyTorch on {first['check']['images']} validation "
        f"images, and timed on the machine that exported it ({first['latency_device']}, {first['threads']} "
        f"thread(s), median of {first['repeats']} runs): measure yours.",
        "",
        "| file | max logit difference | PyTorch b1 / b32 (ms) | ONNX Runtime b1 / b32 (ms) | int8 file | top-1 fp32 -> int8 "
        "| int8 b1 / b32 (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for record in records.values():
        torch_ms, ort_ms = record["latency_ms"]["pytorch"], record["latency_ms"]["onnxruntime"]
        row = (
            f"| `{folder_prefix}{record['file']}` | {record['check']['max_abs_diff']:.2g} | "
            f"{torch_ms['batch_1']:.2f} / {torch_ms['batch_32']:.2f} | {ort_ms['batch_1']:.2f} / {ort_ms['batch_32']:.2f} |"
        )
        int8 = record.get("int8")
        if int8:
            top1, ms = int8["top1"], int8["latency_ms"]["onnxruntime_int8"]
            row += (
                f" `{folder_prefix}{int8['file']}` | {_pct(top1['fp32'])} -> {_pct(top1['int8'])} | "
                f"{ms['batch_1']:.2f} / {ms['batch_32']:.2f} |"
            )
        else:
            row += " - | - | - |"
        lines.append(row)
    int8 = next((r["int8"] for r in records.values() if r.get("int8")), None)
    if int8:
        lines += [
            "",
            f"int8: ONNX Runtime static quantization ({int8['format']}, weights {int8['weights']}, activations "
            f"{int8['activations']}), calibrated on {int8['calibration']['images']} training images; top-1 on "
            f"{int8['top1']['source']}.",
        ]
    lines += [
        "",
        "```python",
        "import onnxruntime",
        "",
        f'session = onnxruntime.InferenceSession("{folder_prefix}{first["file"]}")',
        'logits = session.run(["logits"], {"pixel_values": pixel_values.numpy()})[0]  # the image processor\'s output',
        "```",
    ]
    return lines


def budget_card(folder: str | os.PathLike, info: dict[str, Any]) -> str:
    """The ``README.md`` of a budget-switching folder: budget -> accuracy for every point, and the lines that switch."""
    search, points = info["search"], info["points"]
    title = f"{info['model_class']} of {info['source']}, switching between {len(points)} budgets"
    data = {"type": "local", "name": search.get("scored_on") or "held-out images", "split": "train (held out)"}
    results = [
        accuracy_result(p["accuracy"], f"Top-1 accuracy, front point {p['name']} (scored by stim-hf search)", data)
        for p in points
        if p.get("accuracy") is not None
    ]
    latency = f"latency (ms, batch 1, {search.get('latency_runtime', 'pytorch')} on {search.get('device')})"
    checks = info["checks"]["max_abs_diff_to_standalone"]
    lines = [
        card_header(
            title,
            results,
            tags=[info["family"].replace("_", "-"), "budget-switching"],
            base_model=info.get("base_model"),
        ),  # fmt: skip
        f"# {title}",
        "",
        f"One {info['model_class']} ({info['family']} family, trained with stim_hf) that runs any point of the front "
        f"its search found: the full weights once, and for each point the blocks it keeps, the input side it runs at "
        "and its own BatchNorm statistics, re-estimated once at export on the search's images. Switching changes "
        "which blocks run, which statistics BatchNorm uses and the size the input is resized to (bilinear, as in "
        "training); nothing is re-estimated at load or switch time.",
        "",
        "## Budget -> accuracy",
        "",
        f"Top-1 on {search.get('scored_on') or 'the search images'} (the search's score, BatchNorm re-estimated). "
        "Latency as the search measured it, on its machine; measure yours.",
        "",
        f"| point | depths | input (px) | FLOPs (share) | {latency} | top-1 (held-out) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in points:
        ms = "n/a" if p.get("latency_ms") is None else f"{p['latency_ms']:.2f}"
        default = " (default)" if p["name"] == info["default_point"] else ""
        lines.append(
            f"| `{p['name']}`{default} | {','.join(map(str, p['depths']))} | {p['input_size']} | "
            f"{p['flops'] / 1e6:.2f}M ({100 * p['flop_share']:.1f}%) | {ms} | {_pct(p.get('accuracy'))} |"
        )
    sizes = info["size_bytes"]
    extra = sizes["switching_weights"] - sizes["full_model_weights"]
    cheapest = points[0]
    lines += [
        "",
        "## Switching",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'classify = pipeline("image-classification", model="path/to/this/folder", trust_remote_code=True)',
        f"classify.model.set_budget(flops={min(1.0, round(cheapest['flop_share'] + 0.05, 2))})  "
        '# or set_budget(latency_ms=...), or set_budget("' + cheapest["name"] + '")',
        'print(classify("image.png"))',
        "```",
        "",
        "`set_budget(flops=x)` runs the most accurate point with at most `x` of the full network's FLOPs (`x` > 1: "
        "FLOPs); a budget no point fits is refused with the cheapest point named. `model.budget_points` lists them; "
        "the chosen point is saved with `save_pretrained`. Loading needs `trust_remote_code=True` (the folder's own "
        "`modeling_budget_switching.py` and `budget_switching.py`, torch and transformers only: read them first).",
        "",
        "## Checked at export",
        "",
        f"Each point was run from this folder against its standalone export on {info['checks']['images']} images: "
        f"largest logit difference {max(checks.values()):.2g}. The per-point statistics add {extra:,} bytes to the "
        f"full model's {sizes['full_model_weights']:,} ({100 * extra / sizes['full_model_weights']:.2f} %).",
    ]
    if info.get("onnx"):
        lines += ["", *onnx_section(info["onnx"], "onnx/")]
    if info.get("command"):
        lines += ["", "Exported with:", "", "```bash", info["command"], "```"]
    return "\n".join(lines) + "\n"


def _input_text(info: dict[str, Any]) -> str:
    """The card's sentence on the input the sub-network runs at, where it is not the full model's."""
    size, by = info["input_size"], info.get("input_resized_by")
    if by == "model":
        given = info.get("image_processor_size")
        return (
            f" It runs at {size} px: it resizes its input"
            + (f" ({given} px, as its image processor gives)" if given else "")
            + f" to {size} px itself, bilinearly as stimulative training resized this sub-network's inputs "
            "(`resize_input_to` in its config)."
        )
    if by == "image processor":
        return (
            f" It runs at {size} px, the size its image processor resizes images to (antialiased); in training its "
            "inputs were resized without antialiasing, so it may score lower here than in the search."
        )
    return ""


def _finetune_section(info: dict[str, Any]) -> list[str]:
    """The card's "Fine-tuning" section: what the latest fine-tuning did and the accuracy before and after."""
    t = info["finetune"]
    before, after, teacher = t["before"], t["after"], t["teacher_metrics"]
    earlier = t.get("earlier") or []
    resized = (
        f"this sub-network on the batch resized to {t['input_size']} px (bilinear)"
        if t.get("input_size") and t["input_size"] != t["teacher_input_size"]
        else "this sub-network on the same batch"
    )
    optimizer = t["optim"] + (f" ({t['optim_args']})" if t.get("optim_args") else "")
    lines = [
        "## Fine-tuning",
        "",
        f"Fine-tuned with `stim-hf finetune` for {t['epochs']} epoch(s) ({t['steps']:,} steps of {t['batch_size']} "
        f"images, {t['train_samples']:,} training images of {info['data']['train']}) towards the full model it was "
        f"exported from (`{t['teacher']}`), frozen: loss {t['loss']}, the full model in eval mode on the "
        f"{t['teacher_input_size']} px training batch, {resized}. {optimizer}, learning rate {t['learning_rate']:g} "
        f"({t['lr_scheduler_type']}), weight decay {t['weight_decay']:g}; "
        + (
            f"BatchNorm statistics then re-estimated on {t['bn_recalibration_samples']:,} training images. "
            if t["bn_recalibration_samples"]
            else "BatchNorm statistics as fine-tuning left them. "
        )
        + f"{t['seconds']:.0f} s in all."
        + (
            f" It had been fine-tuned {len(earlier)} time(s) before (export_info.json keeps those records)."
            if earlier
            else ""
        ),
        "",
        f"On the {after['num_samples']:,} validation images ({info['data']['validation']}):",
        "",
        "| model | top-1 | top-5 | KL to the full model |",
        "| --- | --- | --- | --- |",
        f"| this sub-network, before fine-tuning | {_pct(before['accuracy'])} | {_pct(before['top5_accuracy'])} | "
        f"{before['kl_to_teacher']:.4f} |",
        f"| this sub-network, after fine-tuning | {_pct(after['accuracy'])} | {_pct(after['top5_accuracy'])} | "
        f"{after['kl_to_teacher']:.4f} |",
        f"| full model (the teacher) | {_pct(teacher['accuracy'])} | {_pct(teacher['top5_accuracy'])} | |",
    ]
    return lines


def _batchnorm_text(info: dict[str, Any]) -> str:
    if not info["has_batchnorm"]:
        return "The model has no BatchNorm layers: nothing to re-estimate."
    tuned = info.get("finetune")
    if tuned and info["bn_recalibration_samples"]:
        return (
            f"Re-estimated for this sub-network at its input size ({info['input_size']} px) after fine-tuning, on "
            f"{info['bn_recalibration_samples']:,} training images of {info['data']['train']}, drawn with seed "
            f"{info['seed']}, with the training transforms."
        )
    if tuned:
        return "The running estimates that fine-tuning left (not re-estimated after it)."
    search = info.get("search")
    if search and info["bn_recalibration_samples"]:
        return (
            f"Re-estimated for this sub-network at its input size ({info['input_size']} px) on "
            f"{info['bn_recalibration_samples']:,} training images (seed {info['seed']}, training transforms) by "
            "`stim-hf search`: the exact statistics of those images, pooled over all batches. These are the "
            "statistics it was scored with."
        )
    if info["bn_recalibration_samples"]:
        return (
            f"Re-estimated for this sub-network on {info['bn_recalibration_samples']:,} training images of "
            f"{info['data']['train']}, drawn with seed {info['seed']}, with the training transforms."
        )
    return (
        "Inherited from the full network (not re-estimated): a sub-network usually scores far lower with them. "
        "Export with the training data (`--config RECIPE.yaml`) to re-estimate them for the sub-network "
        "(docs/models.md)."
    )


def _export_results(info: dict[str, Any]) -> list[EvalResult]:
    """The measured accuracies of an export for its ``model-index``: its own, the full model's, the search's."""
    bn = "BatchNorm re-estimated" if info["bn_recalibration_samples"] else "BatchNorm inherited from the full network"
    tuned = info.get("finetune")
    if tuned:
        bn = f"fine-tuned {tuned['epochs']} epoch(s), " + (
            "BatchNorm re-estimated" if info["bn_recalibration_samples"] else "BatchNorm as fine-tuning left it"
        )
    results = []
    if "metrics" in info:
        data = info["data"]
        dataset = {"type": data["type"], "name": data["validation"], "split": "validation"}
        here = f"this sub-network at {info['input_size']} px, {bn}"
        for key, label, kind in (("accuracy", "Top-1", "accuracy"), ("top5_accuracy", "Top-5", "top_5_accuracy")):
            results.append(accuracy_result(info["metrics"][key], f"{label} accuracy, {here}", dataset, kind))
        for key, label, kind in (("accuracy", "Top-1", "accuracy"), ("top5_accuracy", "Top-5", "top_5_accuracy")):
            name = f"{label} accuracy, the full model it was exported from"
            results.append(accuracy_result(info["full_metrics"][key], name, dataset, kind))
    if "search" in info:
        search, data = info["search"], info.get("data") or {}
        split = "train (held out)" if search["score_split"] == "train" else "validation"
        source = data.get("train") if search["score_split"] == "train" else data.get("validation")
        dataset = {"type": data.get("type") or "local", "name": f"{search['scored_on']} of {source}", "split": split}
        name = f"Top-1 accuracy, this sub-network at {info['input_size']} px, {bn} (scored by stim-hf search)"
        if tuned:
            name = f"Top-1 accuracy, this sub-network at {info['input_size']} px before fine-tuning (scored by stim-hf search)"
        results.append(accuracy_result(search["accuracy"], name, dataset))
    return results


def _most_accurate_text(search: dict[str, Any]) -> str:
    """With a pick margin, what the pick gave up: the most accurate candidate's accuracy and FLOPs ('' if none)."""
    best = search.get("most_accurate")
    if not best:
        return ""
    return (
        f" The most accurate, {','.join(map(str, best['depths']))} at {best['input_size']} px, scored "
        f"{_pct(best['accuracy'])} at {100 * best['flop_share']:.1f}% of the full network's FLOPs."
    )


def _search_section(info: dict[str, Any]) -> list[str]:
    """The card's "Search" section: how the pick was chosen and what it costs."""
    s = info["search"]
    latency = lambda v: "not measured" if v is None else f"{v:.3f} ms"  # noqa: E731
    budget = s["budget"] or "none"
    margin = s.get("pick_margin") or 0.0
    rule = (
        f"with the fewest FLOPs among those within {margin:g} paired standard error{'' if margin == 1 else 's'} of "
        "the most accurate of"
        if margin > 0
        else "as the most accurate of"
    )
    lines = [
        "## Search",
        "",
        f"Chosen by `stim-hf search` from checkpoint `{s['checkpoint']}` {rule} "
        f"{s['num_candidates_scored']:,} scored sub-networks ({s['strategy']}) under the budget `{budget}`."
        + _most_accurate_text(s),
        "",
        "| depths | input size | FLOPs per image | parameters | latency, batch 1 | "
        f"latency, batch {s['serving_batch_size']} | top-1 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {','.join(map(str, s['depths']))} | {s['input_size']} px | {s['flops'] / 1e6:.2f}M "
        f"({100 * s['flop_share']:.1f}% of the full network) | {s['params']:,} ({100 * s['param_share']:.1f}%) | "
        f"{latency(s.get('latency_ms'))} | {latency(s.get('serving_latency_ms'))} | {_pct(s['accuracy'])} |",
        "",
        f"Top-1 on {s['scored_on']}"
        + (
            ", held out of the re-estimation images; the test split was not used."
            if s["score_split"] == "train"
            else "."
        )
        + f" Latency: median of {s['latency_repeats']} timed passes after {s['latency_warmup']} warm-up passes on "
        f"{s['device']} ({s['torch_threads']} CPU threads).",
        "",
    ]
    given = info.get("image_processor_size")
    if info.get("input_resized_by") == "model":
        lines.append(
            f"The search scored it at {info['input_size']} px, the evaluation crop resized bilinearly: the model "
            f"does that resize itself, so `pipeline()` runs it exactly so behind its {given} px image processor."
        )
    elif info["image_processor"] and given is not None and given != info["input_size"]:
        lines.append(
            f"The search scored it at {info['input_size']} px (the evaluation crop resized, with the forward "
            f"arguments that size needs); on its own it runs at {given} px, the size the folder's image processor "
            "gives, so `pipeline()` runs it there."
        )
    elif info["image_processor"] and info["input_size"] != s["eval_image_size"]:
        lines.append(
            f"The model expects {info['input_size']} px inputs; the folder's image processor resizes and crops "
            f"images to {info['input_size']} px directly, where the search resized the evaluation crop "
            f"({s['eval_image_size']} px) to {info['input_size']} px (bilinear, not antialiased): the two differ, "
            "by several points at the smallest sizes."
        )
    elif info["image_processor"]:
        lines.append(f"The model expects {info['input_size']} px inputs, as the folder's image processor gives.")
    else:
        lines.append(
            f"The model expects {info['input_size']} px inputs: resize the evaluation crop ({s['eval_image_size']} "
            f"px) to {info['input_size']} px (bilinear), as the search did."
        )
    return lines


def _blocks(result: dict[str, Any]) -> str:
    """``3,1,2`` for a sub-network that keeps a prefix of each stage, else its kept blocks (``[0, 2], [1], [0]``)."""
    kept = result.get("kept")
    if kept is None or all(list(k) == list(range(len(k))) for k in kept):
        return ",".join(map(str, result["depths"]))
    return ", ".join(str(list(k)) for k in kept)


def _pct(value: float | None) -> str:
    return "not measured" if value is None else f"{100 * value:.2f}%"


def write_card(folder: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as ``folder``'s ``README.md``; returns its path."""
    path = Path(folder) / CARD_NAME
    path.write_text(text, encoding="utf-8")
    return path
