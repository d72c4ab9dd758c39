"""Sampling sub-networks (and their input sizes) reproducibly.

Each draw uses a generator seeded from ``(seed, step, micro_step, index)`` alone, so every process
of a distributed run picks the same sub-network at the same step (SyncBatchNorm and other
collectives inside the model would otherwise deadlock), and a resumed run picks the same ones
again, with no sampler state to save.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stim_hf.errors import ConfigError
from stim_hf.method.stages import ResidualStage

SAMPLING_RULES = ("prefix", "subset")
# Random stream of the fixed evaluation sub-networks (training draws use stream 0).
EVAL_SUBNET_STREAM = 1
# Random stream of the full network's own input sizes (multi-resolution training, ``full_input_scale``).
FULL_INPUT_STREAM = 2


@dataclass(frozen=True)
class Subnet:
    """A sub-network: the kept block indices of every stage, and the input size to run it at.

    ``input_size`` is the side of the square input, or ``None`` for the batch's own size.
    """

    kept: tuple[tuple[int, ...], ...]
    num_blocks: tuple[int, ...]
    input_size: int | None = None

    @property
    def depths(self) -> tuple[int, ...]:
        """Number of kept blocks per stage (the notation of ``--depths 3,3,3``)."""
        return tuple(len(k) for k in self.kept)

    @property
    def depth_fraction(self) -> float:
        """Share of the full network's residual blocks that this sub-network keeps."""
        return sum(self.depths) / sum(self.num_blocks)

    @property
    def is_full(self) -> bool:
        """Whether every block is kept."""
        return self.depths == self.num_blocks

    def describe(self) -> str:
        """Compact text form: depths per stage, the kept indices when not a prefix, and the size."""
        parts = [
            str(len(kept)) if kept == tuple(range(len(kept))) else "{" + ",".join(map(str, kept)) + "}"
            for kept in self.kept
        ]
        text = "depths=" + ",".join(parts) + "/" + ",".join(map(str, self.num_blocks))
        return text + (f" size={self.input_size}" if self.input_size is not None else "")


def subnet_from_depths(stages: Sequence[ResidualStage], depths: Sequence[int]) -> Subnet:
    """Build the prefix sub-network that keeps ``depths[s]`` leading blocks of stage ``s``.

    Raises :class:`ConfigError` when the depths do not fit the stages or would drop a block that
    changes shape.
    """
    if len(depths) != len(stages):
        raise ConfigError(
            f"depths {list(depths)} has {len(depths)} entries but the model has {len(stages)} residual "
            f"stages (blocks per stage: {[s.num_blocks for s in stages]}); give one depth per stage"
        )
    kept = []
    for s, (stage, depth) in enumerate(zip(stages, depths, strict=True)):
        lowest = stage.num_blocks - stage.max_droppable("prefix")
        if not lowest <= depth <= stage.num_blocks:
            raise ConfigError(
                f"depth {depth} for stage {s} ('{stage.name}') is out of range: it must keep between "
                f"{lowest} and {stage.num_blocks} blocks (a stage keeps at least one block, and blocks that "
                "change their input's shape are never dropped)"
            )
        kept.append(tuple(range(depth)))
    return Subnet(kept=tuple(kept), num_blocks=tuple(s.num_blocks for s in stages))


def resolve_sample_space(
    sample_space: str | Sequence[int], stages: Sequence[ResidualStage], rule: str
) -> tuple[int, ...]:
    """Turn ``sample_space`` (``"full"`` or per-stage maxima of dropped blocks) into a checked tuple."""
    limits = tuple(stage.max_droppable(rule) for stage in stages)
    if sample_space == "full":
        return limits
    space = tuple(int(v) for v in sample_space)
    if len(space) != len(stages):
        raise ConfigError(
            f"sample_space={list(space)} has {len(space)} entries but the model has {len(stages)} residual "
            f"stages; give one maximum of dropped blocks per stage, at most {list(limits)} for "
            f"subnet_sampling='{rule}', or 'full'"
        )
    for s, (value, limit) in enumerate(zip(space, limits, strict=True)):
        if not 0 <= value <= limit:
            raise ConfigError(
                f"sample_space={list(space)}: stage {s} ('{stages[s].name}') can drop at most {limit} blocks "
                f"under subnet_sampling='{rule}' (blocks that change shape are never dropped), not {value}; "
                f"valid per-stage maxima: {list(limits)}, or 'full'"
            )
    return space


