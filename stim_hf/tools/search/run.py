"""Running a search: checks, the images, scoring every checkpoint's candidates, the fronts and the pick."""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from stim_hf.analysis.costs import CostModel, measure_latency, resolve_device
from stim_hf.analysis.evaluation import TRAINING_SOURCE_FLAGS
from stim_hf.analysis.pareto import near_front, pareto_front, pareto_layers
from stim_hf.analysis.scoring import ScoreBatches, score_subnets, tree_support
from stim_hf.data.image_datasets import DataArguments
from stim_hf.errors import ConfigError, DataError, ModelStructureError
from stim_hf.method import ResidualFamily, ResidualStage, Subnet, find_residual_family, resize_for_subnet
from stim_hf.tools.loafing import checkpoint_labels, load_checkpoint
from stim_hf.tools.onnx_export import onnx_session, onnxruntime_latency_ms, require_onnx, write_onnx
from stim_hf.tools.output_folders import check_new_folder
from stim_hf.tools.progress import progress
from stim_hf.tools.search.arguments import SearchArguments, subset_export_error, training_sampling
from stim_hf.tools.search.budget import format_count
from stim_hf.tools.search.exporting import export_pick
from stim_hf.tools.search.images import SearchImages
from stim_hf.tools.search.results import Candidate, CheckpointSearch, SearchResult, pick_candidate
from stim_hf.tools.search.space import CandidateSpace, default_input_sizes, evolve

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Checks before anything is computed
# --------------------------------------------------------------------------------------------------


def check_exportable(model: nn.Module, family: ResidualFamily, stages: Sequence[ResidualStage], path: str) -> None:
    """Refuse a model whose family cannot write a shallower standalone model (:class:`ModelStructureError`)."""
    reason = None
    if family.config_for_depths is None:
        reason = "its family was registered without config_for_depths"
    else:
        try:
            family.config_for_depths(model.config, [s.num_blocks for s in stages])
        except ModelStructureError as error:
            reason = str(error)
    if reason is not None:
        raise ModelStructureError(
            f"checkpoint '{path}' ({type(model).__name__}, {family.name} family) cannot be searched: the search "
            f"picks a sub-network to export, and {reason}; search a checkpoint of an exportable family "
            "(docs/models.md)"
        )


# --------------------------------------------------------------------------------------------------
# A checkpoint to search
# --------------------------------------------------------------------------------------------------


@dataclass
class SearchModel:
    """A loaded checkpoint with what the search needs: its stages, costs and candidates."""

    label: str
    path: str
    model: PreTrainedModel
    family: ResidualFamily
    stages: list[ResidualStage]
    costs: CostModel
    space: CandidateSpace
    latency: dict[tuple[Subnet, int], float] = field(default_factory=dict)
    # --latency-runtime onnxruntime: the last candidate exported, its ONNX Runtime session and image shape (C, H, W).
    onnx_export: tuple[Subnet, Any, tuple[int, ...]] | None = None

    def forward_kwargs(self, size: int) -> dict:
        """Extra forward arguments at input side ``size`` (position-embedding models off their size)."""
        return self.family.resized_forward_kwargs if size != self.costs.full_size else {}

    def block_flops(self, stage: int, block: int, size: int) -> int:
        """FLOPs that dropping one block saves at input side ``size``."""
        return self.costs.block_flops(size)[stage][block]


