"""The ``stim-hf export`` command line: its arguments, their parsing and ``main`` (the library: :mod:`stim_hf.tools.export`).

``stim-hf export CHECKPOINT --depths 3,2,1 --output DIR`` writes one sub-network
(:func:`~stim_hf.tools.export.export_subnet`); ``--front SEARCH_DIR`` writes every point of a
search's front into one budget-switching folder (:func:`~stim_hf.tools.budget_export.export_budget_model`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from stim_hf.analysis.evaluation import print_notice, resolve_recalibration_samples
from stim_hf.data.image_datasets import DataArguments, EvaluationDataArguments
from stim_hf.errors import ConfigError
from stim_hf.tools.budget_export import export_budget_model
from stim_hf.tools.export import export_subnet
from stim_hf.training.parser import SubcommandArgumentParser

# The data source fields of DataArguments: a data set is configured when one of them is set.
_DATA_SOURCE_FIELDS = ("dataset_name", "train_dir", "train_file", "validation_file", "validation_dir")


@dataclass
class ExportArguments:
    """Settings of ``stim-hf export`` (the data come from :class:`~stim_hf.data.image_datasets.DataArguments`)."""

    depths: str = field(
        default=None,
        metadata={"help": "Blocks to keep per stage, comma-separated (e.g. 3,2,1): the first depths[s] of stage s."},
    )
    output: str = field(default=None, metadata={"help": "Directory to write the exported model to."})
    front: str | None = field(
        default=None,
        metadata={
            "help": "A 'stim-hf search' --output-dir: write one budget-switching folder holding every point of its "
            "FLOPs front (model.set_budget(flops=0.3) switches at run time) instead of one sub-network (--depths)."
        },
    )
    recalibrate_bn: int | None = field(
        default=None,
        metadata={
            "help": "Re-estimate the export's BatchNorm statistics on this many training images (default: 1024 when "
            "training data is given, else 0; 0 keeps the full network's)."
        },
    )
    input_size: int | None = field(
        default=None,
        metadata={
            "help": "Input side the sub-network is meant to run at (ST++ trains sub-networks on 0.43 S..S): its "
            "BatchNorm statistics are re-estimated and its image processor crops at this size. Default: the "
            "evaluation crop."
        },
    )
    evaluate: bool = field(
        default=False,
        metadata={"help": "Measure top-1 / top-5 accuracy of the export (at --input-size) and of the full model."},
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
    onnx: bool = field(
        default=False,
        metadata={
            "help": "Also write model.onnx (dynamic batch; with --front one file per point under onnx/), checked in "
            "ONNX Runtime against PyTorch on validation images, with batch-1 and batch-32 latency of both on this "
            'machine in export_info.json and the card. Needs the onnx extra: pip install "stim_hf[onnx]".'
        },
    )
    int8: bool = field(
        default=False,
        metadata={
            "help": "With --onnx, also write model.int8.onnx: ONNX Runtime static quantization calibrated on 256 "
            "training images, with validation top-1 before and after."
        },
    )
    push_to_hub: str | None = field(
        default=None,
        metadata={
            "help": "Upload the export to this Hub model repository (NAME or OWNER/NAME; created if missing). "
            "Needs a token (hf auth login) and the Hub online: checked before anything else."
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


# Recipe keys that become export options (the data fields keep their names).
_RECIPE_KEYS = {"seed": "seed", "subnet_bn_recalibration_samples": "recalibrate_bn"}


def build_parser() -> SubcommandArgumentParser:
    """The ``stim-hf export`` parser: a checkpoint, :class:`ExportArguments` and evaluation data arguments."""
    parser = SubcommandArgumentParser((ExportArguments, EvaluationDataArguments), prog="stim-hf export")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="Model directory (config.json + model.safetensors).")
    return parser


def parse_export_args(
    argv: Sequence[str] | None = None,
) -> tuple[str, ExportArguments, DataArguments | None]:
    """Parse ``CHECKPOINT --depths ... --output DIR [...]``; data arguments only when a source is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    namespace = parser.parse_with_recipe(argv, _RECIPE_KEYS)
    values = vars(namespace)
    export_args = ExportArguments(**{f.name: values[f.name] for f in fields(ExportArguments)})
    if export_args.front is not None:
        _check_front_arguments(export_args, argv)
    elif export_args.depths is None or export_args.output is None:
        missing = [name for name in ("depths", "output") if getattr(export_args, name) is None]
        raise ConfigError(
            f"stim-hf export needs {' and '.join('--' + m for m in missing)}, e.g. "
            "'stim-hf export outputs/run --depths 3,2,1 --output exported/' (or --front SEARCH_DIR for every point "
            "of a search's front in one folder)"
        )
    data_values = {f.name: values[f.name] for f in fields(DataArguments) if f.init}
    given = any(data_values[k] is not None for k in _DATA_SOURCE_FIELDS)
    data_args = EvaluationDataArguments(**data_values) if given else None
    return namespace.checkpoint, export_args, data_args


