"""Exporting a sub-network of a trained model as a standalone Hugging Face model.

``stim-hf export CHECKPOINT --depths 3,2,1 --output DIR`` keeps the first ``depths[s]`` residual
blocks of every stage (the notation of :attr:`~stim_hf.subnets.Subnet.depths`), builds the
shallower model from the family's config (``config_for_depths`` of its registered family), copies
the kept blocks' weights to their new positions and everything else as is, optionally re-estimates
BatchNorm statistics on training images and measures accuracy, and writes safetensors weights,
``config.json``, a model card ``README.md`` and ``export_info.json``. The result loads with
``AutoModelForImageClassification.from_pretrained(DIR)`` (after ``import stim_hf`` for the CIFAR
ResNets). See docs/models.md for which families can be exported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from transformers import EvalPrediction, PreTrainedModel

from stim_hf.batchnorm import batchnorm_layers, preserved_rng_state, recalibrate_batchnorm
from stim_hf.builtin_datasets import is_builtin_dataset_name
from stim_hf.checkpointing import MANIFEST_NAME, TRAINER_STATE_NAME
from stim_hf.data import DataArguments, load_image_datasets
from stim_hf.errors import ConfigError, DataError, ModelStructureError
from stim_hf.metrics import build_compute_metrics, top_k_indices
from stim_hf.modeling import load_saved_classifier
from stim_hf.parser import SubcommandArgumentParser, load_recipe
from stim_hf.subnets import ResidualFamily, ResidualStage, Subnet, find_residual_family, subnet_from_depths
from stim_hf.transforms import collate_image_batch, with_image_transforms

logger = logging.getLogger(__name__)

# Files of a checkpoint directory that describe preprocessing; copied to the export unchanged.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# The data source fields of DataArguments: a data set is configured when one of them is set.
_DATA_SOURCE_FIELDS = ("dataset_name", "train_dir", "train_file")
# Files that make a folder a training checkpoint (resumable): stim_hf's manifest, or the
# Trainer's state and optimizer state together (checkpoints written by other tools).
_CHECKPOINT_MARKERS = ((MANIFEST_NAME,), (TRAINER_STATE_NAME, "optimizer.pt"))


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


def _container_paths(model: nn.Module, stages: Sequence[ResidualStage]) -> list[str]:
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
    paths = _container_paths(model, stages)
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
    model: PreTrainedModel, depths: Sequence[int] | Subnet, family: ResidualFamily | None = None
) -> PreTrainedModel:
    """A standalone model of ``model``'s class holding only the kept blocks, with the same weights.

    The config comes from the family's ``config_for_depths``; kept block ``i`` of stage ``s`` moves
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
    try:
        new_model = type(model)(config)
    except (TypeError, ValueError) as err:
        raise ModelStructureError(
            f"cannot build a {type(model).__name__} with depths {list(subnet.depths)} from the {family.name} config: "
            f"{err}"
        ) from err
    new_family, new_stages = find_residual_family(new_model)
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
# BatchNorm recalibration and evaluation on a data set
# --------------------------------------------------------------------------------------------------