def prepare_model(
    checkpoint: str | os.PathLike | PreTrainedModel,
    label: str,
    data_args: DataArguments,
    args: SearchArguments,
    device: torch.device,
) -> SearchModel:
    """Load ``checkpoint`` on ``device``, check it can be exported, and lay out its candidates and costs."""
    from_folder = isinstance(checkpoint, (str, os.PathLike))
    path = str(checkpoint) if from_folder else _path_of(checkpoint)
    model = load_checkpoint(checkpoint, device) if from_folder else checkpoint.to(device).eval()
    family, stages = find_residual_family(model)
    check_exportable(model, family, stages, path)
    sampling = training_sampling(args, checkpoint if from_folder else None)
    if args.export is not None and sampling["rule"] == "subset":
        raise subset_export_error(f" (the rule '{path}' was trained with)")
    full_size = data_args.resolved_eval_image_size()
    sizes = args.sizes
    if sizes is None:
        sizes = default_input_sizes(full_size, sampling["min_input_scale"], args.num_input_sizes, family, model)
    elif not family.supports_smaller_inputs and sizes != [full_size]:
        raise ConfigError(
            f"{type(model).__name__} ({family.name} family) runs at its full size only; give --input-sizes {full_size}"
        )
    example = torch.zeros(1, 3, full_size, full_size, device=device)
    costs = CostModel(model, stages, example, family.resized_forward_kwargs)
    space = CandidateSpace(stages, sampling["rule"], sampling["sample_space"], sizes)
    return SearchModel(label, path, model, family, stages, costs, space)


def _path_of(checkpoint: str | os.PathLike | PreTrainedModel) -> str:
    if isinstance(checkpoint, (str, os.PathLike)):
        return str(checkpoint)
    return getattr(checkpoint.config, "_name_or_path", "") or type(checkpoint).__name__


# --------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------


def search_subnets(
    checkpoints: Sequence[str | os.PathLike | PreTrainedModel],
    data_args: DataArguments,
    args: SearchArguments | None = None,
    command: str | None = None,
) -> SearchResult:
    """Search the sub-networks of ``checkpoints`` (folders or models) under ``args.budget``.

    Returns a :class:`~stim_hf.tools.search.SearchResult`. With ``args.output_dir`` it writes
    ``pareto.json``, ``pareto.csv`` and ``pareto.png`` there; with ``args.export`` it exports the
    pick (``command`` goes into its model card). Every check (budget keys, device, folders,
    families, data size, a budget below the cheapest candidate) runs before anything is written.
    """

    args = args or SearchArguments()
    if not checkpoints:
        raise ConfigError("give at least one checkpoint directory")
    labels = list(args.labels) or checkpoint_labels([_path_of(c) for c in checkpoints])
    if len(labels) != len(checkpoints):
        raise ConfigError(f"--labels gives {len(labels)} names for {len(checkpoints)} checkpoints; give one each")
    device = resolve_device(args.device)
    check_search_data(data_args, args)
    for folder, flag in ((args.output_dir, "--output-dir"), (args.export, "--export")):
        if folder is not None:
            check_new_folder(folder, flag, args.overwrite, replaced="what the search writes there")
            if any(isinstance(c, (str, os.PathLike)) and _same(folder, c) for c in checkpoints):
                raise ConfigError(f"{flag} '{folder}' is one of the checkpoints; give another folder")
    if args.output_dir is not None and args.export is not None and _same(args.output_dir, args.export):
        raise ConfigError("--export and --output-dir are the same folder; give the export its own folder")
    start = time.perf_counter()
    models = [prepare_model(c, label, data_args, args, device) for c, label in zip(checkpoints, labels, strict=True)]
    for item in models:
        _check_budget_reachable(item, args, device)
    images = SearchImages(data_args, args, device)
    for item in models:
        if item.model.config.num_labels != len(images.label_names):
            raise DataError(
                f"checkpoint '{item.path}' has {item.model.config.num_labels} classes but the data has "
                f"{len(images.label_names)}; search it on the data set it was trained on"
            )
    settings = _settings(args, data_args, device, images, models)
    settings["timing_s"] = {"load": time.perf_counter() - start}
    result = SearchResult(settings, [_search_one(item, images, args, device) for item in models])
    if args.export is not None and result.pick is not None:
        checkpoint, candidate = result.pick
        item = next(m for m in models if m.label == checkpoint.label)
        export_pick(item.model, item.stages, candidate, images, args.export, checkpoint, result, command)
        settings["export"] = str(args.export)
    elif args.export is not None:
        logger.warning("no candidate meets the budget, so nothing was exported")
    if args.output_dir is not None:
        result.write(args.output_dir)
    return result


