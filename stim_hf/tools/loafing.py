"""Loafing analysis: how well the sub-networks of trained checkpoints work on their own.

``stim-hf loafing CKPT [CKPT ...] --num-subnets 8 --seed 42 --train_file ... --validation_file ...``
evaluates, on the validation split, the full network and the same sub-networks of every
checkpoint: ``N`` sub-networks drawn with the training sampling rule (the same ones
``StimulativeTrainer.fixed_subnets(N)`` evaluates for that seed, rule and sample space) and,
with ``--sweep-stage K``, every allowed depth of stage ``K`` with the other stages full. For each
it reports the kept blocks, its share of the full network's FLOPs (counted, see
:mod:`stim_hf.analysis.flops`) and its top-1 accuracy; per checkpoint the full network's accuracy, the
mean / min / max sub-network accuracy and the loafing gap::

    relative_subnet_accuracy = mean_subnet_accuracy / full_accuracy
    loafing_gap              = 1 - relative_subnet_accuracy

(0: the sub-networks are, on average, as accurate as the full network; 1: they are useless). Each
sub-network is scored with BatchNorm statistics re-estimated for it on ``--recalibrate-bn N``
training images (by default when training data is given; the full network stays as trained), and
beside it, suffixed ``_inherited_bn``, with the full network's statistics: the papers' measure of
loafing, which mixes "the weights loaf" with "the full network's statistics do not fit the
sub-network". ``--recalibrate-bn 0``, or no training data, keeps the inherited statistics only.
Results go to ``loafing.json``, ``loafing.csv`` and ``loafing.png`` in ``--output-dir``.

The building blocks (:func:`fixed_eval_subnets`, :func:`stage_sweep_subnets`,
:func:`~stim_hf.analysis.evaluation.evaluate_model`, :func:`~stim_hf.method.batchnorm.subnet_batchnorm_statistics`,
:func:`loafing_summary`, :func:`analyze_checkpoints`, :func:`write_report`) are reusable from Python.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from stim_hf.analysis.evaluation import (  # noqa: F401  (evaluate_model, BatchSource: also importable from here)
    BatchSource,
    evaluate_model,
    print_notice,
    recalibration_batches,
    resolve_recalibration_samples,
)
from stim_hf.analysis.flops import count_flops
from stim_hf.analysis.plotting import LoafingSeries, plot_loafing, save_figure
from stim_hf.data.image_datasets import DataArguments, EvaluationDataArguments, get_label_names, load_image_datasets
from stim_hf.data.transforms import with_image_transforms
from stim_hf.errors import ConfigError, DataError
from stim_hf.method import (
    EVAL_SUBNET_STREAM,
    SAMPLING_RULES,
    ResidualStage,
    Subnet,
    SubnetSampler,
    find_residual_family,
)
from stim_hf.method.batchnorm import subnet_batchnorm_statistics
from stim_hf.method.sampling import resolve_sample_space, subnet_from_depths
from stim_hf.tools.datasets_progress import datasets_work_in_lines
from stim_hf.training.config import StimulativeTrainingArguments, method_settings, parse_sample_space
from stim_hf.training.modeling import check_saved_model_dir, load_saved_classifier
from stim_hf.training.parser import SubcommandArgumentParser, load_recipe, recipe_defaults

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
    "accuracy_inherited_bn",
    "loss_inherited_bn",
)


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


@dataclass
class LoafingArguments:
    """Settings of ``stim-hf loafing`` (the data come from :class:`~stim_hf.data.image_datasets.DataArguments`)."""

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
    recalibrate_bn: int | None = field(
        default=None,
        metadata={
            "help": "Score every sub-network with BatchNorm statistics re-estimated for it on this many training "
            "images (default: 1024 when training data is given, else 0); the figures with the full network's "
            "statistics (the papers' loafing measure) are reported beside them. 0: those only."
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
            if name == "recalibrate_bn" and value is None:
                continue
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
    "subnet_bn_recalibration_samples": "recalibrate_bn",
}


def build_parser() -> SubcommandArgumentParser:
    """The ``stim-hf loafing`` parser: checkpoints, :class:`LoafingArguments`, :class:`~stim_hf.data.image_datasets.EvaluationDataArguments`."""
    parser = SubcommandArgumentParser((LoafingArguments, EvaluationDataArguments), prog="stim-hf loafing")
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
    """The recipe's data and sampling settings (its method's, where it leaves them to the preset) as defaults."""
    values = load_recipe(path)
    values.update(recipe_sampling(values, path))
    return recipe_defaults(values, _RECIPE_KEYS)


def recipe_sampling(recipe: dict[str, Any], path: str) -> dict[str, Any]:
    """The ``subnet_sampling`` and ``sample_space`` that training with ``recipe`` (read from ``path``) uses.

    Values the recipe sets win; the others come from its ``stim_method`` preset (``st``: subset
    sampling), as :class:`~stim_hf.training.config.StimulativeTrainingArguments` fills them.
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

    Draws from :class:`~stim_hf.method.SubnetSampler` on its own random stream
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
# Summaries
# --------------------------------------------------------------------------------------------------


