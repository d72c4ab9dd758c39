"""``stim-hf finetune``: the command line of :func:`stim_hf.tools.finetune.finetune_export`.

Example: ``stim-hf finetune outputs/quickstart_122 --epochs 5 --config configs/quickstart.yaml``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import fields

from stim_hf.data.image_datasets import DataArguments
from stim_hf.errors import ConfigError
from stim_hf.tools.finetune import FinetuneResult, finetune_export
from stim_hf.tools.finetune_config import FinetuneArguments
from stim_hf.training.parser import SubcommandArgumentParser

# Training-recipe keys that --config maps onto FinetuneArguments fields (the data fields map as they are).
_RECIPE_KEYS = {
    "seed": "seed",
    "weight_decay": "weight_decay",
    "dataloader_num_workers": "num_workers",
    "subnet_bn_recalibration_samples": "recalibrate_bn",
}
_DATA_SOURCE_FIELDS = ("dataset_name", "train_dir", "train_file")


def build_parser() -> SubcommandArgumentParser:
    """The ``stim-hf finetune`` parser: an export folder, :class:`FinetuneArguments` and :class:`DataArguments`."""
    parser = SubcommandArgumentParser((FinetuneArguments, DataArguments), prog="stim-hf finetune")
    parser.add_argument("export_dir", metavar="EXPORT_DIR", help="A folder written by stim-hf export.")
    return parser


def parse_finetune_args(argv: Sequence[str] | None = None) -> tuple[str, FinetuneArguments, DataArguments]:
    """Parse ``EXPORT_DIR --epochs N [--config RECIPE.yaml] [--field value ...]``; every value checked here."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    namespace = parser.parse_with_recipe(argv, _RECIPE_KEYS)
    values = vars(namespace)
    if not any(values.get(name) is not None for name in _DATA_SOURCE_FIELDS):
        raise ConfigError(
            "stim-hf finetune needs training images: give --config RECIPE.yaml (the training recipe's data) or "
            "--dataset_name, --train_file or --train_dir"
        )
    finetune_args = FinetuneArguments(**{f.name: values[f.name] for f in fields(FinetuneArguments)})
    data_args = DataArguments(**{f.name: values[f.name] for f in fields(DataArguments) if f.init})
    return namespace.export_dir, finetune_args, data_args


def main(argv: Sequence[str] | None = None) -> FinetuneResult:
    """Entry point of ``stim-hf finetune``: parse, fine-tune, print the before / after line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    export_dir, args, data_args = parse_finetune_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("stim_hf").setLevel(logging.INFO)
    result = finetune_export(export_dir, data_args, args, command="stim-hf finetune " + " ".join(argv))
    print(summary(export_dir, result), flush=True)
    return result


def summary(export_dir: str, result: FinetuneResult) -> str:
    """One line: what was fine-tuned, for how long, and top-1 before and after."""
    r = result.record
    before, after = r["before"], r["after"]
    line = (
        f"fine-tuned {export_dir} for {r['epochs']} epoch(s) ({r['steps']} steps, {r['seconds']:.0f} s): top-1 "
        f"{100 * before['accuracy']:.2f}% -> {100 * after['accuracy']:.2f}% (full network "
        f"{100 * r['teacher_metrics']['accuracy']:.2f}%), KL to the full network {before['kl_to_teacher']:.4f} -> "
        f"{after['kl_to_teacher']:.4f}; written to {result.output_dir}"
    )
    return line
