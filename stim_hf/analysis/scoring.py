"""Scoring sub-networks with their own BatchNorm statistics, one by one or along a shared tree.

A sub-network's score is its top-1 accuracy on a set of images after its BatchNorm statistics are
re-estimated on other images (:func:`reestimate_batchnorm`): every BatchNorm layer normalises with
batch statistics while the batches pass, and its running mean and variance become the exact
statistics of everything it saw, pooled over all batches (per-batch means and variances combined
exactly in float64, as one batch of all the images would give them; the unbiased variance, as
PyTorch's running estimate). Nothing else runs in train mode: dropout and drop-path stay off.

:func:`score_subnets` scores many sub-networks of one model at one input size, two ways that give
the same numbers:

- ``"naive"``: every sub-network on its own: re-estimate, then evaluate.
- ``"tree"``: the activations of a block, and the statistics of its BatchNorm layers, depend only
  on the blocks that run before it. A sub-network is a sequence of blocks (stage by stage), so the
  sub-networks form a tree of shared prefixes; walking it computes each block of each prefix once
  (on both the re-estimation and the scored images) instead of once per sub-network. For ResNet-56's
  729 prefix sub-networks that is 819 block passes instead of 10,935. It needs blocks that the
  model calls with one tensor and that return one, and no BatchNorm outside the stages after the
  stem; :func:`tree_support` says whether a model qualifies.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from stim_hf.method import ResidualStage, Subnet, use_subnet
from stim_hf.method.batchnorm import (
    batchnorm_layers,
    batchnorm_state,
    estimating_batchnorm,
    recalibrate_batchnorm,
    restore_batchnorm_state,
)

SHARING_MODES = ("tree", "naive")


# --------------------------------------------------------------------------------------------------
# Exact BatchNorm statistics
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def reestimate_batchnorm(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    stages: Sequence[ResidualStage] | None = None,
    subnet: Subnet | None = None,
    forward_kwargs: dict | None = None,
) -> int:
    """Replace ``model``'s BatchNorm statistics by the exact statistics of ``batches`` (pixel tensors).

    With ``subnet`` (and the model's ``stages``) the model runs as that sub-network; the batches
    must already have its input size. Only BatchNorm layers run in train mode. The model is left
    in eval mode; returns the number of images used.
    """
    model.eval()
    with _maybe_subnet(stages, subnet):
        return recalibrate_batchnorm(
            model, ({"pixel_values": x} for x in batches), sum(x.shape[0] for x in batches), None, forward_kwargs
        )


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


@dataclass
class ScoreBatches:
    """The images of one input size: re-estimation batches and scored batches with their labels."""

    recalibration: list[torch.Tensor]
    images: list[torch.Tensor]
    labels: list[torch.Tensor]
    num_images: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_images = sum(int(x.shape[0]) for x in self.images)

    def head(self, images: int, recalibration: int) -> ScoreBatches:
        """The first ``images`` scored images and the first ``recalibration`` re-estimation images."""
        return ScoreBatches(
            _first(self.recalibration, recalibration), _first(self.images, images), _first(self.labels, images)
        )


def _first(batches: Sequence[torch.Tensor], count: int) -> list[torch.Tensor]:
    kept, left = [], count
    for batch in batches:
        if left <= 0:
            break
        kept.append(batch[:left])
        left -= int(batch.shape[0])
    return kept


@dataclass(frozen=True)
class SubnetScore:
    """What a sub-network scored: correctly classified images, summed cross-entropy, images scored."""

    correct: int
    loss_sum: float
    num_images: int
    # Which images it got right, in order (a CPU bool tensor): comparisons between candidates scored
    # on the same images are paired, so their noise is that of the difference, not of each alone.
    hits: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy (a fraction)."""
        return self.correct / self.num_images

    @property
    def loss(self) -> float:
        """Mean cross-entropy."""
        return self.loss_sum / self.num_images


def score_subnets(
    model: nn.Module,
    stages: Sequence[ResidualStage],
    subnets: Sequence[Subnet],
    batches: ScoreBatches,
    sharing: str = "tree",
    forward_kwargs: dict | None = None,
    on_scored: Callable[[int], None] | None = None,
    timings: dict[str, float] | None = None,
) -> list[SubnetScore]:
    """Accuracy and cross-entropy of each sub-network, its BatchNorm statistics re-estimated.

    ``batches`` hold images already at the sub-networks' input size. With no re-estimation batches
    the sub-networks keep the model's own statistics. ``sharing`` is ``"tree"`` (shared prefixes
    computed once; see :func:`tree_support`) or ``"naive"``; both give the same counts (and losses
    up to float rounding).
    ``on_scored(n)`` is called as sub-networks are done (a progress bar). ``timings``, when given,
    gets the seconds spent on the re-estimation images (``"recalibration"``) and on the scored
    images (``"scoring"``) added. The model's BatchNorm statistics are restored afterwards.
    """
    if sharing not in SHARING_MODES:
        raise ValueError(f"sharing={sharing!r}; valid: {', '.join(SHARING_MODES)}")
    clock = _Clock(timings)
    saved = batchnorm_state(model)
    model.eval()
    try:
        with torch.no_grad():
            if sharing == "naive":
                return _naive_scores(model, stages, subnets, batches, forward_kwargs or {}, on_scored, clock)
            return _TreeWalk(model, stages, batches, forward_kwargs or {}, on_scored, clock).run(subnets)
    finally:
        restore_batchnorm_state(model, saved)


class _Clock:
    """Adds the wall time of ``with clock("name"):`` blocks to a dict (or does nothing without one)."""

    def __init__(self, totals: dict[str, float] | None) -> None:
        self.totals = totals

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.totals is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start


def _naive_scores(model, stages, subnets, batches, forward_kwargs, on_scored, clock) -> list[SubnetScore]:
    scores = []
    for subnet in subnets:
        if batches.recalibration:
            with clock("recalibration"):
                reestimate_batchnorm(model, batches.recalibration, stages, subnet, forward_kwargs)
        with clock("scoring"), _maybe_subnet(stages, subnet):
            logits = [model(pixel_values=x, **forward_kwargs).logits for x in batches.images]
            scores.append(_score(logits, batches))
        if on_scored is not None:
            on_scored(1)
    return scores


def _score(logits: Sequence[torch.Tensor], batches: ScoreBatches) -> SubnetScore:
    hits, loss = [], 0.0
    for batch_logits, labels in zip(logits, batches.labels, strict=True):
        batch_logits = batch_logits.float()
        hits.append((batch_logits.argmax(dim=-1) == labels).cpu())
        loss += float(F.cross_entropy(batch_logits, labels, reduction="sum"))
    hits = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)
    return SubnetScore(int(hits.sum()), loss, batches.num_images, hits)