def loafing_summary(
    full_accuracy: float, subnet_accuracies: Sequence[float], suffix: str = ""
) -> dict[str, float | None]:
    """Per-checkpoint summary: full accuracy, mean / min / max sub-network accuracy, the loafing gap.

    ``relative_subnet_accuracy = mean / full`` and ``loafing_gap = 1 - mean / full`` (``None`` when
    there are no sub-networks or the full accuracy is 0). ``suffix`` is appended to every key
    (``"_inherited_bn"`` for the columns with the full network's BatchNorm statistics).
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

    The report has ``settings`` (``recalibrate_bn``: the training images each sub-network's
    BatchNorm statistics were re-estimated on, 0 for none; ``bn_statistics`` says it in words),
    ``networks`` (one entry per evaluated network: ``name``, ``kind`` = full / sampled / sweep,
    ``depths``, ``kept``, ``depth_fraction``, ``flops``, ``flop_share``) and ``checkpoints`` (per
    checkpoint: ``label``, ``path``, ``results`` per network with ``accuracy`` and ``loss``, with
    re-estimated statistics, and ``accuracy_inherited_bn`` / ``loss_inherited_bn``, with the full
    network's; the full network itself is scored as trained; and ``summary`` from
    :func:`loafing_summary` for both, over the sampled sub-networks, or over the sweep ones when
    none is sampled). All checkpoints must share one architecture. Without a training source, an
    unset ``recalibrate_bn`` means 0 (:func:`~stim_hf.analysis.evaluation.resolve_recalibration_samples`).
    """
    if not checkpoints:
        raise ConfigError("give at least one checkpoint directory")
    labels = list(labels) if labels else checkpoint_labels(checkpoints)
    device = _resolve_device(args.device)
    num_recal = resolve_recalibration_samples(args.recalibrate_bn, data_args, "--recalibrate-bn")

    with datasets_work_in_lines("loading the images", show=args.progress):
        splits = load_image_datasets(data_args, seed=args.seed)
    label_names = get_label_names(splits["validation"], data_args.label_column_name)
    _check_checkpoints(checkpoints, len(label_names))  # before any progress bar
    eval_dataset = with_image_transforms(splits["validation"], data_args, train=False)
    size = data_args.resolved_eval_image_size()
    cache_bytes = len(eval_dataset) * 3 * size * size * 4
    eval_batches = BatchSource(
        eval_dataset, args.batch_size, args.num_workers, cache=cache_bytes <= args.eval_cache_mb * 2**20
    )
    recal_batches = (
        recalibration_batches(splits["train"], data_args, num_recal, args.seed, args.batch_size) if num_recal else None
    )
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
                kwargs = family.resized_forward_kwargs if subnet is not None and subnet.input_size else None
                row = {"network": network["name"]}
                row.update(_evaluate_row(model, stages, subnet, eval_batches, recal_batches, num_recal, device, kwargs))
                rows.append(row)
                bar.update(1)
            results.append({"label": label, "path": str(path), "results": rows, "summary": _summarize(rows, networks)})
            del model
    finally:
        bar.close()

    return {
        "settings": {
            **{k: v for k, v in asdict(args).items() if k not in ("progress", "config")},
            "recalibrate_bn": num_recal,
            "bn_statistics": bn_statistics_caption(num_recal),
            "eval_image_size": size,
            "num_eval_images": len(eval_dataset),
            "num_classes": len(label_names),
            "data": {k: v for k, v in asdict(data_args).items() if v is not None},
            "loafing_gap": "1 - mean sub-network accuracy / full-network accuracy",
        },
        "networks": networks,
        "checkpoints": results,
    }


def bn_statistics_caption(num_samples: int) -> str:
    """One line saying which BatchNorm statistics the sub-networks were scored with."""
    if num_samples:
        return (
            f"sub-networks scored with BatchNorm statistics re-estimated for each on {num_samples} training images; "
            "'inherited BN': with the full network's statistics, the papers' loafing measure"
        )
    return (
        "sub-networks scored with the full network's BatchNorm statistics (inherited BN), the papers' loafing measure"
    )


def _check_checkpoints(checkpoints: Sequence[str], num_classes: int) -> None:
    """Every checkpoint is a loadable model folder with ``num_classes`` classes (ConfigError / DataError)."""
    for path in checkpoints:
        check_saved_model_dir(path, f"checkpoint '{path}'")
        num_labels = AutoConfig.from_pretrained(path).num_labels
        if num_labels != num_classes:
            raise DataError(
                f"checkpoint '{path}' has {num_labels} classes but the evaluation data has {num_classes}; "
                "evaluate it on the data set it was trained for"
            )


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


