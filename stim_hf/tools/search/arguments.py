"""Settings of ``stim-hf search`` and where the candidates' sampling rule comes from."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stim_hf.errors import ConfigError
from stim_hf.method import SAMPLING_RULES
from stim_hf.tools.hub import check_push_to_hub
from stim_hf.tools.onnx_export import require_onnx
from stim_hf.tools.search.budget import parse_budget
from stim_hf.tools.search.space import parse_input_sizes
from stim_hf.training.checkpointing import TRAINING_ARGS_JSON_NAME
from stim_hf.training.config import method_settings, parse_sample_space

STRATEGIES = ("auto", "enumerate", "evolution")
LATENCY_MODES = ("auto", "all", "front", "none")
LATENCY_RUNTIMES = ("pytorch", "onnxruntime")
SCORE_SPLITS = ("train", "validation")
SHARING = ("auto", "tree", "naive")
# Chosen with bench/halving_fidelity.py (docs/search.md, "Speed").
HALVING_MARGIN = 2.0
# Without a recipe or a training_args.json, candidates follow the preset of training's default stim_method.
DEFAULT_METHOD = "stpp"
# Held-out and re-estimation images when neither is given; a training split too small for both gets half each, down
# to FIT_MINIMUM each (docs/search.md, "Scoring": why 256).
DEFAULT_HOLDOUT_SAMPLES = 2000
DEFAULT_RECALIBRATE_BN = 2000
FIT_MINIMUM = 256


@dataclass
class SearchArguments:
    """Settings of ``stim-hf search`` (the data come from :class:`~stim_hf.data.DataArguments`)."""

    # What to search for
    budget: str | None = field(
        default=None,
        metadata={
            "help": "Limit(s) the pick must meet, comma-separated: flops=0.5 (share of the full network) or "
            "flops=12M, params=..., latency_ms=2.5 (batch 1 on --device, or in ONNX Runtime on the CPU with "
            "--latency-runtime onnxruntime). Without one, the most accurate."
        },
    )
    pick_margin: float = field(
        default=0.0,
        metadata={
            "help": "Pick the fewest FLOPs among the candidates the most accurate one under the budget does not beat "
            "by more than this many paired standard errors on the held-out images (0: the most accurate)."
        },
    )
    sampling: str | None = field(
        default=None,
        metadata={
            "help": "Sampling rule of the candidates: 'prefix' or 'subset'. Default: the recipe's (--config), else "
            "the one the checkpoint was trained with (its training_args.json), else prefix."
        },
    )
    sample_space: str | None = field(
        default=None,
        metadata={"help": "Per-stage maximum of dropped blocks, e.g. '0,1,3,0', or 'full' (default: as sampling)."},
    )
    input_sizes: str | None = field(
        default=None,
        metadata={
            "help": "Input sides to try, comma-separated (e.g. 16,24,32). Default: --num-input-sizes steps from "
            "floor(min_input_scale x S) to the evaluation size S."
        },
    )
    num_input_sizes: int = field(default=4, metadata={"help": "Steps of the default input sizes."})
    min_input_scale: float | None = field(
        default=None,
        metadata={"help": "Smallest input as a share of S (default: as sampling; without either, stpp's 0.43)."},
    )
    # Scoring
    holdout_samples: int | None = field(
        default=None,
        metadata={
            "help": f"Training images held out (seeded) to score the sub-networks on. Default: {DEFAULT_HOLDOUT_SAMPLES:,}, "
            "or half the training split where it cannot hold both defaults (docs/search.md, Scoring)."
        },
    )
    recalibrate_bn: int | None = field(
        default=None,
        metadata={
            "help": "Other training images each sub-network's BatchNorm statistics are re-estimated on (0: keep the "
            f"full network's). Default: {DEFAULT_RECALIBRATE_BN:,}, or what the training split leaves (as above)."
        },
    )
    score_split: str = field(
        default="train",
        metadata={"help": "'train': score on held-out training images; 'validation': on the validation split."},
    )
    seed: int = field(
        default=42, metadata={"help": "Seed of the held-out images, the re-estimation images and the evolution."}
    )
    batch_size: int = field(default=256, metadata={"help": "Batch size of re-estimation and scoring."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers decoding the images."})
    sharing: str = field(
        default="auto",
        metadata={
            "help": "'tree': compute shared prefixes of the sub-networks once; 'naive': each on its own; "
            "'auto': tree when the model allows it and it fits --max-cache-mb."
        },
    )
    max_cache_mb: int = field(
        default=4096, metadata={"help": "Memory the tree walk may hold in activations (MiB); else naive."}
    )
    halving_rounds: int = field(
        default=3,
        metadata={
            "help": "Successive halving: score every candidate on a few images, then the best on more, over this "
            "many rounds (1: every candidate on all the images)."
        },
    )
    halving_keep: float = field(
        default=0.25,
        metadata={
            "help": "Share of the candidates kept for the next round (whole Pareto layers of accuracy against the "
            "budgeted costs); each round scores 1/halving_keep times more images."
        },
    )
    halving_margin: float = field(
        default=HALVING_MARGIN,
        metadata={
            "help": "Also keep every candidate that no cheaper one beats by more than this many paired standard "
            "errors on the round's images (0: the Pareto layers alone)."
        },
    )
    # Strategy
    strategy: str = field(
        default="auto",
        metadata={"help": "'enumerate' every candidate, 'evolution', or 'auto' (enumerate up to --max-enumerate)."},
    )
    max_enumerate: int = field(default=4096, metadata={"help": "Most candidates 'auto' enumerates."})
    population: int = field(default=64, metadata={"help": "Evolution: population size."})
    generations: int = field(default=10, metadata={"help": "Evolution: generations after the first population."})
    mutation_prob: float = field(default=0.1, metadata={"help": "Evolution: probability each gene is redrawn."})
    parent_ratio: float = field(default=0.25, metadata={"help": "Evolution: share of the population kept as parents."})
    mutation_ratio: float = field(
        default=0.5, metadata={"help": "Evolution: share of the children made by mutation (the rest by crossover)."}
    )
    # Costs
    device: str = field(default="auto", metadata={"help": "'auto', 'cpu', 'cuda', 'cuda:1': where to score and time."})
    latency: str = field(
        default="auto",
        metadata={
            "help": "Whose latency to measure: 'all', 'front' (the accuracy-FLOPs front and the pick), 'none', or "
            "'auto' (all with a latency budget, else front)."
        },
    )
    serving_batch_size: int = field(default=32, metadata={"help": "Batch of the second latency (0: batch 1 only)."})
    latency_warmup: int = field(default=3, metadata={"help": "Untimed passes before the timed ones."})
    latency_repeats: int = field(default=10, metadata={"help": "Timed passes; the median is reported."})
    latency_runtime: str = field(
        default="pytorch",
        metadata={
            "help": "Where latency is timed: 'pytorch' (the sub-network inside the model, on --device) or "
            "'onnxruntime' (each timed candidate exported to ONNX as a standalone model at its input size and run "
            "in ONNX Runtime on the CPU, with torch's thread count; a few seconds of export per candidate; needs "
            'pip install "stim_hf[onnx]").'
        },
    )
    # Output
    output_dir: str | None = field(
        default="search", metadata={"help": "Where pareto.json, pareto.csv and pareto.png are written."}
    )
    export: str | None = field(
        default=None, metadata={"help": "Write the pick as a standalone model to this folder (prefix rule)."}
    )
    push_to_hub: str | None = field(
        default=None,
        metadata={
            "help": "Upload the --export folder to this Hub model repository (NAME or OWNER/NAME; created if "
            "missing). Needs a token (hf auth login) and the Hub online: checked before the search starts."
        },
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Write into --output-dir / --export folders that exist and are not empty."}
    )
    labels: list[str] = field(default_factory=list, metadata={"help": "One name per checkpoint (default: paths)."})
    config: str | None = field(
        default=None,
        metadata={
            "help": "A training recipe (YAML): its data fields, seed, sampling rule, sample space, min_input_scale "
            "and eval batch size become defaults."
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        # Counts left unset are fitted to the training split once it is loaded (search.images.fit_sample_counts).
        self.fitted_counts = tuple(
            name for name in ("holdout_samples", "recalibrate_bn") if getattr(self, name) is None
        )
        if self.holdout_samples is None:
            self.holdout_samples = DEFAULT_HOLDOUT_SAMPLES
        if self.recalibrate_bn is None:
            self.recalibrate_bn = DEFAULT_RECALIBRATE_BN
        for name in (
            "holdout_samples",
            "batch_size",
            "population",
            "latency_repeats",
            "num_input_sizes",
            "halving_rounds",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        for name in ("recalibrate_bn", "num_workers", "generations", "serving_batch_size", "latency_warmup"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an integer >= 0")
        for name, choices in (
            ("strategy", STRATEGIES),
            ("latency", LATENCY_MODES),
            ("latency_runtime", LATENCY_RUNTIMES),
            ("score_split", SCORE_SPLITS),
            ("sharing", SHARING),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not valid; choose one of: {', '.join(choices)}")
        if self.sampling is not None and self.sampling not in SAMPLING_RULES:
            raise ConfigError(f"sampling={self.sampling!r} is not valid; choose one of: {', '.join(SAMPLING_RULES)}")
        for name in ("halving_margin", "pick_margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
                raise ConfigError(f"{name}={value!r} must be a number, 0 or more (paired standard errors)")
        if not 0.0 < self.halving_keep <= 1.0:
            raise ConfigError(f"halving_keep={self.halving_keep} must lie in (0, 1]")
        for name in ("mutation_prob", "parent_ratio", "mutation_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must lie in [0, 1]")
        if self.min_input_scale is not None and not 0.0 < self.min_input_scale <= 1.0:
            raise ConfigError(f"min_input_scale={self.min_input_scale} must lie in (0, 1]")
        if self.sample_space is not None:
            parsed = parse_sample_space(self.sample_space)
            self.sample_space = parsed if parsed == "full" else ",".join(map(str, parsed))
        if self.latency_runtime == "onnxruntime":
            require_onnx()  # the extra's packages, named before any model or data is loaded
        self.budget_limits = parse_budget(self.budget)
        self.sizes = parse_input_sizes(self.input_sizes)
        if self.export is not None and self.sampling == "subset":
            raise subset_export_error()
        if self.push_to_hub is not None:
            if self.export is None:
                raise ConfigError("--push-to-hub uploads the --export folder; add --export DIR")
            check_push_to_hub(self.push_to_hub)

    @property
    def latency_mode(self) -> str:
        """``latency`` with ``auto`` resolved."""
        if self.latency != "auto":
            return self.latency
        return "all" if any(limit.key == "latency_ms" for limit in self.budget_limits) else "front"


def subset_export_error(where: str = "") -> ConfigError:
    """The refusal of ``--export`` for a search of subset sub-networks."""
    return ConfigError(
        "--export writes prefix sub-networks only (a standalone model's config states depths per stage), and "
        f"this search uses the subset rule{where}; add --sampling prefix to search prefix sub-networks"
    )


def training_sampling(args: SearchArguments, checkpoint: str | os.PathLike | None) -> dict[str, Any]:
    """The rule, sample space and smallest input scale to search: the arguments' (command line or recipe),
    else those in the checkpoint's ``training_args.json``, else the ``stpp`` preset's (training's default)."""
    given = {
        "subnet_sampling": args.sampling,
        "sample_space": args.sample_space,
        "min_input_scale": args.min_input_scale,
    }
    method = DEFAULT_METHOD
    trained = Path(checkpoint) / TRAINING_ARGS_JSON_NAME if checkpoint is not None else None
    if trained is not None and trained.is_file():
        try:
            recorded = json.loads(trained.read_text())
        except (OSError, ValueError):
            recorded = {}
        method = recorded.get("stim_method") or method
        for key in given:
            if given[key] is None and recorded.get(key) is not None:
                given[key] = recorded[key]
    try:
        settings = method_settings(method, given)
    except ConfigError:
        settings = method_settings(DEFAULT_METHOD, given)
    return {
        "rule": settings["subnet_sampling"],
        "sample_space": parse_sample_space(settings["sample_space"]),
        "min_input_scale": float(settings["min_input_scale"]),
    }