def _check_front_arguments(args: ExportArguments, argv: Sequence[str]) -> None:
    """Refuse options that ``--front`` does not take: the points, sizes and statistics come from the search."""
    if args.output is None:
        raise ConfigError("stim-hf export --front needs --output DIR, the folder to write the switching model to")
    taken = [flag for flag in ("--depths", "--input-size", "--recalibrate-bn", "--evaluate", "--push-to-hub")
             if any(a == flag or a.startswith(flag + "=") for a in argv)]  # fmt: skip
    if taken:
        raise ConfigError(
            f"--front takes its points, input sizes and BatchNorm statistics from the search; drop {', '.join(taken)} "
            "(export one point on its own with --depths instead)"
        )


def onnx_summary(record: dict[str, Any]) -> str:
    """One clause on an ONNX file for the command's summary line: its check and batch-1 latency in both runtimes."""
    latency = record["latency_ms"]
    text = (
        f"; {record['file']}: largest logit difference to PyTorch {record['check']['max_abs_diff']:.2g}, batch 1 "
        f"{latency['onnxruntime']['batch_1']:.2f} ms in ONNX Runtime ({latency['pytorch']['batch_1']:.2f} in PyTorch)"
    )
    if "int8" in record:
        top1 = record["int8"]["top1"]
        text += f", int8 top-1 {100 * top1['int8']:.2f}% (fp32 {100 * top1['fp32']:.2f}%)"
    return text


def main_front(checkpoint: str, args: ExportArguments, argv: Sequence[str]) -> dict[str, Any]:
    """``stim-hf export CHECKPOINT --front SEARCH_DIR --output DIR``: the budget-switching folder, and its summary."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("stim_hf").setLevel(logging.INFO)
    info = export_budget_model(
        checkpoint, args.front, args.output, overwrite=args.overwrite, device=args.device,
        command="stim-hf export " + " ".join(argv), onnx=args.onnx, int8=args.int8,
    )  # fmt: skip
    sizes = info["size_bytes"]
    extra = sizes["switching_weights"] - sizes["full_model_weights"]
    print(
        f"wrote {len(info['points'])} front points of {checkpoint} to {args.output} "
        f"({100 * extra / sizes['full_model_weights']:.2f} % more than the full model's weights; largest logit "
        f"difference to the standalone exports {max(info['checks']['max_abs_diff_to_standalone'].values()):.2g})",
        flush=True,
    )
    for point in info["points"]:
        mark = " (default)" if point["name"] == info["default_point"] else ""
        accuracy = "n/a" if point["accuracy"] is None else f"{100 * point['accuracy']:.2f}%"
        onnx = onnx_summary(info["onnx"][point["name"]]) if "onnx" in info else ""
        print(
            f"  {point['name']}{mark}: {100 * point['flop_share']:.1f}% of the FLOPs, held-out top-1 {accuracy}{onnx}"
        )
    return info


def main(argv: Sequence[str] | None = None) -> PreTrainedModel | dict[str, Any]:
    """Entry point of ``stim-hf export``; configuration errors propagate as :class:`StimError`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    checkpoint, args, data_args = parse_export_args(argv)
    if args.front is not None:
        return main_front(checkpoint, args, argv)
    notes: list[str] = []  # said after the summary, so that an error is the only line before it
    recalibrate_bn = resolve_recalibration_samples(args.recalibrate_bn, data_args, "--recalibrate-bn", notes.append)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("stim_hf").setLevel(logging.INFO)
    exported = export_subnet(
        checkpoint,
        parse_depths(args.depths),
        args.output,
        recalibrate_bn=recalibrate_bn,
        data_args=data_args,
        evaluate=args.evaluate,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        command="stim-hf export " + " ".join(argv),
        overwrite=args.overwrite,
        input_size=args.input_size,
        push_to_hub=args.push_to_hub,
        onnx=args.onnx,
        int8=args.int8,
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
    if "onnx" in info:
        summary += onnx_summary(info["onnx"])
    if args.push_to_hub:
        summary += f"; pushed to the Hub repository {args.push_to_hub}"
    print(summary, flush=True)
    for note in notes:
        print_notice("stim-hf export")(note)
    return exported