@contextmanager
def _maybe_subnet(stages: Sequence[ResidualStage] | None, subnet: Subnet | None) -> Iterator[None]:
    if subnet is None or subnet.is_full:
        yield
    else:
        with use_subnet(stages, subnet):
            yield


# --------------------------------------------------------------------------------------------------
# The shared walk
# --------------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by :class:`_StopHere` to end a forward pass where a stage begins, carrying its input."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


class _StopHere(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise _Stop(x)


class _Replay(nn.Module):
    """Stands in for a whole stage: returns a stored output, whatever its input."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.value


@contextmanager
def _stage_contents(stages: Sequence[ResidualStage], contents: Sequence[nn.Module | None]) -> Iterator[None]:
    """Each stage's container holds only ``contents[s]`` (None: left alone) inside the block."""
    saved = []
    try:
        for stage, module in zip(stages, contents, strict=False):
            if module is None:
                continue
            saved.append((stage.container, stage.container._modules))
            stage.container._modules = OrderedDict(stand_in=module)
        yield
    finally:
        for container, modules in reversed(saved):
            container._modules = modules


@dataclass
class TreeSupport:
    """Whether the shared walk applies to a model, and why not."""

    supported: bool
    reason: str = ""
    stem_batchnorms: list[_BatchNorm] = field(default_factory=list)


@torch.no_grad()
def tree_support(
    model: nn.Module, stages: Sequence[ResidualStage], example: torch.Tensor, forward_kwargs: dict | None = None
) -> TreeSupport:
    """Check on ``example`` that every block is called with one tensor and returns one, and find the stem's BatchNorms.

    BatchNorm layers outside the stages must all run before the first stage (the stem): their
    statistics are then shared by every sub-network.
    """
    model.eval()
    kwargs = forward_kwargs or {}
    blocks = [block for stage in stages for block in stage.container]
    problems: list[str] = []

    def check_call(module, args, call_kwargs):
        if len(args) != 1 or call_kwargs or not isinstance(args[0], torch.Tensor):
            problems.append(f"{type(module).__name__} is called with other arguments than one tensor")

    def check_output(module, args, output):
        if not isinstance(output, torch.Tensor):
            problems.append(f"{type(module).__name__} returns {type(output).__name__}, not a tensor")

    handles = [b.register_forward_pre_hook(check_call, with_kwargs=True) for b in blocks]
    handles += [b.register_forward_hook(check_output) for b in blocks]
    try:
        model(pixel_values=example, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if problems:
        return TreeSupport(False, problems[0])

    inside = {id(m) for block in blocks for m in block.modules()}
    outside = [layer for layer in batchnorm_layers(model) if id(layer) not in inside]
    called: list[_BatchNorm] = []
    handles = [layer.register_forward_pre_hook(lambda m, a: called.append(m)) for layer in outside]
    try:
        with _stage_contents(stages, [_StopHere()]):
            model(pixel_values=example, **kwargs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    later = [layer for layer in outside if all(layer is not c for c in called)]
    if later:
        return TreeSupport(False, f"{len(later)} BatchNorm layer(s) outside the stages run after the first stage")
    return TreeSupport(True, stem_batchnorms=called)


class _TreeWalk:
    """Depth-first walk over the tree of block sequences of the sub-networks to score.

    A node holds the activations (re-estimation images and scored images, one tensor per batch)
    after a prefix of some sub-network's block sequence. A child runs one more block: its BatchNorm
    statistics are estimated on the re-estimation images, then it runs in eval mode on the scored
    images. Entering a new stage runs the model's own code between stages (downsampling layers)
    with every earlier stage replaying its output. A leaf runs the head the same way.
    """

    def __init__(self, model, stages, batches: ScoreBatches, forward_kwargs, on_scored, clock: _Clock) -> None:
        self.clock = clock
        self.model = model
        self.stages = list(stages)
        self.batches = batches
        self.kwargs = forward_kwargs
        self.on_scored = on_scored
        self.recalibrate = bool(batches.recalibration)
        self.scores: list[SubnetScore | None] = []

    def run(self, subnets: Sequence[Subnet]) -> list[SubnetScore]:
        support = tree_support(self.model, self.stages, self.batches.images[0][:1], self.kwargs)
        if not support.supported:
            raise ValueError(f"the shared walk does not apply to this model: {support.reason}; use sharing='naive'")
        self.scores = [None] * len(subnets)
        sequences = [
            (tuple((s, b) for s, kept in enumerate(subnet.kept) for b in kept), index)
            for index, subnet in enumerate(subnets)
        ]
        # The stem, shared by every sub-network: statistics, then each stream's input of stage 0.
        layers = support.stem_batchnorms if self.recalibrate else []
        with self.clock("recalibration"), estimating_batchnorm(layers):
            recal = self._stage_input(0, [], self.batches.recalibration)
        with self.clock("scoring"):
            scored = self._stage_input(0, [], self.batches.images)
        self._visit([(recal, scored)], 0, -1, [], sequences)
        return self.scores

    # -- model passes ------------------------------------------------------------------------------

    def _stage_input(self, stage: int, finals: list[list[torch.Tensor]], pixels: list[torch.Tensor]) -> list:
        """Per batch, the input of ``stage``'s container, earlier stages replaying ``finals``."""
        replays = [_Replay() for _ in range(stage)]
        inputs = []
        with _stage_contents(self.stages, [*replays, _StopHere()]):
            for index, pixel_values in enumerate(pixels):
                for replay, outputs in zip(replays, finals, strict=True):
                    replay.value = outputs[index]
                try:
                    self.model(pixel_values=pixel_values, **self.kwargs)
                except _Stop as stop:
                    inputs.append(stop.value)
                else:
                    raise RuntimeError(f"the forward pass never reached stage {stage}")
        return inputs

    def _head_score(self, finals: list[list[torch.Tensor]]) -> SubnetScore:
        replays = [_Replay() for _ in self.stages]
        logits = []
        with self.clock("scoring"), _stage_contents(self.stages, replays):
            for index, pixel_values in enumerate(self.batches.images):
                for replay, outputs in zip(replays, finals, strict=True):
                    replay.value = outputs[index]
                logits.append(self.model(pixel_values=pixel_values, **self.kwargs).logits)
        return _score(logits, self.batches)

    def _run_block(self, stage: int, block: int, recal: list, scored: list) -> tuple[list, list]:
        module = list(self.stages[stage].container)[block]
        layers = batchnorm_layers(module) if self.recalibrate else []
        with self.clock("recalibration"), estimating_batchnorm(layers):
            recal = [module(x) for x in recal]
        with self.clock("scoring"):
            return recal, [module(x) for x in scored]

    # -- the walk --------------------------------------------------------------------------------

    def _visit(self, holder: list, depth: int, stage: int, finals: list, items: list) -> None:
        """Score ``items`` (sequence, index), which share their first ``depth`` blocks, the last in ``stage``.

        ``holder`` holds this node's activations (``stage`` -1: the input of stage 0); ``finals``
        the outputs of the stages before, one (re-estimation, scored) pair per stage. The node's
        activations are dropped before its last child is entered (the next block of the same
        stage, visited last), so a chain of blocks keeps one level alive, not one per block.
        """
        recal, scored = holder.pop()
        groups: OrderedDict[tuple[int, int], list] = OrderedDict()
        for sequence, index in items:
            if len(sequence) == depth:
                self.scores[index] = self._head_score([*(f[1] for f in finals), scored])
                if self.on_scored is not None:
                    self.on_scored(1)
            else:
                groups.setdefault(sequence[depth], []).append((sequence, index))
        order = sorted(groups, key=lambda step: (step[0] == stage, step))
        next_finals, next_inputs = finals, None
        for position, step in enumerate(order):
            next_stage = step[0]
            if next_stage == stage:
                inputs, child_finals = (recal, scored), finals
                if position == len(order) - 1:
                    recal = scored = None
            else:
                if next_inputs is None:
                    if stage < 0:
                        next_finals, next_inputs = [], (recal, scored)
                    else:
                        next_finals = [*finals, (recal, scored)]
                        with self.clock("recalibration"):
                            recal_input = (
                                self._stage_input(next_stage, [f[0] for f in next_finals], self.batches.recalibration)
                                if self.recalibrate
                                else []
                            )
                        with self.clock("scoring"):
                            scored_input = self._stage_input(
                                next_stage, [f[1] for f in next_finals], self.batches.images
                            )
                        next_inputs = (recal_input, scored_input)
                inputs, child_finals = next_inputs, next_finals
            child = self._run_block(*step, *inputs)
            inputs = None
            self._visit([child], depth + 1, next_stage, child_finals, groups[step])
