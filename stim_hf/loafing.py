"""Loafing analysis: how well the sub-networks of trained checkpoints work on their own.

``stim-hf loafing CKPT [CKPT ...] --num-subnets 8 --seed 42 --train_file ... --validation_file ...``
evaluates, on the validation split, the full network and the same sub-networks of every
checkpoint: ``N`` sub-networks drawn with the training sampling rule (the same ones
``StimulativeTrainer.fixed_subnets(N)`` evaluates for that seed, rule and sample space) and,
with ``--sweep-stage K``, every allowed depth of stage ``K`` with the other stages full. For each
it reports the kept blocks, its share of the full network's FLOPs (counted, see
:mod:`stim_hf.flops`) and its top-1 accuracy; per checkpoint the full network's accuracy, the
mean / min / max sub-network accuracy and the loafing gap::

    relative_subnet_accuracy = mean_subnet_accuracy / full_accuracy
    loafing_gap              = 1 - relative_subnet_accuracy

(0: the sub-networks are, on average, as accurate as the full network; 1: they are useless). With
``--recalibrate-bn N`` every network is also evaluated after re-estimating its BatchNorm
statistics on ``N`` training images, which separates "the weights loaf" from "the BatchNorm
statistics (those of the full network) do not fit the sub-network". Results go to
``loafing.json``, ``loafing.csv`` and ``loafing.png`` in ``--output-dir``.

The building blocks (:func:`fixed_eval_subnets`, :func:`stage_sweep_subnets`,
:func:`evaluate_model`, :func:`subnet_batchnorm_statistics`, :func:`loafing_summary`,
:func:`analyze_checkpoints`, :func:`write_report`) are reusable from Python.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from stim_hf.batchnorm import batchnorm_layers, recalibrate_batchnorm
from stim_hf.config import StimulativeTrainingArguments, method_settings, parse_sample_space
from stim_hf.data import DataArguments, get_label_names, load_image_datasets
from stim_hf.errors import ConfigError, DataError
from stim_hf.flops import count_flops
from stim_hf.modeling import load_saved_classifier
from stim_hf.parser import SubcommandArgumentParser, load_recipe
from stim_hf.plotting import LoafingSeries, plot_loafing, save_figure
from stim_hf.subnets import (
    EVAL_SUBNET_STREAM,
    SAMPLING_RULES,
    ResidualStage,
    Subnet,
    SubnetSampler,
    find_residual_family,
    resize_for_subnet,
    use_subnet,
)
from stim_hf.subnets.sampling import resolve_sample_space, subnet_from_depths
from stim_hf.transforms import collate_image_batch, with_image_transforms

logger = logging.getLogger(__name__)

REPORT_FILES = {"json": "loafing.json", "csv": "loafing.csv", "png": "loafing.png"}
"""File names :func:`write_report` writes in the output directory."""

CSV_COLUMNS = (
    "checkpoint",
    "path",
    "network",
    "kind",
    "depths",
    "kept",
    "depth_fraction",
    "flops",
    "flop_share",
    "accuracy",
    "loss",
    "accuracy_bn_recalibrated",
    "loss_bn_recalibrated",
)


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


@dataclass
class LoafingArguments:
    """Settings of ``stim-hf loafing`` (the data come from :class:`~stim_hf.data.DataArguments`)."""

    num_subnets: int = field(
        default=8,
        metadata={"help": "Sub-networks drawn with the training sampling rule and evaluated on every checkpoint."},
    )
    seed: int = field(
        default=42,
        metadata={
            "help": "Seed of the sub-network draws (the trainer's 'seed' gives the sub-networks it evaluated) and "
            "of the validation carve-out / max_eval_samples subset, as in training."
        },
    )
    sampling: str = field(
        default="prefix",
        metadata={"help": "Sampling rule of the drawn sub-networks: 'prefix' (ST++) or 'subset' (ST)."},
    )
    sample_space: str = field(
        default="full",
        metadata={"help": "Per-stage maximum of dropped blocks, e.g. '0,1,3,0', or 'full' (as in training)."},
    )
    sweep_stage: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Stage index (0-based), or several: also evaluate every allowed depth of that stage with the "
            "other stages full."
        },
    )
    recalibrate_bn: int = field(
        default=0,
        metadata={
            "help": "Also evaluate every network after re-estimating its BatchNorm statistics on this many "
            "training images (0: off)."
        },
    )
    output_dir: str = field(default="loafing", metadata={"help": "Where loafing.json, .csv and .png are written."})
    labels: list[str] = field(
        default_factory=list,
        metadata={"help": "One name per checkpoint for tables and the plot (default: from the paths)."},
    )
    batch_size: int = field(default=256, metadata={"help": "Evaluation batch size."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes for decoding images."})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda when available, else cpu), 'cpu', 'cuda:0'."})
    eval_cache_mb: int = field(
        default=2048,
        metadata={
            "help": "Keep the decoded validation images in memory (decoded once for all networks) when they "
            "fit in this many MiB; else decode them again for every network."
        },
    )
    config: str | None = field(
        default=None,
        metadata={
            "help": "A training recipe (YAML): its data fields, seed, sampling rule and sample space (subnet_sampling "
            "and sample_space, else those of its stim_method preset, as in training), num_eval_subnets and "
            "per_device_eval_batch_size become defaults; other keys are ignored."
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        for name in ("num_subnets", "recalibrate_bn", "num_workers", "eval_cache_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an integer >= 0")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size!r} must be an integer >= 1")
        if self.sampling not in SAMPLING_RULES:
            raise ConfigError(f"sampling={self.sampling!r} is not valid; choose one of: {', '.join(SAMPLING_RULES)}")
        parsed = parse_sample_space(self.sample_space)
        self.sample_space = parsed if parsed == "full" else ",".join(map(str, parsed))
        if any(stage < 0 for stage in self.sweep_stage):
            raise ConfigError(f"sweep_stage={self.sweep_stage} must hold stage indices >= 0")

    @property
    def sample_space_value(self) -> str | list[int]:
        """``sample_space`` as the sampler takes it: ``"full"`` or a list of per-stage maxima."""
        return parse_sample_space(self.sample_space)


# Training-recipe keys that --config maps onto LoafingArguments fields.
_RECIPE_KEYS = {
    "seed": "seed",
    "subnet_sampling": "sampling",
    "sample_space": "sample_space",
    "num_eval_subnets": "num_subnets",
    "per_device_eval_batch_size": "batch_size",
    "dataloader_num_workers": "num_workers",
}


def _as_default(value: Any) -> Any:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, (int, float)):
        return str(value)
    return value


def build_parser() -> SubcommandArgumentParser:
    """The ``stim-hf loafing`` argument parser: checkpoints, :class:`LoafingArguments`, :class:`DataArguments`."""
    parser = SubcommandArgumentParser((LoafingArguments, DataArguments), prog="stim-hf loafing")
    parser.add_argument(
        "checkpoints", nargs="+", metavar="CKPT", help="Model directories (config.json + model.safetensors)."
    )
    return parser


def parse_loafing_args(argv: Sequence[str] | None = None) -> tuple[LoafingArguments, DataArguments, list[str]]:
    """Parse ``CKPT [CKPT ...] [--field value ...]`` (``--field`` or ``--field-name``) into the arguments.

    With ``--config RECIPE.yaml`` the recipe's data fields and sampling settings become defaults
    that the command line overrides.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config = _find_config(argv)
    if config is not None:
        parser.set_defaults(**_recipe_defaults(config))
    loafing_args, data_args, namespace, remaining = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    parser.refuse_unknown(remaining)
    checkpoints = list(namespace.checkpoints)
    if loafing_args.labels and len(loafing_args.labels) != len(checkpoints):
        raise ConfigError(
            f"--labels gives {len(loafing_args.labels)} names for {len(checkpoints)} checkpoints; give one per "
            "checkpoint (or none)"
        )
    return loafing_args, data_args, checkpoints


