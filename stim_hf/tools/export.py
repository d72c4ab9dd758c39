"""Exporting a sub-network of a trained model as a standalone Hugging Face model.

``stim-hf export CHECKPOINT --depths 3,2,1 --output DIR`` keeps the first ``depths[s]`` residual
blocks of every stage (the notation of :attr:`~stim_hf.method.Subnet.depths`), builds the
shallower model from the family's config (``config_for_depths`` of its registered family), copies
the kept blocks' weights to their new positions and everything else as is, optionally re-estimates
BatchNorm statistics on training images and measures accuracy, and writes safetensors weights,
``config.json``, the image processor, a model card ``README.md`` and ``export_info.json``. The
result loads with ``AutoModelForImageClassification.from_pretrained(DIR)`` and
``pipeline("image-classification", model=DIR)`` with transformers alone (the CIFAR ResNets' code is
saved beside the weights: ``trust_remote_code=True``); ``--push-to-hub REPO_ID`` uploads it. See
docs/models.md for which families can be exported. The command line: :mod:`stim_hf.tools.export_cli`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoImageProcessor, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor

from stim_hf.analysis.evaluation import (
    BatchSource,
    evaluate_model,
    recalibration_batches,
    resolve_recalibration_samples,
)
from stim_hf.data.image_datasets import DataArguments, load_image_datasets
from stim_hf.data.transforms import build_image_processor, with_image_transforms
from stim_hf.errors import ConfigError, ModelStructureError
from stim_hf.method import ResidualFamily, ResidualStage, Subnet, find_residual_family, subnet_from_depths
from stim_hf.method.batchnorm import batchnorm_layers, recalibrate_batchnorm
from stim_hf.tools.datasets_progress import datasets_work_in_lines
from stim_hf.tools.hub import check_push_to_hub, missing_for_sharing, push_folder
from stim_hf.tools.model_cards import describe_data, export_card, hub_base_model, write_card
from stim_hf.tools.onnx_files import check_onnx_request, load_onnx_images, write_onnx_files
from stim_hf.tools.output_folders import check_new_folder
from stim_hf.training.checkpointing import publish_files
from stim_hf.training.integrity import folder_files, write_folder_manifest
from stim_hf.training.modeling import load_saved_classifier, without_transformers_progress_bars
from stim_hf.training.write_failures import reported_write_failures

logger = logging.getLogger(__name__)

# Files of a checkpoint directory that describe preprocessing; copied to the export unchanged.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# The smallest --input-size (pixels), as the trainer's smallest sub-network input.
MIN_INPUT_SIZE = 8
# Files that make a folder a training checkpoint (resumable): stim_hf's manifest, or the
# Trainer's state and optimizer state together (checkpoints written by other tools).
# --------------------------------------------------------------------------------------------------
# Building the shallower model
# --------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike) -> PreTrainedModel:
    """Load a saved image classifier (a training run's ``output_dir`` or a ``checkpoint-*`` folder)."""
    return load_saved_classifier(path, label=f"checkpoint directory '{path}'")


def prefix_subnet(stages: Sequence[ResidualStage], depths: Sequence[int] | Subnet) -> Subnet:
    """The prefix sub-network to export: from per-stage depths, or a :class:`Subnet` that keeps prefixes.

    Raises :class:`ConfigError` when the depths do not fit the stages, and when a ``Subnet`` keeps
    blocks other than a prefix of some stage (a standalone model's config states depths only).
    """
    if isinstance(depths, Subnet):
        subnet = depths
        if subnet.num_blocks != tuple(s.num_blocks for s in stages):
            raise ConfigError(
                f"sub-network {subnet.describe()} was drawn for a model with blocks per stage "
                f"{list(subnet.num_blocks)}, this model has {[s.num_blocks for s in stages]}"
            )
        for s, kept in enumerate(subnet.kept):
            if kept != tuple(range(len(kept))):
                raise ConfigError(
                    f"sub-network {subnet.describe()} keeps blocks {list(kept)} of stage {s}, not a prefix; export "
                    f"writes the first depths[s] blocks of each stage: pass depths={list(subnet.depths)} to export "
                    "that prefix sub-network instead"
                )
        depths = subnet.depths
    return subnet_from_depths(stages, [int(d) for d in depths])


def container_paths(model: nn.Module, stages: Sequence[ResidualStage]) -> list[str]:
    """Module path of each stage's container inside ``model`` (found by identity, not by name)."""
    paths = {id(module): name for name, module in model.named_modules()}
    result = []
    for stage in stages:
        path = paths.get(id(stage.container))
        if path is None:
            raise ModelStructureError(
                f"stage '{stage.name}' is not a module of {type(model).__name__} (a view over shared blocks), so its "
                "weights cannot be mapped to a standalone model; this family cannot be exported"
            )
        result.append(path)
    return result


def _block_key_map(
    paths: Sequence[str], old_stages: Sequence[ResidualStage], new_stages: Sequence[ResidualStage], subnet: Subnet
) -> dict[str, str | None]:
    """``{old block prefix: new block prefix, or None when the block is dropped}`` for every block."""
    mapping: dict[str, str | None] = {}
    for path, old, new, kept in zip(paths, old_stages, new_stages, subnet.kept, strict=True):
        old_keys, new_keys = list(old.container._modules), list(new.container._modules)
        for old_key in old_keys:
            mapping[f"{path}.{old_key}."] = None
        for new_index, old_index in enumerate(kept):
            mapping[f"{path}.{old_keys[old_index]}."] = f"{path}.{new_keys[new_index]}."
    return mapping


def subnet_state_dict(
    model: nn.Module,
    stages: Sequence[ResidualStage],
    new_stages: Sequence[ResidualStage],
    subnet: Subnet,
) -> dict[str, torch.Tensor]:
    """The full model's state dict with dropped blocks removed and kept blocks renumbered.

    ``new_stages`` are the stages of the shallower model (they give the new blocks' names); every
    tensor outside the stages keeps its key.
    """
    paths = container_paths(model, stages)
    mapping = _block_key_map(paths, stages, new_stages, subnet)
    stage_prefixes = tuple(f"{path}." for path in paths)
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(stage_prefixes):
            path = next(p for p in paths if key.startswith(f"{p}."))
            block = key[len(path) + 1 :].split(".", 1)[0]
            target = mapping.get(f"{path}.{block}.")
            if target is None:
                continue  # a dropped block
            key = target + key[len(path) + len(block) + 2 :]
        state[key] = tensor
    return state


def build_subnet_model(
    model: PreTrainedModel,
    depths: Sequence[int] | Subnet,
    family: ResidualFamily | None = None,
    resize_input_to: int | None = None,
) -> PreTrainedModel:
    """A standalone model of ``model``'s class holding only the kept blocks, with the same weights.

    The config comes from the family's ``config_for_depths`` (and ``config_for_input_size`` for a
    model that resizes its own input to ``resize_input_to``); kept block ``i`` of stage ``s`` moves
    to its position in the shallower stage, every other tensor is copied as is, and a missing or
    unexpected key is an error. The result is in eval mode on ``model``'s device and dtype.
    """
    found_family, stages = find_residual_family(model)
    family = family or found_family
    subnet = prefix_subnet(stages, depths)
    if family.config_for_depths is None:
        raise ModelStructureError(
            f"{type(model).__name__} ({family.name} family) cannot be exported: its family was registered without "
            "config_for_depths, the function that writes a shallower config; pass "
            "config_for_depths=... to stim_hf.register_stage_finder (see docs/models.md)"
        )
    config = family.config_for_depths(model.config, subnet.depths)
    if resize_input_to is not None:
        if family.config_for_input_size is None:
            raise ModelStructureError(
                f"{type(model).__name__} ({family.name} family) cannot resize its own input: its family was "
                "registered without config_for_input_size"
            )
        config = family.config_for_input_size(config, resize_input_to)
    try:
        new_model = type(model)(config)
    except (TypeError, ValueError) as err:
        raise ModelStructureError(
            f"cannot build a {type(model).__name__} with depths {list(subnet.depths)} from the {family.name} config: "
            f"{err}"
        ) from err
    new_family, new_stages = find_residual_family(new_model, require_skippable=False)
    if new_family.name != family.name or tuple(s.num_blocks for s in new_stages) != subnet.depths:
        raise ModelStructureError(
            f"the {family.name} config for depths {list(subnet.depths)} built a model with blocks per stage "
            f"{[s.num_blocks for s in new_stages]} ({new_family.name}); its config_for_depths is wrong"
        )
    state = subnet_state_dict(model, stages, new_stages, subnet)
    expected = set(new_model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelStructureError(
            f"weights of {type(model).__name__} do not map onto the shallower model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; the family's stages or config_for_depths do not match the model"
        )
    new_model.to(device=model.device, dtype=model.dtype)
    new_model.load_state_dict(state, strict=True)
    return new_model.eval()


def dropped_parameter_count(stages: Sequence[ResidualStage], subnet: Subnet) -> int:
    """Number of parameters in the blocks that ``subnet`` drops."""
    total = 0
    for stage, kept in zip(stages, subnet.kept, strict=True):
        blocks = list(stage.container)
        total += sum(p.numel() for i, block in enumerate(blocks) if i not in kept for p in block.parameters())
    return total


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an export folder whose contents would be lost (:func:`~stim_hf.tools.output_folders.check_new_folder`)."""
    check_new_folder(output_dir, "--output", overwrite, replaced="the model in it")


def export_subnet(
    model_or_checkpoint: PreTrainedModel | str | os.PathLike,
    depths: Sequence[int] | Subnet,
    output_dir: str | os.PathLike,
    recalibrate_bn: int | None = None,
    data_args: DataArguments | None = None,
    evaluate: bool = False,
    seed: int = 42,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    command: str | None = None,
    overwrite: bool = False,
    input_size: int | None = None,
    push_to_hub: str | None = None,
    describe: Callable[[Path], None] | None = None,
    onnx: bool = False,
    int8: bool = False,
) -> PreTrainedModel:
    """Write the prefix sub-network ``depths`` of a model to ``output_dir`` as a standalone model.

    ``model_or_checkpoint`` is a model or a saved model directory. The exported model's BatchNorm
    statistics are re-estimated for it on ``recalibrate_bn`` training images of ``data_args``
    (default: 1024 when ``data_args`` has a training source, else 0, which keeps the full
    network's; seeded by ``seed``, which must be the training run's seed when the validation split
    is carved off the training data). ``input_size`` is the input side the sub-network is meant to
    run at (default: the evaluation crop): the statistics are re-estimated at that size and the
    saved image processor crops to it. ``evaluate`` measures the top-1 / top-5 accuracy of the
    exported model (at ``input_size``) and the full model on the validation split. Writes
    safetensors weights, ``config.json`` (with the model's code beside it where transformers does
    not ship the class), ``preprocessor_config.json`` (from ``data_args``, else the checkpoint's
    own, the folder a model object was loaded from included), a model card ``README.md`` and
    ``export_info.json``; returns the exported model (eval mode). ``push_to_hub`` (a repository id)
    uploads the folder; whether it can is checked before anything else. An existing, non-empty
    ``output_dir`` is refused unless ``overwrite``, and a training checkpoint always (see
    :func:`check_output_dir`). The folder is written beside ``output_dir`` first, sealed with a
    manifest of its files' sizes and hashes (``stim_hf_manifest.json``) and then put in place
    (:func:`write_model_folder`); ``describe`` is called with the folder before it is sealed (the
    search adds its record there). ``onnx`` also writes ``model.onnx``, checked in ONNX Runtime
    against PyTorch on validation images and timed in both; ``int8`` adds ``model.int8.onnx``
    (static, calibrated on training images) with validation top-1 before and after
    (:mod:`stim_hf.tools.onnx_files`).
    """
    num_recal = resolve_recalibration_samples(recalibrate_bn, data_args, "--recalibrate-bn")
    if evaluate and data_args is None:
        raise ConfigError(
            "--evaluate needs data: give the validation data (--validation_file or --validation_dir) or the data "
            "arguments of the training run (--dataset_name, --train_file or --train_dir, ..., or --config RECIPE.yaml)"
        )
    if input_size is not None and (not isinstance(input_size, int) or input_size < MIN_INPUT_SIZE):
        raise ConfigError(f"--input-size {input_size!r} must be an integer >= {MIN_INPUT_SIZE} (pixels)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size!r} must be an integer >= 1 (images per batch)")
    if push_to_hub is not None:
        check_push_to_hub(push_to_hub)
    check_onnx_request(onnx, int8, data_args)
    from_folder = isinstance(model_or_checkpoint, (str, os.PathLike))
    if from_folder and Path(model_or_checkpoint).resolve() == Path(output_dir).resolve():
        raise ConfigError(
            f"the output directory '{output_dir}' is the checkpoint itself; give another --output so the full "
            "model is not overwritten"
        )
    check_output_dir(output_dir, overwrite)
    if from_folder:
        source = str(model_or_checkpoint)
        model = load_checkpoint(source)
    else:
        model = model_or_checkpoint
        source = getattr(model.config, "_name_or_path", "") or f"an in-memory {type(model).__name__}"
    if device is not None:
        model.to(device)
    family, stages = find_residual_family(model)
    subnet = prefix_subnet(stages, depths)
    processor = export_processor(data_args, source)
    if processor is None and push_to_hub is not None:
        raise ConfigError(
            f"--push-to-hub {push_to_hub}: the export would have no image processor (the checkpoint has none and no "
            "data arguments were given), so pipeline('image-classification') could not load it from the Hub; give "
            "those of training (--config RECIPE.yaml)"
        )
    trained_size = _processor_crop(processor)
    _check_input_size(input_size, trained_size, family, model)
    # At a smaller input, a model that can resize its own input does so exactly as training resized the
    # sub-network's batch (bilinear, no antialiasing), behind the trained processor. The processor's own resize
    # is antialiased: on CIFAR at 13 px that cost ST++'s 1,1,2 sub-network 9 points (53.7 % against 62.7 %).
    resized_by_model = input_size not in (None, trained_size) and family.config_for_input_size is not None
    exported = build_subnet_model(model, subnet, family, resize_input_to=input_size if resized_by_model else None)
    if processor is not None and input_size is not None and not resized_by_model:
        processor = processor_at_input_size(processor, input_size)

    info: dict[str, Any] = {
        "source": source,
        "base_model": hub_base_model(source),
        "family": family.name,
        "model_class": type(model).__name__,
        "depths": list(subnet.depths),
        "full_depths": list(subnet.num_blocks),
        "stages": [s.name for s in stages],
        "num_parameters": _num_parameters(exported),
        "full_num_parameters": _num_parameters(model),
        "dropped_block_parameters": dropped_parameter_count(stages, subnet),
        "input_size": input_size or trained_size,
        "input_resized_by": "model"
        if resized_by_model
        else "image processor"
        if input_size not in (None, trained_size)
        else None,
        "image_processor": processor is not None,
        "image_processor_size": _processor_crop(processor),
        "bn_recalibration_samples": 0,
        "has_batchnorm": bool(batchnorm_layers(exported)),
        "seed": seed,
        "command": command,
    }
    if data_args is not None:
        info["data"] = describe_data(data_args, seed)
    num_recal = num_recal if info["has_batchnorm"] else 0  # nothing to re-estimate
    if num_recal or evaluate:
        with datasets_work_in_lines("loading the images"):
            splits = load_image_datasets(data_args, seed=seed)
        if num_recal:
            batches = recalibration_batches(splits["train"], data_args, num_recal, seed, batch_size, input_size)
            with torch.no_grad():
                moved = ({"pixel_values": b["pixel_values"].to(_device_of(exported))} for b in batches)
                info["bn_recalibration_samples"] = recalibrate_batchnorm(exported, moved, num_recal)
        if evaluate:
            at = None if resized_by_model else input_size  # the model resizes the evaluation crop itself
            info["metrics"] = _evaluate(exported, splits["validation"], data_args, batch_size, at)
            info["full_metrics"] = _evaluate(model, splits["validation"], data_args, batch_size)

    output_dir = Path(output_dir)
    if processor is None:
        logger.warning(
            "no image processor written: the checkpoint has none and no data arguments were given; give those of "
            "training (--config RECIPE.yaml) so that pipeline('image-classification') can load the export"
        )

    onnx_images = None
    if onnx:
        onnx_images = load_onnx_images(data_args, seed, None if resized_by_model else input_size, int8, batch_size)

    def write(folder: Path) -> None:
        with without_transformers_progress_bars():
            exported.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
        if onnx_images is not None:
            info["onnx"] = write_onnx_files(exported, folder, "model", onnx_images)
        write_export_record(folder, info)
        if describe is not None:
            describe(folder)

    write_model_folder(output_dir, write, "the export", "--output")
    logger.info("exported %s to %s", subnet.describe(), output_dir)
    if push_to_hub is not None:
        push_export(output_dir, push_to_hub)
    return exported


def write_model_folder(output_dir: str | os.PathLike, write: Callable[[Path], None], what: str, flag: str) -> None:
    """Write a model folder with ``write(folder)`` beside ``output_dir``, seal it with its manifest, then move it in.

    The folder is written into ``.<name>.staging`` next to ``output_dir`` (the same filesystem) and
    gets ``stim_hf_manifest.json`` (each file's size and hash). It then becomes ``output_dir``
    with one rename, or, when ``output_dir`` holds files already (``--overwrite``), its files
    replace their namesakes one rename each, the weights and the manifest last, and an earlier
    export's processor, card and code that this one lacks are removed. A failed write removes the
    staging folder and raises :class:`~stim_hf.errors.StorageError` (``what`` and ``flag`` name it);
    ``output_dir`` is then as it was.
    """
    target = Path(output_dir)
    absolute = Path(os.path.abspath(target))
    staging = absolute.parent / f".{absolute.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)

    def intact() -> str:
        return f"'{target}' is as it was" if target.exists() else f"nothing was written to '{target}'"

    with reported_write_failures(what, str(target), partial=(str(staging),), intact=intact, flag=flag):
        staging.mkdir(parents=True)
        write(staging)
        write_folder_manifest(staging)
        if not target.exists() or (target.is_dir() and not any(target.iterdir())):
            os.replace(staging, target)  # one rename (onto an empty folder, too)
            return
        new_files = set(folder_files(staging))
        publish_files(str(staging), str(target))
        for path in _replaced_files(target):
            if path.name not in new_files:
                path.unlink()  # left by an earlier export that --overwrite replaces


def write_export_record(folder: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write ``export_info.json`` and the model card made from it (also after the search adds its part)."""
    (Path(folder) / "export_info.json").write_text(json.dumps(info, indent=2) + "\n")
    write_card(folder, export_card(folder, info))


def push_export(folder: str | os.PathLike, repo_id: str) -> str:
    """Upload an export folder to the Hub repository ``repo_id`` (after checking it holds what a user needs)."""
    missing = missing_for_sharing(folder)
    if missing:
        raise ConfigError(f"'{folder}' lacks {', '.join(missing)}; nothing was uploaded to {repo_id}")
    info = json.loads((Path(folder) / "export_info.json").read_text())
    depths = ",".join(map(str, info["depths"]))
    url = push_folder(folder, repo_id, f"Sub-network depths={depths} of {info['source']}, exported with stim_hf")
    logger.info("pushed %s to %s", folder, url)
    return url


def _replaced_files(folder: Path) -> list[Path]:
    """Files of an earlier export in ``folder`` that this one may not rewrite: processor files and model code."""
    names = [*PROCESSOR_FILES, "README.md"]
    code = [p for p in folder.glob("*.py") if p.name.startswith(("modeling_", "configuration_"))]
    return [folder / name for name in names if (folder / name).is_file()] + code


def export_processor(data_args: DataArguments | None, source: str | None) -> BaseImageProcessor | None:
    """The export's image processor: from the data arguments (evaluation's preprocessing), else the checkpoint's own.

    ``source`` is the checkpoint folder, or the folder a model object was loaded from
    (``config._name_or_path``); a source that is no folder with a processor gives None.
    """
    if data_args is not None:
        return build_image_processor(data_args)
    if source and os.path.isfile(os.path.join(source, PROCESSOR_FILES[0])):
        return AutoImageProcessor.from_pretrained(source)
    return None


def _processor_crop(processor: BaseImageProcessor | None) -> int | None:
    """The input side a processor produces (its crop, else its fixed size), or None when it does not say."""
    if processor is None:
        return None
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    return size.get("height") if size is not None else None


def processor_at_input_size(processor: BaseImageProcessor, input_size: int) -> BaseImageProcessor:
    """A copy of ``processor`` that gives ``input_size`` square inputs, the crop keeping its share of the image.

    A resize of the shorter side followed by a centre crop (``BitImageProcessor``, as
    :func:`~stim_hf.data.transforms.build_image_processor` writes) scales its resize with the crop; a
    processor that resizes to a fixed height and width gets ``input_size`` for both.
    """
    processor = copy.deepcopy(processor)
    crop = _processor_crop(processor)
    size = dict(processor.size.items()) if hasattr(processor.size, "items") else dict(processor.size)
    size = {k: v for k, v in size.items() if v is not None}
    if getattr(processor, "do_center_crop", False) and crop:
        processor.crop_size = {"height": input_size, "width": input_size}
        processor.size = {k: max(input_size, round(v * input_size / crop)) for k, v in size.items()}
    else:
        processor.size = {"height": input_size, "width": input_size}
    return processor


def _check_input_size(input_size: int | None, trained_size: int | None, family: ResidualFamily, model) -> None:
    """Refuse an input size the exported model cannot run at on its own (ConfigError naming the fix)."""
    if input_size is None or input_size == trained_size:
        return
    if not family.supports_smaller_inputs or family.resized_forward_kwargs:
        what = "windowed attention" if not family.supports_smaller_inputs else "position embeddings for its size"
        raise ConfigError(
            f"--input-size {input_size}: a standalone {type(model).__name__} ({family.name}) has {what} and runs "
            f"only at the size it was trained at{f' ({trained_size})' if trained_size else ''}; leave --input-size "
            "unset"
        )
    smallest = family.min_input_size(model) if family.min_input_size else 0
    if input_size < smallest:
        raise ConfigError(f"--input-size {input_size} is below {type(model).__name__}'s smallest input side {smallest}")


def _evaluate(
    model: nn.Module, validation, data_args: DataArguments, batch_size: int, input_size: int | None = None
) -> dict[str, float]:
    """Top-1 / top-5 accuracy of ``model`` on the validation split, with the evaluation transforms at ``input_size``."""
    dataset = with_image_transforms(validation, data_args, train=False, input_size=input_size)
    metrics = evaluate_model(model, BatchSource(dataset, batch_size, cache=False))
    return {
        "accuracy": metrics["accuracy"],
        "top5_accuracy": metrics["top5_accuracy"],
        "num_samples": metrics["num_samples"],
    }


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