def check_search_data(data_args: DataArguments, args: SearchArguments) -> None:
    """Refuse a search whose images are not there: training images are needed to score on held-out ones
    (``score_split="train"``) or to re-estimate BatchNorm statistics, validation images for ``"validation"``."""
    has_validation = data_args.validation_file is not None or data_args.validation_dir is not None
    if data_args.has_training_source:
        return
    if args.score_split == "train":
        raise ConfigError(
            "the search scores on held-out training images (--score-split train, the default), but no training "
            f"data was given; add {TRAINING_SOURCE_FLAGS}, or score on the validation split with "
            "--score-split validation --recalibrate-bn 0"
        )
    if args.recalibrate_bn:
        raise ConfigError(
            f"--recalibrate-bn {args.recalibrate_bn} re-estimates BatchNorm statistics on training images, but no "
            f"training data was given; add {TRAINING_SOURCE_FLAGS}, or pass --recalibrate-bn 0 to keep the full "
            "network's statistics"
        )
    if not has_validation:
        raise ConfigError("no data was given; add --validation_file or --validation_dir (and training data)")


def _same(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _latency(item: SearchModel, subnet: Subnet, batch: int, args: SearchArguments, device: torch.device) -> float:
    key = (subnet, batch)
    if key not in item.latency:
        if args.latency_runtime == "onnxruntime":
            item.latency[key] = _onnxruntime_latency(item, subnet, batch, args)
        else:
            item.latency[key] = measure_latency(
                item.model, item.stages, subnet, batch, item.costs.full_size, device,
                args.latency_warmup, args.latency_repeats, item.forward_kwargs(subnet.input_size),
            )  # fmt: skip
    return item.latency[key]


def _onnxruntime_latency(item: SearchModel, subnet: Subnet, batch: int, args: SearchArguments) -> float:
    """Median ms of a batch of ``subnet`` exported to ONNX as a standalone model, in ONNX Runtime on the CPU.

    The same batch, warm-up and repeats as :func:`~stim_hf.analysis.costs.measure_latency`, at the sub-network's
    input size (the resize stays outside the timing, as there). A subset sub-network is timed as the prefix one of
    its depths: the same layers and shapes, so the same cost. The last export is kept, so that a candidate's batch-1
    and serving-batch latencies share one export.
    """
    from stim_hf.tools.export import build_subnet_model

    if item.onnx_export is None or item.onnx_export[0] != subnet:
        full = item.costs.full_size
        example = resize_for_subnet(torch.zeros(2, 3, full, full), subnet)
        standalone = build_subnet_model(item.model, subnet.depths, item.family).to("cpu", torch.float32)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            write_onnx(standalone, path, example, forward_kwargs=item.forward_kwargs(subnet.input_size))
            session = onnx_session(path.read_bytes())
        item.onnx_export = (subnet, session, tuple(int(d) for d in example.shape[1:]))
    _, session, shape = item.onnx_export
    return onnxruntime_latency_ms(session, shape, batch, args.latency_warmup, args.latency_repeats)


def _latency_where(args: SearchArguments, device: torch.device) -> str:
    """Where latency is timed, in words: ``on cuda:0``, or ``in ONNX Runtime on the CPU``."""
    return "in ONNX Runtime on the CPU" if args.latency_runtime == "onnxruntime" else f"on {device}"


def _costs(item: SearchModel, candidate: Candidate, key: str, args, device) -> tuple[float, float | None]:
    """A candidate's cost under budget key ``key`` and the full network's (None for latency)."""
    if key == "flops":
        return candidate.flops, item.costs.full_flops
    if key == "params":
        return candidate.params, item.costs.full_parameters
    if candidate.latency_ms is None:
        candidate.latency_ms = _latency(item, candidate.subnet, 1, args, device)
    return candidate.latency_ms, None


def _check_budget_reachable(item: SearchModel, args: SearchArguments, device: torch.device) -> None:
    """:class:`ConfigError` when even the cheapest candidate is over a limit, naming its cost."""
    if not args.budget_limits:
        return
    cheapest = item.space.cheapest(item.block_flops)
    candidate = Candidate(cheapest, item.costs.flops(cheapest), item.costs.parameters(cheapest))
    for limit in args.budget_limits:
        cost, full = _costs(item, candidate, limit.key, args, device)
        if not limit.allows(cost, full):
            if full is None:
                needs = f"{cost:.3f} ms {_latency_where(args, device)}"
            else:
                needs = f"{format_count(cost)} ({100 * cost / full:.1f}% of the full network's {format_count(full)})"
            raise ConfigError(
                f"--budget {limit.text} is below the smallest sub-network of '{item.path}': "
                f"depths={','.join(map(str, cheapest.depths))} at {cheapest.input_size} px needs {needs}; "
                "raise the budget to at least that"
            )


def _within(item: SearchModel, candidate: Candidate, args: SearchArguments, device: torch.device) -> bool:
    return all(limit.allows(*_costs(item, candidate, limit.key, args, device)) for limit in args.budget_limits)


def _choose_sharing(item: SearchModel, images: SearchImages, args: SearchArguments) -> str:
    if args.sharing == "naive":
        return "naive"
    size = item.space.sizes[-1]
    batches = images.at(size)
    support = tree_support(item.model, item.stages, batches.images[0][:1], item.forward_kwargs(size))
    if not support.supported:
        if args.sharing == "tree":
            raise ConfigError(f"--sharing tree does not apply to '{item.path}': {support.reason}; use --sharing naive")
        logger.info("scoring each sub-network on its own: %s", support.reason)
        return "naive"
    need = _tree_memory(item, batches) / 2**20
    if need > args.max_cache_mb:
        if args.sharing == "tree":
            raise ConfigError(
                f"--sharing tree would hold about {need:.0f} MiB of activations, over --max-cache-mb "
                f"{args.max_cache_mb}; raise it, lower --holdout-samples / --recalibrate-bn, or use --sharing naive"
            )
        logger.info("scoring each sub-network on its own: the shared walk would hold about %.0f MiB", need)
        return "naive"
    return "tree"


@torch.no_grad()
def _tree_memory(item: SearchModel, batches: ScoreBatches) -> float:
    """Bytes the tree walk keeps alive at most: about four activations per stage, for every image."""
    sizes: list[int] = []

    def record(module, args, output) -> None:
        sizes.append(output[:1].nelement() * output.element_size())

    hooks = [stage.container[0].register_forward_hook(record) for stage in item.stages]
    try:
        item.model(pixel_values=batches.images[0][:1], **item.forward_kwargs(int(batches.images[0].shape[-2])))
    finally:
        for hook in hooks:
            hook.remove()
    images = batches.num_images + sum(int(x.shape[0]) for x in batches.recalibration)
    return 4 * sum(sizes) * images


def _search_one(item: SearchModel, images: SearchImages, args: SearchArguments, device) -> CheckpointSearch:
    started = time.perf_counter()
    space = item.space
    strategy = args.strategy
    if strategy == "auto":
        strategy = "enumerate" if len(space) <= args.max_enumerate else "evolution"
    sharing = _choose_sharing(item, images, args)
    timing = {"recalibration": 0.0, "scoring": 0.0, "latency": 0.0}
    candidates: dict[Subnet, Candidate] = {}

    def make(subnet: Subnet) -> Candidate:
        if subnet not in candidates:
            candidates[subnet] = Candidate(subnet, item.costs.flops(subnet), item.costs.parameters(subnet))
        return candidates[subnet]

    phases = 0  # scoring phases so far: the rounds of successive halving, or the generations of evolution

    def score(subnets: Sequence[Subnet], fraction: float = 1.0) -> None:
        nonlocal phases
        phases += 1
        # One bar per phase, its total known before it starts: a phase's candidates are fixed when it begins.
        name = f"search {item.label}, {_phase_name(strategy, phases, fraction, args)}"
        with progress(len(subnets), name, "subnet", enabled=args.progress) as bar:
            counts = (math.ceil(fraction * images.num_scored), math.ceil(fraction * images.num_recalibration))
            for size in sorted({s.input_size for s in subnets}):
                group = [s for s in subnets if s.input_size == size]
                batches = images.at(size).head(*counts)
                results = score_subnets(
                    item.model, item.stages, group, batches, sharing, item.forward_kwargs(size), bar.update, timing
                )
                for subnet, result in zip(group, results, strict=True):
                    candidate = make(subnet)
                    candidate.accuracy, candidate.loss = result.accuracy, result.loss
                    candidate.scored_images, candidate.hits = counts[0], result.hits

    if strategy == "enumerate":
        everything = space.enumerate()
        if args.latency_mode == "all":
            tick = time.perf_counter()
            with progress(len(everything), f"search {item.label}, latency", "subnet", enabled=args.progress) as bar:
                for subnet in everything:
                    make(subnet).latency_ms = _latency(item, subnet, 1, args, device)
                    bar.update()
            timing["latency"] += time.perf_counter() - tick
        timing["rounds"] = _successive_halving(everything, score, make, args)
    else:
        rank = lambda s: (-make(s).accuracy, make(s).flops, make(s).loss, s.input_size, s.kept)  # noqa: E731
        evolve(
            space, np.random.default_rng([args.seed, 16]), lambda s: _within(item, make(s), args, device),
            lambda subnets: score(subnets), rank, args.population, args.generations, args.parent_ratio,
            args.mutation_ratio, args.mutation_prob, first=[space.cheapest(item.block_flops)],
        )  # fmt: skip
    scored = [c for c in candidates.values() if c.accuracy is not None]
    final = [c for c in scored if c.scored_images == images.num_scored]
    for c in scored:
        c.within_budget = _within(item, c, args, device)
    _mark_fronts(final)
    within = [c for c in final if c.within_budget]
    pick, most_accurate = pick_candidate(within, args.pick_margin), pick_candidate(within)
    tick = time.perf_counter()
    if args.latency_mode != "none":
        wanted = [c for c in final if c.pareto_flops or c.pareto_latency] + ([pick] if pick else [])
        for c in dict.fromkeys(wanted):
            if c.latency_ms is None:
                c.latency_ms = _latency(item, c.subnet, 1, args, device)
            if args.serving_batch_size:
                c.serving_latency_ms = _latency(item, c.subnet, args.serving_batch_size, args, device)
        _mark_fronts(final)
    timing["latency"] += time.perf_counter() - tick
    timing["total"] = time.perf_counter() - started
    logger.info("%s: scored %d sub-networks in %.1f s (%s, %s)", item.label, len(scored), timing["total"], strategy,
                sharing)  # fmt: skip
    return CheckpointSearch(
        label=item.label,
        path=item.path,
        family=item.family.name,
        model_class=type(item.model).__name__,
        full_flops=item.costs.full_flops,
        full_params=item.costs.full_parameters,
        full_size=item.costs.full_size,
        strategy=strategy,
        sharing=sharing,
        space_size=len(space),
        candidates=sorted(scored, key=lambda c: (c.input_size, c.subnet.kept)),
        pick=pick,
        timing=timing,
        most_accurate=most_accurate,
    )


def halving_image_shares(rounds: int, keep: float) -> list[float]:
    """The share of the images each successive-halving round scores on (the last: all of them)."""
    return [keep ** (rounds - 1 - r) for r in range(rounds)]


def _halving_rounds(args: SearchArguments) -> int:
    return args.halving_rounds if args.halving_keep < 1.0 else 1


def _phase_name(strategy: str, phase: int, fraction: float, args: SearchArguments) -> str:
    """How the progress display names a scoring phase: its round or generation, and its share of the images."""
    if strategy == "enumerate":
        rounds = _halving_rounds(args)
        return f"round {phase} of {rounds} ({100 * fraction:.0f}% of the images)" if rounds > 1 else "every candidate"
    return "first population" if phase == 1 else f"generation {phase - 1} of at most {args.generations}"


def _successive_halving(
    subnets: list[Subnet],
    score: Callable[[Sequence[Subnet], float], None],
    make: Callable[[Subnet], Candidate],
    args: SearchArguments,
) -> list[dict[str, float]]:
    """Score all on a share of the images, keep whole Pareto layers, score those on more, ...

    Round ``r`` of ``R`` scores on ``keep^(R-1-r)`` of the scored and the re-estimation images, so
    the last round uses all of them. The kept layers are those of accuracy against FLOPs and
    against every budgeted cost, so the pick under any of them survives unless the fewer images
    misjudged it by more than the layers kept allow; beside them, every candidate that no cheaper
    one beats by more than ``halving_margin`` paired standard errors on the round's images
    (:func:`~stim_hf.analysis.pareto.near_front`): those the round cannot tell from the front.
    Returns, per round, the candidates scored, the share of the images and the seconds it took.
    """
    rounds = _halving_rounds(args)
    survivors = subnets
    report = []
    for r, fraction in enumerate(halving_image_shares(rounds, args.halving_keep)):
        start = time.perf_counter()
        score(survivors, fraction)
        report.append({"candidates": len(survivors), "image_share": fraction, "seconds": time.perf_counter() - start})
        if r == rounds - 1:
            break
        count = math.ceil(args.halving_keep * len(survivors))
        candidates = [make(s) for s in survivors]
        accuracies = [c.accuracy for c in candidates]
        keys = ["flops", *(limit.key for limit in args.budget_limits if limit.key != "flops")]
        kept: set[int] = set()
        for key in keys:
            costs = [c.flops if key == "flops" else c.params if key == "params" else c.latency_ms for c in candidates]
            kept.update(pareto_layers(costs, accuracies, count))
            if args.halving_margin > 0:
                kept.update(near_front(costs, [c.hits for c in candidates], args.halving_margin))
        survivors = [s for i, s in enumerate(survivors) if i in kept]
    return report


def _mark_fronts(candidates: list[Candidate]) -> None:
    accuracies = [c.accuracy for c in candidates]
    on_flops = set(pareto_front([c.flops for c in candidates], accuracies))
    on_latency = set(pareto_front([c.latency_ms for c in candidates], accuracies))
    for index, c in enumerate(candidates):
        c.pareto_flops, c.pareto_latency = index in on_flops, index in on_latency


def _settings(args, data_args, device, images: SearchImages, models: Sequence[SearchModel]) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(args).items() if k not in ("progress", "config", "labels")}
    settings.update(
        {
            "budget_limits_parsed": [asdict(limit) for limit in args.budget_limits],
            "candidates": {
                item.label: {
                    "sampling": item.space.rule,
                    "sample_space": list(item.space.space),
                    "input_sizes": item.space.sizes,
                }
                for item in models
            },
            "eval_image_size": images.full_size,
            "scored_on": images.scored_from,
            "holdout_samples": images.holdout_samples,
            "recalibrate_bn": images.recalibrate_bn,
            "sample_counts_fitted": list(args.fitted_counts),
            "num_scored_images": images.num_scored,
            "num_recalibration_images": images.num_recalibration,
            "recalibration": "exact statistics pooled over all re-estimation images, training transforms"
            if images.num_recalibration
            else "none: the full network's statistics",
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "latency_mode": args.latency_mode,
            "latency_device": "cpu" if args.latency_runtime == "onnxruntime" else str(device),
            "data": {k: v for k, v in asdict(data_args).items() if v is not None},
        }
    )
    if args.latency_runtime == "onnxruntime":
        onnx, ort = require_onnx()
        settings["onnxruntime"] = {
            "version": ort.__version__,
            "onnx_version": onnx.__version__,
            "provider": "CPUExecutionProvider",
            "intra_op_threads": torch.get_num_threads(),
            "exporter": "dynamo",
        }
    return settings