def _find_config(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _recipe_defaults(path: str) -> dict[str, Any]:
    values = load_recipe(path)
    values.update(recipe_sampling(values, path))
    data_fields = {f.name for f in fields(DataArguments) if f.init}
    defaults = {k: _as_default(v) for k, v in values.items() if k in data_fields and v is not None}
    defaults.update({_RECIPE_KEYS[k]: _as_default(v) for k, v in values.items() if k in _RECIPE_KEYS and v is not None})
    return defaults


def recipe_sampling(recipe: dict[str, Any], path: str) -> dict[str, Any]:
    """The ``subnet_sampling`` and ``sample_space`` that training with ``recipe`` (read from ``path``) uses.

    Values the recipe sets win; the others come from its ``stim_method`` preset (``st``: subset
    sampling), as :class:`~stim_hf.config.StimulativeTrainingArguments` fills them.
    """
    method = recipe.get("stim_method") or StimulativeTrainingArguments.__dataclass_fields__["stim_method"].default
    try:
        settings = method_settings(method, recipe)
    except ConfigError as error:
        raise ConfigError(f"{error} (in '{path}'); fix the recipe") from None
    return {name: settings[name] for name in ("subnet_sampling", "sample_space")}


# --------------------------------------------------------------------------------------------------
# Which sub-networks
# --------------------------------------------------------------------------------------------------


def fixed_eval_subnets(
    stages: Sequence[ResidualStage],
    num_subnets: int,
    seed: int,
    rule: str = "prefix",
    sample_space: str | Sequence[int] = "full",
) -> list[Subnet]:
    """``num_subnets`` distinct sub-networks (never the full one), at full input size, from a seed.

    Draws from :class:`~stim_hf.subnets.SubnetSampler` on its own random stream
    (the trainer's ``EVAL_SUBNET_STREAM``, independent of the training draws), exactly as
    ``StimulativeTrainer.fixed_subnets`` does: the same seed, rule and sample space give the same
    sub-networks for any checkpoint of the architecture. Fewer are returned when the sample space
    holds fewer distinct sub-networks.
    """
    sampler = SubnetSampler(stages, rule=rule, sample_space=sample_space, seed=seed, stream=EVAL_SUBNET_STREAM)
    return sampler.distinct_subnets(num_subnets)


def stage_sweep_subnets(
    stages: Sequence[ResidualStage], stage: int, sample_space: str | Sequence[int] = "full"
) -> list[Subnet]:
    """Every prefix depth of stage ``stage`` that the sample space allows, shallowest first, others full.

    The full network itself is not included.
    """
    if not 0 <= stage < len(stages):
        raise ConfigError(
            f"sweep_stage={stage} is out of range: the model has {len(stages)} residual stages (0..{len(stages) - 1})"
        )
    space = resolve_sample_space(sample_space, stages, "prefix")
    full = [s.num_blocks for s in stages]
    subnets = []
    for depth in range(full[stage] - space[stage], full[stage]):
        depths = list(full)
        depths[stage] = depth
        subnets.append(subnet_from_depths(stages, depths))
    return subnets


# --------------------------------------------------------------------------------------------------
# Evaluating a model as a sub-network
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    stages: Sequence[ResidualStage] | None = None,
    subnet: Subnet | None = None,
    device: torch.device | str | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    forward_kwargs: dict | None = None,
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` (or of ``subnet`` of it) on ``batches``.

    ``batches`` yield ``{"pixel_values", "labels"}`` (moved to ``device``, default the model's).
    The model runs in eval mode (its mode is restored), so BatchNorm uses its running statistics:
    those of the full network unless changed (see :func:`subnet_batchnorm_statistics`). A
    sub-network with an ``input_size`` gets its batches resized to it. ``gather`` (e.g.
    ``accelerator.gather_for_metrics``) collects per-example results across processes in a
    distributed run. Returns ``{"accuracy", "loss", "num_samples"}``.
    """
    if subnet is not None and stages is None:
        raise ValueError("evaluate_model needs the model's stages to run a sub-network")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    correct_sum, loss_sum, count = 0.0, 0.0, 0
    context = use_subnet_or_full(stages, subnet)
    try:
        model.eval()
        with context:
            for batch in batches:
                pixel_values = resize_for_subnet(batch["pixel_values"].to(device), subnet)
                labels = batch["labels"].to(device)
                logits = model(pixel_values=pixel_values, **(forward_kwargs or {})).logits.float()
                correct = (logits.argmax(dim=-1) == labels).float()
                losses = F.cross_entropy(logits, labels, reduction="none")
                if gather is not None:
                    correct, losses = gather(correct), gather(losses)
                correct_sum += float(correct.sum())
                loss_sum += float(losses.sum())
                count += int(correct.numel())
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("no evaluation examples: the evaluation data is empty")
    return {"accuracy": correct_sum / count, "loss": loss_sum / count, "num_samples": count}


def use_subnet_or_full(stages: Sequence[ResidualStage] | None, subnet: Subnet | None):
    """``use_subnet(stages, subnet)`` for a proper sub-network, a no-op context for ``None`` or the full one."""
    if subnet is None or subnet.is_full:
        return nullcontext()
    return use_subnet(stages, subnet)


def batchnorm_state(model: nn.Module) -> list[tuple[torch.Tensor, ...]]:
    """Copies of every BatchNorm layer's running mean, running variance and batch counter."""
    return [
        (layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone())
        for layer in batchnorm_layers(model)
    ]


def restore_batchnorm_state(model: nn.Module, state: Sequence[tuple[torch.Tensor, ...]]) -> None:
    """Put back the statistics saved by :func:`batchnorm_state` (same model, same layers)."""
    for layer, (mean, var, tracked) in zip(batchnorm_layers(model), state, strict=True):
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
        layer.num_batches_tracked.copy_(tracked)


@contextmanager
def subnet_batchnorm_statistics(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    num_samples: int,
    stages: Sequence[ResidualStage] | None = None,
    subnet: Subnet | None = None,
    device: torch.device | str | None = None,
) -> Iterator[int]:
    """Inside the block, ``model``'s BatchNorm statistics are re-estimated for ``subnet`` (or the full net).

    Runs :func:`stim_hf.batchnorm.recalibrate_batchnorm` on about ``num_samples`` images of
    ``batches`` while the model runs as ``subnet`` (resized to its input size if it has one);
    yields the number of images used. The original statistics are restored on exit, so the next
    network starts from the checkpoint's own.
    """
    if device is None:
        device = next(model.parameters()).device
    saved = batchnorm_state(model)
    moved = ({"pixel_values": resize_for_subnet(b["pixel_values"].to(device), subnet)} for b in batches)
    try:
        with use_subnet_or_full(stages, subnet):
            seen = recalibrate_batchnorm(model, moved, num_samples)
        yield seen
    finally:
        with torch.no_grad():
            restore_batchnorm_state(model, saved)


def loafing_summary(
    full_accuracy: float, subnet_accuracies: Sequence[float], suffix: str = ""
) -> dict[str, float | None]:
    """Per-checkpoint summary: full accuracy, mean / min / max sub-network accuracy, the loafing gap.

    ``relative_subnet_accuracy = mean / full`` and ``loafing_gap = 1 - mean / full`` (``None`` when
    there are no sub-networks or the full accuracy is 0). ``suffix`` is appended to every key
    (``"_bn_recalibrated"`` for the recalibrated columns).
    """
    accuracies = [float(a) for a in subnet_accuracies]
    mean = sum(accuracies) / len(accuracies) if accuracies else None
    relative = mean / full_accuracy if mean is not None and full_accuracy > 0 else None
    summary = {
        "full_accuracy": float(full_accuracy),
        "subnet_accuracy_mean": mean,
        "subnet_accuracy_min": min(accuracies) if accuracies else None,
        "subnet_accuracy_max": max(accuracies) if accuracies else None,
        "relative_subnet_accuracy": relative,
        "loafing_gap": 1.0 - relative if relative is not None else None,
    }
    return {key + suffix: value for key, value in summary.items()}


# --------------------------------------------------------------------------------------------------
# Data and checkpoints
# --------------------------------------------------------------------------------------------------


class BatchSource:
    """Re-iterable batches of a transformed dataset: decoded once and kept, or decoded on every pass.

    Keeps the collated batches in memory when ``cache`` is true; otherwise every iteration runs a
    new :class:`~torch.utils.data.DataLoader`. Either way every pass yields the same images.
    """

    def __init__(self, dataset, batch_size: int, num_workers: int = 0, cache: bool = True) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache = cache
        self._batches: list[dict[str, torch.Tensor]] | None = None

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_image_batch,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.cache:
            yield from self._loader()
            return
        if self._batches is None:
            self._batches = list(self._loader())
        yield from self._batches

    def __len__(self) -> int:
        return len(self.dataset)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """Load an image classifier saved with ``save_pretrained`` (safetensors), in float32 and eval mode."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one progress bar (ours), not one per checkpoint load
    try:
        model = load_saved_classifier(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def checkpoint_labels(paths: Sequence[str]) -> list[str]:
    """Short distinct names for checkpoint paths: the folder name, or more of the path when names clash."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _stage_signature(stages: Sequence[ResidualStage]) -> tuple:
    return tuple((stage.num_blocks, stage.skippable) for stage in stages)


# --------------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------------


def analyze_checkpoints(
    checkpoints: Sequence[str],
    data_args: DataArguments,
    args: LoafingArguments,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the loafing analysis on ``checkpoints`` and return the report (what ``loafing.json`` holds).

    The report has ``settings``, ``networks`` (one entry per evaluated network: ``name``,
    ``kind`` = full / sampled / sweep, ``depths``, ``kept``, ``depth_fraction``, ``flops``,
    ``flop_share``) and ``checkpoints`` (per checkpoint: ``label``, ``path``, ``results`` per
    network with ``accuracy``, ``loss`` and, with ``recalibrate_bn``, ``accuracy_bn_recalibrated``
    and ``loss_bn_recalibrated``; and ``summary`` from :func:`loafing_summary`, over the sampled
    sub-networks, or over the sweep ones when none is sampled). All checkpoints must share one
    architecture.
    """
    if not checkpoints:
        raise ConfigError("give at least one checkpoint directory")
    labels = list(labels) if labels else checkpoint_labels(checkpoints)
    device = _resolve_device(args.device)

    splits = load_image_datasets(data_args, seed=args.seed)
    label_names = get_label_names(splits["train"], data_args.label_column_name)
    eval_dataset = with_image_transforms(splits["validation"], data_args, train=False)
    size = data_args.resolved_eval_image_size()
    cache_bytes = len(eval_dataset) * 3 * size * size * 4
    eval_batches = BatchSource(
        eval_dataset, args.batch_size, args.num_workers, cache=cache_bytes <= args.eval_cache_mb * 2**20
    )
    recal_batches = _recalibration_batches(splits["train"], data_args, args) if args.recalibrate_bn else None
    example = next(iter(eval_batches))["pixel_values"][:1].to(device)

    networks: list[dict[str, Any]] = []
    subnets: list[Subnet | None] = []
    signature = None
    bar = tqdm(total=None, desc="loafing", unit="net", disable=not args.progress, dynamic_ncols=True)
    results = []
    try:
        for path, label in zip(checkpoints, labels, strict=True):
            bar.set_postfix_str(label)
            model = load_checkpoint(path, device)
            if model.config.num_labels != len(label_names):
                raise DataError(
                    f"checkpoint '{path}' has {model.config.num_labels} classes but the evaluation data has "
                    f"{len(label_names)}; evaluate it on the data set it was trained for"
                )
            family, stages = find_residual_family(model)
            if signature is None:
                signature = _stage_signature(stages)
                subnets, networks = _plan_networks(model, stages, example, args)
                bar.total = len(checkpoints) * len(subnets)
                bar.refresh()
            elif _stage_signature(stages) != signature:
                raise ConfigError(
                    f"checkpoint '{path}' has another block structure than '{checkpoints[0]}'; the loafing "
                    "analysis compares the same sub-networks, so give checkpoints of one architecture"
                )
            rows = []
            for subnet, network in zip(subnets, networks, strict=True):
                row = {"network": network["name"]}
                row.update(_evaluate_row(model, stages, subnet, eval_batches, recal_batches, args, device, family))
                rows.append(row)
                bar.update(1)
            results.append({"label": label, "path": str(path), "results": rows, "summary": _summarize(rows, networks)})
            del model
    finally:
        bar.close()

    return {
        "settings": {
            **{k: v for k, v in asdict(args).items() if k not in ("progress", "config")},
            "eval_image_size": size,
            "num_eval_images": len(eval_dataset),
            "num_classes": len(label_names),
            "data": {k: v for k, v in asdict(data_args).items() if v is not None},
            "loafing_gap": "1 - mean sub-network accuracy / full-network accuracy",
        },
        "networks": networks,
        "checkpoints": results,
    }


def _recalibration_batches(train_split, data_args: DataArguments, args: LoafingArguments) -> list[dict]:
    """The first ``recalibrate_bn`` images of a seeded permutation of the training split, with the
    training augmentation under a fixed torch seed: the same images for every network."""
    num = min(args.recalibrate_bn, len(train_split))
    order = np.random.default_rng(args.seed).permutation(len(train_split))[:num].tolist()
    dataset = with_image_transforms(train_split, data_args, train=True)
    loader = DataLoader(
        Subset(dataset, order), batch_size=args.batch_size, collate_fn=collate_image_batch, num_workers=0
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return list(loader)


def _plan_networks(
    model: nn.Module, stages: Sequence[ResidualStage], example: torch.Tensor, args: LoafingArguments
) -> tuple[list[Subnet | None], list[dict[str, Any]]]:
    sampled = fixed_eval_subnets(stages, args.num_subnets, args.seed, args.sampling, args.sample_space_value)
    if len(sampled) < args.num_subnets:
        logger.warning(
            "only %d distinct sub-networks exist in this sample space (asked for %d)", len(sampled), args.num_subnets
        )
    planned: list[tuple[str, str, Subnet | None]] = [("full", "full", None)]
    planned += [(f"subnet_{i}", "sampled", s) for i, s in enumerate(sampled)]
    for stage in args.sweep_stage:
        for subnet in stage_sweep_subnets(stages, stage, args.sample_space_value):
            planned.append((f"stage{stage}_depth{subnet.depths[stage]}", "sweep", subnet))
    full_flops = count_flops(model, example)
    num_blocks = tuple(s.num_blocks for s in stages)
    networks, subnets = [], []
    for name, kind, subnet in planned:
        flops = full_flops if subnet is None else count_flops(model, example, stages, subnet)
        shown = subnet or Subnet(kept=tuple(tuple(range(n)) for n in num_blocks), num_blocks=num_blocks)
        networks.append(
            {
                "name": name,
                "kind": kind,
                "depths": list(shown.depths),
                "kept": [list(k) for k in shown.kept],
                "depth_fraction": shown.depth_fraction,
                "flops": flops,
                "flop_share": flops / full_flops if full_flops else math.nan,
            }
        )
        subnets.append(subnet)
    return subnets, networks


def _evaluate_row(model, stages, subnet, eval_batches, recal_batches, args, device, family) -> dict[str, float]:
    kwargs = family.resized_forward_kwargs if subnet is not None and subnet.input_size is not None else None
    metrics = evaluate_model(model, eval_batches, stages, subnet, device=device, forward_kwargs=kwargs)
    row = {"accuracy": metrics["accuracy"], "loss": metrics["loss"]}
    if recal_batches is not None:
        with subnet_batchnorm_statistics(model, recal_batches, args.recalibrate_bn, stages, subnet, device):
            recal = evaluate_model(model, eval_batches, stages, subnet, device=device, forward_kwargs=kwargs)
        row["accuracy_bn_recalibrated"] = recal["accuracy"]
        row["loss_bn_recalibrated"] = recal["loss"]
    return row


def _summarize(rows: list[dict[str, Any]], networks: list[dict[str, Any]]) -> dict[str, float | None]:
    kinds = [n["kind"] for n in networks]
    chosen = "sampled" if "sampled" in kinds else "sweep"
    sub_rows = [row for row, kind in zip(rows, kinds, strict=True) if kind == chosen]
    full = rows[kinds.index("full")]
    summary = loafing_summary(full["accuracy"], [r["accuracy"] for r in sub_rows])
    if "accuracy_bn_recalibrated" in full:
        summary.update(
            loafing_summary(
                full["accuracy_bn_recalibrated"],
                [r["accuracy_bn_recalibrated"] for r in sub_rows],
                suffix="_bn_recalibrated",
            )
        )
    summary["summary_over"] = chosen if sub_rows else "none"
    return summary


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report flattened to one row per (checkpoint, network), with :data:`CSV_COLUMNS` keys."""
    networks = {n["name"]: n for n in report["networks"]}
    rows = []
    for checkpoint in report["checkpoints"]:
        for result in checkpoint["results"]:
            network = networks[result["network"]]
            rows.append(
                {
                    "checkpoint": checkpoint["label"],
                    "path": checkpoint["path"],
                    "network": network["name"],
                    "kind": network["kind"],
                    "depths": ",".join(map(str, network["depths"])),
                    "kept": "|".join("-".join(map(str, k)) for k in network["kept"]),
                    "depth_fraction": network["depth_fraction"],
                    "flops": network["flops"],
                    "flop_share": network["flop_share"],
                    "accuracy": result["accuracy"],
                    "loss": result["loss"],
                    "accuracy_bn_recalibrated": result.get("accuracy_bn_recalibrated"),
                    "loss_bn_recalibrated": result.get("loss_bn_recalibrated"),
                }
            )
    return rows


def loafing_series(report: dict[str, Any]) -> list[LoafingSeries]:
    """One :class:`~stim_hf.plotting.LoafingSeries` per checkpoint of the report (for the plot)."""
    networks = report["networks"]
    series = []
    for checkpoint in report["checkpoints"]:
        results = checkpoint["results"]
        full = next(r for r, n in zip(results, networks, strict=True) if n["kind"] == "full")
        subs = [(r, n) for r, n in zip(results, networks, strict=True) if n["kind"] != "full"]
        recal = "accuracy_bn_recalibrated" in full
        series.append(
            LoafingSeries(
                label=checkpoint["label"],
                full_accuracy=full["accuracy"],
                flop_shares=[n["flop_share"] for _, n in subs],
                accuracies=[r["accuracy"] for r, _ in subs],
                recalibrated_accuracies=[r["accuracy_bn_recalibrated"] for r, _ in subs] if recal else None,
                full_accuracy_recalibrated=full.get("accuracy_bn_recalibrated"),
            )
        )
    return series


def write_report(report: dict[str, Any], output_dir: str | os.PathLike, title: str | None = None) -> dict[str, Path]:
    """Write ``loafing.json``, ``loafing.csv`` and ``loafing.png`` into ``output_dir``; return their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: output_dir / name for kind, name in REPORT_FILES.items()}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in report_rows(report):
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    num_classes = report.get("settings", {}).get("num_classes")
    figure = plot_loafing(loafing_series(report), title=title, chance=1 / num_classes if num_classes else None)
    save_figure(figure, paths["png"])
    return paths


def format_summary_table(report: dict[str, Any]) -> str:
    """A Markdown table of the per-checkpoint summaries (accuracies in %)."""
    recal = any("full_accuracy_bn_recalibrated" in c["summary"] for c in report["checkpoints"])
    header = ["checkpoint", "full", "sub-net mean", "min", "max", "loafing gap"]
    if recal:
        header += ["full (BN re-est.)", "sub-net mean (BN re-est.)", "loafing gap (BN re-est.)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}"

    for checkpoint in report["checkpoints"]:
        s = checkpoint["summary"]
        cells = [
            checkpoint["label"],
            pct(s["full_accuracy"]),
            pct(s["subnet_accuracy_mean"]),
            pct(s["subnet_accuracy_min"]),
            pct(s["subnet_accuracy_max"]),
            "n/a" if s["loafing_gap"] is None else f"{s['loafing_gap']:.3f}",
        ]
        if recal:
            gap = s.get("loafing_gap_bn_recalibrated")
            cells += [
                pct(s.get("full_accuracy_bn_recalibrated")),
                pct(s.get("subnet_accuracy_mean_bn_recalibrated")),
                "n/a" if gap is None else f"{gap:.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_network_table(report: dict[str, Any]) -> str:
    """A Markdown table with one row per network: depths, FLOP share, each checkpoint's accuracy (%).

    With BatchNorm recalibration, each checkpoint gets a second column "(BN re-est.)".
    """
    checkpoints = report["checkpoints"]
    recal = any("accuracy_bn_recalibrated" in c["results"][0] for c in checkpoints)
    header = ["network", "depths", "FLOPs (share)"]
    for checkpoint in checkpoints:
        header.append(checkpoint["label"])
        if recal:
            header.append(f"{checkpoint['label']} (BN re-est.)")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for index, network in enumerate(report["networks"]):
        cells = [
            network["name"],
            ",".join(map(str, network["depths"])),
            f"{network['flops'] / 1e6:.1f} M ({100 * network['flop_share']:.0f}%)",
        ]
        for checkpoint in checkpoints:
            result = checkpoint["results"][index]
            cells.append(f"{100 * result['accuracy']:.2f}")
            if recal:
                cells.append(f"{100 * result['accuracy_bn_recalibrated']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``stim-hf loafing``: parse, analyse, write the files, print the summary table."""
    args, data_args, checkpoints = parse_loafing_args(argv)
    report = analyze_checkpoints(checkpoints, data_args, args, labels=args.labels or None)
    paths = write_report(report, args.output_dir)
    print(format_summary_table(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)
    return report