def smallest_input_side(min_input_scale: float, image_size: int) -> int:
    """``floor(min_input_scale * image_size)``: the released ST++ code's smallest sub-network input side."""
    # Without the epsilon, float error floors an exact product one too low (0.29 * 100 = 28.999999999999996).
    return math.floor(min_input_scale * image_size + 1e-9)


class SubnetSampler:
    """Draws sub-networks and input sizes from a seed and the training step.

    ``rule="prefix"`` (ST++): stage ``s`` drops its last ``d_s ~ UniformInt[0, space[s]]`` blocks,
    independently per stage. ``rule="subset"`` (ST): a subset of the skippable blocks of each stage
    is dropped, uniformly over all subsets that drop at most ``space[s]`` blocks. With the full
    space this keeps each skippable block with probability 1/2, except in a stage whose blocks
    are all skippable: it keeps at least one, so each is kept with ``2^(n-1) / (2^n - 1)``
    (4/7 for 3 blocks, 0.501 for 9). The input size is
    ``UniformInt[floor(min_input_scale * S), S]`` for a batch of side ``S``. ``stream`` separates
    independent uses of one seed (training draws and the fixed evaluation sub-networks).

    ``size_bias`` in [0, 1) tilts each of these draws (a stage's depth, the input size) toward the
    smaller choices: with the choices ordered from the smallest, the probability of the ``i + 1``
    smallest ones, ``G_i`` without bias, becomes ``G_i ** (1 - size_bias)``. 0 keeps the draws above
    unchanged (the same generator calls); for 4 equally likely depths, 0.5 gives the shallowest
    1/2 and the deepest 0.13. :meth:`smallest` is the smallest sub-network of the space.
    """

    def __init__(
        self,
        stages: Sequence[ResidualStage],
        rule: str = "prefix",
        sample_space: str | Sequence[int] = "full",
        min_input_scale: float = 1.0,
        seed: int = 0,
        min_input_size: int = 1,
        stream: int = 0,
        size_bias: float = 0.0,
    ) -> None:
        if rule not in SAMPLING_RULES:
            raise ConfigError(f"subnet_sampling='{rule}' is not a sampling rule; valid: {', '.join(SAMPLING_RULES)}")
        if not 0.0 < min_input_scale <= 1.0:
            raise ConfigError(f"min_input_scale={min_input_scale} must lie in (0, 1]; 1.0 keeps the full size")
        if not 0.0 <= size_bias < 1.0:
            raise ConfigError(f"subnet_size_bias={size_bias} must lie in [0, 1); 0 keeps the draws uniform")
        self.size_bias = float(size_bias)
        self.rule = rule
        self.skippable = tuple(stage.skippable for stage in stages)
        self.num_blocks = tuple(stage.num_blocks for stage in stages)
        self.space = resolve_sample_space(sample_space, stages, rule)
        self.min_input_scale = min_input_scale
        self.min_input_size = min_input_size
        self.seed = int(seed)
        self.stream = int(stream)
        # Subset rule: P(drop k of n skippable) proportional to C(n, k) for k <= space[s] gives a
        # uniform draw over the allowed subsets.
        self._subset_k_probs = []
        for flags, limit in zip(self.skippable, self.space, strict=True):
            n = sum(flags)
            weights = np.array([math.comb(n, k) for k in range(limit + 1)], dtype=np.float64)
            self._subset_k_probs.append(weights / weights.sum())

    def generator(self, step: int, micro_step: int = 0, index: int = 0) -> np.random.Generator:
        """The generator for one draw; depends on nothing but the seed, the stream and the counters."""
        return np.random.default_rng([self.seed, self.stream, int(step), int(micro_step), int(index)])

    def sample(self, step: int, micro_step: int = 0, index: int = 0, image_size: int | None = None) -> Subnet:
        """Sample sub-network ``index`` of the given optimizer step and micro-batch.

        ``image_size`` is the side of the (square) training batch; when given and
        ``min_input_scale < 1``, a smaller input size is drawn too.
        """
        rng = self.generator(step, micro_step, index)
        biased = self.size_bias > 0.0
        kept = []
        for flags, limit, k_probs in zip(self.skippable, self.space, self._subset_k_probs, strict=True):
            n = len(flags)
            if self.rule == "prefix":
                if biased:  # choices from the smallest: drop limit, limit - 1, ..., 0 blocks
                    dropped = limit - self._biased_choice(rng, np.full(limit + 1, 1.0 / (limit + 1)))
                else:
                    dropped = int(rng.integers(0, limit + 1))
                kept.append(tuple(range(n - dropped)))
            else:
                if biased:
                    num_dropped = limit - self._biased_choice(rng, k_probs[::-1])
                else:
                    num_dropped = int(rng.choice(len(k_probs), p=k_probs))
                candidates = [i for i, flag in enumerate(flags) if flag]
                drop = set(rng.choice(candidates, size=num_dropped, replace=False).tolist()) if num_dropped else set()
                kept.append(tuple(i for i in range(n) if i not in drop))
        input_size = None
        if image_size is not None and self.min_input_scale < 1.0:
            low = min(self._smallest_side(image_size), image_size)
            if biased:
                sizes = image_size - low + 1
                input_size = low + self._biased_choice(rng, np.full(sizes, 1.0 / sizes))
            else:
                input_size = int(rng.integers(low, image_size + 1))
        return Subnet(kept=tuple(kept), num_blocks=self.num_blocks, input_size=input_size)

    def _smallest_side(self, image_size: int) -> int:
        return max(self.min_input_size, smallest_input_side(self.min_input_scale, image_size))

    def _biased_choice(self, rng: np.random.Generator, probs: np.ndarray) -> int:
        """Index of a choice among ``probs`` (ordered from the smallest), drawn with the CDF raised to ``1 - size_bias``.

        ``P(index <= i) = P(U ** (1 / (1 - bias)) < G_i) = G_i ** (1 - bias)`` for ``U ~ Uniform[0, 1)``.
        """
        quantile = rng.random() ** (1.0 / (1.0 - self.size_bias))
        index = int(np.searchsorted(np.cumsum(probs), quantile, side="right"))
        return min(index, len(probs) - 1)

    def smallest(self, image_size: int | None = None) -> Subnet:
        """The smallest sub-network of the sample space (sandwich sampling); no randomness.

        Every stage drops as many blocks as ``sample_space`` allows: its last ones (prefix rule),
        or its last skippable ones (subset rule; with the full space only the blocks that change
        shape are left, and a stage of skippable blocks only keeps its first). Its input side is the
        smallest the input-size rule draws, ``max(floor(min_input_scale * S), min_input_size)``.
        """
        kept = []
        for flags, limit in zip(self.skippable, self.space, strict=True):
            n = len(flags)
            if self.rule == "prefix":
                kept.append(tuple(range(n - limit)))
            else:
                candidates = [i for i, flag in enumerate(flags) if flag]
                drop = set(candidates[len(candidates) - limit :])
                kept.append(tuple(i for i in range(n) if i not in drop))
        input_size = None
        if image_size is not None and self.min_input_scale < 1.0:
            input_size = min(self._smallest_side(image_size), image_size)
        return Subnet(kept=tuple(kept), num_blocks=self.num_blocks, input_size=input_size)

    def distinct_subnets(self, num_subnets: int) -> list[Subnet]:
        """The first ``num_subnets`` distinct sub-networks other than the full one, drawn at step 0.

        Fewer are returned when the sample space holds fewer. With ``stream=EVAL_SUBNET_STREAM``
        these are the fixed evaluation sub-networks: the same for any checkpoint of an architecture.
        """
        subnets: list[Subnet] = []
        for draw in range(100 * num_subnets):
            if len(subnets) == num_subnets:
                break
            subnet = self.sample(step=0, micro_step=0, index=draw)
            if not subnet.is_full and subnet not in subnets:
                subnets.append(subnet)
        return subnets
