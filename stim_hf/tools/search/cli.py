"""``stim-hf search``: the command line of :func:`stim_hf.tools.search.search_subnets`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stim_hf.data.image_datasets import DataArguments, EvaluationDataArguments
from stim_hf.tools.loafing import recipe_sampling
from stim_hf.tools.search.arguments import DEFAULT_METHOD, SearchArguments
from stim_hf.tools.search.results import REPORT_FILES, SearchResult
from stim_hf.tools.search.run import search_subnets
from stim_hf.training.config import method_settings
from stim_hf.training.parser import SubcommandArgumentParser, load_recipe, recipe_defaults

# Training-recipe keys that --config maps onto SearchArguments fields.
_RECIPE_KEYS = {
    "seed": "seed",
    "subnet_sampling": "sampling",
    "sample_space": "sample_space",
    "min_input_scale": "min_input_scale",
    "per_device_eval_batch_size": "batch_size",
    "dataloader_num_workers": "num_workers",
}


def build_parser() -> SubcommandArgumentParser:
    """The ``stim-hf search`` parser: checkpoints, :class:`SearchArguments` and :class:`EvaluationDataArguments`.

    Training data are optional on the command line: they are needed only to score on held-out
    training images or to re-estimate BatchNorm statistics, which :func:`search_subnets` checks.
    """
    parser = SubcommandArgumentParser((SearchArguments, EvaluationDataArguments), prog="stim-hf search")
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="Model directories to search.")
    return parser


def _recipe_defaults(path: str) -> dict[str, Any]:
    """The recipe's data and sampling settings (its method's, where it leaves them to the preset) as defaults."""
    values = load_recipe(path)
    values.update(recipe_sampling(values, path))
    method = values.get("stim_method") or DEFAULT_METHOD
    values["min_input_scale"] = method_settings(method, values)["min_input_scale"]
    return recipe_defaults(values, _RECIPE_KEYS)


def parse_search_args(argv: Sequence[str] | None = None) -> tuple[SearchArguments, DataArguments, list[str]]:
    """Parse ``CKPT [CKPT ...] [--field value ...]``; ``--config RECIPE.yaml`` gives defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    namespace, _ = parser.parse_known_args(argv)
    if namespace.config:
        parser.set_defaults(**_recipe_defaults(namespace.config))
    search_args, data_args, namespace, remaining = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    parser.refuse_unknown(remaining)
    return search_args, data_args, list(namespace.checkpoints)


def main(argv: Sequence[str] | None = None) -> SearchResult:
    """Entry point of ``stim-hf search``: parse, search, write the files, print the picks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, data_args, checkpoints = parse_search_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("stim_hf").setLevel(logging.INFO)
    result = search_subnets(checkpoints, data_args, args, command="stim-hf search " + " ".join(argv))
    print(result.summary())
    written = [str(Path(args.output_dir) / name) for name in REPORT_FILES.values()] if args.output_dir else []
    if args.export is not None and result.pick is not None:
        written.append(str(args.export))
    if written:
        print("wrote " + ", ".join(written), flush=True)
    return result