def _evaluate_row(
    model, stages, subnet, eval_batches, recal_batches, num_recal, device, forward_kwargs
) -> dict[str, float]:
    inherited = evaluate_model(model, eval_batches, stages, subnet, device=device, forward_kwargs=forward_kwargs)
    own = inherited  # the full network as trained, or every network with recalibrate_bn 0
    if recal_batches is not None and subnet is not None:
        with subnet_batchnorm_statistics(
            model, recal_batches, num_recal, stages, subnet, device, forward_kwargs=forward_kwargs
        ):
            own = evaluate_model(model, eval_batches, stages, subnet, device=device, forward_kwargs=forward_kwargs)
    return {
        "accuracy": own["accuracy"],
        "loss": own["loss"],
        "accuracy_inherited_bn": inherited["accuracy"],
        "loss_inherited_bn": inherited["loss"],
    }


def _summarize(rows: list[dict[str, Any]], networks: list[dict[str, Any]]) -> dict[str, float | None]:
    kinds = [n["kind"] for n in networks]
    chosen = "sampled" if "sampled" in kinds else "sweep"
    sub_rows = [row for row, kind in zip(rows, kinds, strict=True) if kind == chosen]
    full = rows[kinds.index("full")]["accuracy"]
    summary = loafing_summary(full, [r["accuracy"] for r in sub_rows])
    summary.update(loafing_summary(full, [r["accuracy_inherited_bn"] for r in sub_rows], suffix="_inherited_bn"))
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
                    **{key: result.get(key) for key in CSV_COLUMNS[-4:]},
                }
            )
    return rows


def _reestimated(report: dict[str, Any]) -> bool:
    return bool(report.get("settings", {}).get("recalibrate_bn"))


def loafing_series(report: dict[str, Any]) -> list[LoafingSeries]:
    """One :class:`~stim_hf.analysis.plotting.LoafingSeries` per checkpoint of the report (for the plot)."""
    networks = report["networks"]
    both = _reestimated(report)
    series = []
    for checkpoint in report["checkpoints"]:
        results = checkpoint["results"]
        full = next(r for r, n in zip(results, networks, strict=True) if n["kind"] == "full")
        subs = [(r, n) for r, n in zip(results, networks, strict=True) if n["kind"] != "full"]
        # As the papers draw loafing: filled, the full network's statistics; hollow, re-estimated.
        series.append(
            LoafingSeries(
                label=checkpoint["label"],
                full_accuracy=full["accuracy"],
                flop_shares=[n["flop_share"] for _, n in subs],
                accuracies=[r["accuracy_inherited_bn"] for r, _ in subs],
                recalibrated_accuracies=[r["accuracy"] for r, _ in subs] if both else None,
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
    """A Markdown table of the per-checkpoint summaries (accuracies in %); "inherited BN" columns when re-estimated."""
    both = _reestimated(report)
    header = ["checkpoint", "full", "sub-net mean", "min", "max", "loafing gap"]
    if both:
        header += ["sub-net mean (inherited BN)", "loafing gap (inherited BN)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}"

    def gap(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    for checkpoint in report["checkpoints"]:
        s = checkpoint["summary"]
        cells = [
            checkpoint["label"],
            pct(s["full_accuracy"]),
            pct(s["subnet_accuracy_mean"]),
            pct(s["subnet_accuracy_min"]),
            pct(s["subnet_accuracy_max"]),
            gap(s["loafing_gap"]),
        ]
        if both:
            cells += [pct(s["subnet_accuracy_mean_inherited_bn"]), gap(s["loafing_gap_inherited_bn"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_network_table(report: dict[str, Any]) -> str:
    """A Markdown table with one row per network: depths, FLOP share, each checkpoint's accuracy (%).

    With re-estimated BatchNorm statistics, each checkpoint gets a second column "(inherited BN)".
    """
    checkpoints = report["checkpoints"]
    both = _reestimated(report)
    header = ["network", "depths", "FLOPs (share)"]
    for checkpoint in checkpoints:
        header.append(checkpoint["label"])
        if both:
            header.append(f"{checkpoint['label']} (inherited BN)")
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
            if both:
                cells.append(f"{100 * result['accuracy_inherited_bn']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``stim-hf loafing``: parse, analyse, write the files, print the summary table."""
    args, data_args, checkpoints = parse_loafing_args(argv)
    notes: list[str] = []  # said after the results, so that an error is the only line before them
    args.recalibrate_bn = resolve_recalibration_samples(
        args.recalibrate_bn, data_args, "--recalibrate-bn", notes.append
    )
    report = analyze_checkpoints(checkpoints, data_args, args, labels=args.labels or None)
    paths = write_report(report, args.output_dir)
    print(report["settings"]["bn_statistics"])
    print(format_summary_table(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)
    for note in notes:
        print_notice("stim-hf loafing")(note)
    return report