def _batches(dataset: datasets.Dataset, batch_size: int, device: torch.device) -> Iterable[dict[str, torch.Tensor]]:
    """Collated batches of ``dataset`` in order, moved to ``device``."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_image_batch)
    for batch in loader:
        yield {key: value.to(device) for key, value in batch.items()}


def recalibrate_on_data(
    model: nn.Module,
    splits: datasets.DatasetDict,
    data_args: DataArguments,
    num_samples: int,
    seed: int,
    batch_size: int = 128,
) -> int:
    """Re-estimate ``model``'s BatchNorm statistics on ``num_samples`` seeded training images.

    Uses the training transforms (as the Trainer's recalibration does) and restores the random
    states afterwards. Returns the number of images used (0 for a model without BatchNorm).
    """
    if not batchnorm_layers(model):
        return 0
    train = with_image_transforms(splits["train"], data_args, train=True)
    chosen = np.random.default_rng(seed).permutation(len(train))[:num_samples].tolist()
    with preserved_rng_state():
        torch.manual_seed(seed)
        batches = _batches(Subset(train, chosen), batch_size, _device_of(model))
        return recalibrate_batchnorm(model, batches, len(chosen))


@torch.no_grad()
def evaluate_on_data(
    model: nn.Module, splits: datasets.DatasetDict, data_args: DataArguments, batch_size: int = 256
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of ``model`` (eval mode) on the validation split.

    Returns ``{"accuracy", "top5_accuracy", "num_samples"}``.
    """
    validation = with_image_transforms(splits["validation"], data_args, train=False)
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    try:
        for batch in _batches(validation, batch_size, _device_of(model)):
            logits = model(pixel_values=batch["pixel_values"]).logits
            predictions.append(top_k_indices(logits).cpu())
            labels.append(batch["labels"].cpu())
    finally:
        model.train(was_training)
    if not labels:
        raise DataError("the validation split is empty, so there is nothing to evaluate; check the data arguments")
    metrics = build_compute_metrics()(
        EvalPrediction(predictions=torch.cat(predictions).numpy(), label_ids=torch.cat(labels).numpy())
    )
    return {**metrics, "num_samples": int(sum(len(x) for x in labels))}


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an export folder whose contents would be lost: :class:`ConfigError` with the fix.

    A missing or empty folder is fine; a non-empty one needs ``overwrite``; a training checkpoint
    (it holds ``stim_hf_checkpoint.json``, or ``trainer_state.json`` and ``optimizer.pt``) is never
    overwritten, as it could no longer be resumed.
    """
    path = Path(output_dir)
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"the output directory '{output_dir}' is a file; give a new folder as --output")
    entries = set(os.listdir(path))
    marker = next((names for names in _CHECKPOINT_MARKERS if entries.issuperset(names)), None)
    if marker is not None:
        raise ConfigError(
            f"the output directory '{output_dir}' is a training checkpoint (it has {' and '.join(marker)}), which "
            "export never overwrites, not even with --overwrite (its model would no longer match its optimizer "
            "state, so it could not be resumed); give a new folder as --output"
        )
    if entries and not overwrite:
        raise ConfigError(
            f"the output directory '{output_dir}' already exists and is not empty; give a new folder as --output, "
            "or pass --overwrite (overwrite=True in Python) to replace the model in it"
        )


def export_subnet(
    model_or_checkpoint: PreTrainedModel | str | os.PathLike,
    depths: Sequence[int] | Subnet,
    output_dir: str | os.PathLike,
    recalibrate_bn: int = 0,
    data_args: DataArguments | None = None,
    evaluate: bool = False,
    seed: int = 42,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    command: str | None = None,
    overwrite: bool = False,
) -> PreTrainedModel:
    """Write the prefix sub-network ``depths`` of a model to ``output_dir`` as a standalone model.

    ``model_or_checkpoint`` is a model or a saved model directory. ``recalibrate_bn`` > 0 re-estimates
    the exported model's BatchNorm statistics on that many training images of ``data_args`` (seeded
    by ``seed``, which must be the training run's seed when the validation split is carved off the
    training data); ``evaluate`` measures the top-1 / top-5 accuracy of the exported and the full
    model on the validation split. Writes safetensors weights, ``config.json``, a model card
    ``README.md`` and ``export_info.json``; returns the exported model (eval mode). An existing,
    non-empty ``output_dir`` is refused unless ``overwrite``, and a training checkpoint always
    (see :func:`check_output_dir`).
    """
    if recalibrate_bn < 0:
        raise ConfigError(f"recalibrate_bn={recalibrate_bn} must be >= 0 (0 keeps the full network's statistics)")
    if (recalibrate_bn or evaluate) and data_args is None:
        needs = "--recalibrate-bn" if recalibrate_bn else "--evaluate"
        raise ConfigError(
            f"{needs} needs data: give the data arguments of the training run (--dataset_name, --train_file or "
            "--train_dir, ..., or --config RECIPE.yaml)"
        )
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
    exported = build_subnet_model(model, subnet, family)

    info: dict[str, Any] = {
        "source": source,
        "family": family.name,
        "model_class": type(model).__name__,
        "depths": list(subnet.depths),
        "full_depths": list(subnet.num_blocks),
        "stages": [s.name for s in stages],
        "num_parameters": _num_parameters(exported),
        "full_num_parameters": _num_parameters(model),
        "dropped_block_parameters": dropped_parameter_count(stages, subnet),
        "bn_recalibration_samples": 0,
        "has_batchnorm": bool(batchnorm_layers(exported)),
        "seed": seed,
        "command": command,
    }
    if recalibrate_bn or evaluate:
        splits = load_image_datasets(data_args, seed=seed)
        info["data"] = _describe_data(data_args, seed)
        if recalibrate_bn:
            info["bn_recalibration_samples"] = recalibrate_on_data(
                exported, splits, data_args, recalibrate_bn, seed, batch_size
            )
        if evaluate:
            info["metrics"] = evaluate_on_data(exported, splits, data_args, batch_size)
            info["full_metrics"] = evaluate_on_data(model, splits, data_args, batch_size)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    exported.save_pretrained(output_dir)
    for name in PROCESSOR_FILES:
        if from_folder and os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), output_dir / name)
        elif (output_dir / name).is_file():
            (output_dir / name).unlink()  # left by an earlier export that --overwrite replaces
    (output_dir / "export_info.json").write_text(json.dumps(info, indent=2) + "\n")
    (output_dir / "README.md").write_text(model_card(info, stages, subnet))
    logger.info("exported %s to %s", subnet.describe(), output_dir)
    return exported


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _describe_data(data_args: DataArguments, seed: int) -> dict[str, Any]:
    """Where the training and the validation images come from, for the model card."""
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
    return {"train": train, "validation": validation, "image_size": data_args.resolved_eval_image_size()}


def model_card(info: dict[str, Any], stages: Sequence[ResidualStage], subnet: Subnet) -> str:
    """The ``README.md`` of an export: kept blocks, source, parameters, BatchNorm, accuracy, usage."""
    depths = ",".join(map(str, subnet.depths))
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-classification",
        "tags:",
        "- stim_hf",
        "- stimulative-training",
        "- sub-network",
        "---",
        "",
        f"# Sub-network depths={depths} of {info['source']}",
        "",
        f"A standalone {info['model_class']} exported with stim_hf from `{info['source']}` "
        f"({info['family']} family): it keeps the first `depths[s]` residual blocks of each stage of the "
        "full model, with their trained weights; everything else is copied unchanged.",
        "",
        "## Kept blocks",
        "",
        "| stage | blocks kept | of |",
        "| --- | --- | --- |",
    ]
    for stage, kept in zip(stages, subnet.kept, strict=True):
        blocks = f"blocks {kept[0]}-{kept[-1]}" if len(kept) > 1 else f"block {kept[0]}"
        lines.append(f"| `{stage.name}` | {len(kept)} ({blocks}) | {stage.num_blocks} |")
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
    ]
    if not info["has_batchnorm"]:
        lines.append("The model has no BatchNorm layers: nothing to re-estimate.")
    elif info["bn_recalibration_samples"]:
        lines.append(
            f"Re-estimated for this sub-network on {info['bn_recalibration_samples']:,} training images of "
            f"{info['data']['train']}, drawn with seed {info['seed']}, with the training transforms."
        )
    else:
        lines.append(
            "Inherited from the full network (not re-estimated); `--recalibrate-bn N` re-estimates them for the "
            "sub-network, which usually recovers much of its accuracy (docs/models.md)."
        )
    if "metrics" in info:
        sub, ref = info["metrics"], info["full_metrics"]
        lines += [
            "",
            "## Accuracy",
            "",
            f"On {sub['num_samples']:,} validation images ({info['data']['validation']}) at "
            f"{info['data']['image_size']} px:",
            "",
            "| model | top-1 | top-5 |",
            "| --- | --- | --- |",
            f"| this sub-network (depths={depths}) | {100 * sub['accuracy']:.2f}% | {100 * sub['top5_accuracy']:.2f}% |",
            f"| full model | {100 * ref['accuracy']:.2f}% | {100 * ref['top5_accuracy']:.2f}% |",
        ]
    needs_stim = info["family"] == "cifar_resnet"
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        *(["import stim_hf  # registers the CIFAR ResNets with the Auto classes"] if needs_stim else []),
        "from transformers import AutoModelForImageClassification",
        "",
        'model = AutoModelForImageClassification.from_pretrained("path/to/this/folder")',
        "```",
    ]
    if info.get("command"):
        lines += ["", "Exported with:", "", "```bash", info["command"], "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


@dataclass
class ExportArguments:
    """Settings of ``stim-hf export`` (the data come from :class:`~stim_hf.data.DataArguments`)."""

    depths: str = field(
        default=None,
        metadata={"help": "Blocks to keep per stage, comma-separated (e.g. 3,2,1): the first depths[s] of stage s."},
    )
    output: str = field(default=None, metadata={"help": "Directory to write the exported model to."})
    recalibrate_bn: int = field(
        default=0,
        metadata={"help": "Re-estimate BatchNorm statistics of the export on this many training images (0: keep)."},
    )
    evaluate: bool = field(
        default=False, metadata={"help": "Measure top-1 / top-5 accuracy of the export and the full model."}
    )
    seed: int = field(
        default=42,
        metadata={
            "help": "Seed of the recalibration images and of the validation split carved off the training data "
            "(use the training run's seed)."
        },
    )
    batch_size: int = field(default=128, metadata={"help": "Batch size for recalibration and evaluation."})
    device: str | None = field(default=None, metadata={"help": "Device to run on (default: cuda if available)."})
    config: str | None = field(
        default=None,
        metadata={"help": "A training recipe (YAML): its data fields and seed become defaults."},
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace the model in an --output folder that exists and is not empty (never a training "
            "checkpoint)."
        },
    )


def parse_depths(text: str | Sequence[int]) -> list[int]:
    """Parse ``"3,2,1"`` (or a sequence) into a list of integers; :class:`ConfigError` otherwise."""
    if not isinstance(text, str):
        return [int(d) for d in text]
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise ConfigError(f"--depths '{text}' must be comma-separated integers, one per stage (e.g. 3,2,1)") from None


def build_parser() -> SubcommandArgumentParser:
    """The ``stim-hf export`` parser: a checkpoint, :class:`ExportArguments` and :class:`DataArguments`."""
    parser = SubcommandArgumentParser((ExportArguments, DataArguments), prog="stim-hf export")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="Model directory (config.json + model.safetensors).")
    return parser


def _recipe_defaults(path: str) -> dict[str, Any]:
    """The data fields and the seed of a training recipe, as parser defaults."""
    values = load_recipe(path)
    wanted = {f.name for f in fields(DataArguments) if f.init} | {"seed"}
    return {key: value for key, value in values.items() if key in wanted and value is not None}


def parse_export_args(
    argv: Sequence[str] | None = None,
) -> tuple[str, ExportArguments, DataArguments | None]:
    """Parse ``CHECKPOINT --depths ... --output DIR [...]``; data arguments only when a source is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    namespace, remaining = parser.parse_known_args(argv)
    if namespace.config:
        parser.set_defaults(**_recipe_defaults(namespace.config))
        namespace, remaining = parser.parse_known_args(argv)
    parser.refuse_unknown(remaining)
    values = vars(namespace)
    export_args = ExportArguments(**{f.name: values[f.name] for f in fields(ExportArguments)})
    if export_args.depths is None or export_args.output is None:
        missing = [name for name in ("depths", "output") if getattr(export_args, name) is None]
        raise ConfigError(
            f"stim-hf export needs {' and '.join('--' + m for m in missing)}, e.g. "
            "'stim-hf export outputs/run --depths 3,2,1 --output exported/'"
        )
    data_values = {f.name: values[f.name] for f in fields(DataArguments) if f.init}
    data_args = DataArguments(**data_values) if any(data_values[k] is not None for k in _DATA_SOURCE_FIELDS) else None
    return namespace.checkpoint, export_args, data_args


def main(argv: Sequence[str] | None = None) -> PreTrainedModel:
    """Entry point of ``stim-hf export``; configuration errors propagate as :class:`StimError`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    checkpoint, args, data_args = parse_export_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("stim_hf").setLevel(logging.INFO)
    exported = export_subnet(
        checkpoint,
        parse_depths(args.depths),
        args.output,
        recalibrate_bn=args.recalibrate_bn,
        data_args=data_args,
        evaluate=args.evaluate,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        command="stim-hf export " + " ".join(argv),
        overwrite=args.overwrite,
    )
    info = json.loads((Path(args.output) / "export_info.json").read_text())
    summary = (
        f"exported depths={args.depths} of {checkpoint} to {args.output}: {info['num_parameters']:,} parameters "
        f"({100 * info['num_parameters'] / info['full_num_parameters']:.1f}% of the full model)"
    )
    if "metrics" in info:
        summary += (
            f", top-1 {100 * info['metrics']['accuracy']:.2f}% (full model "
            f"{100 * info['full_metrics']['accuracy']:.2f}%)"
        )
    print(summary, flush=True)
    return exported
