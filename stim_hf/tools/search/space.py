"""The candidates of a search: sub-networks of a sampling rule at several input sizes, and how to explore them.

:class:`CandidateSpace` enumerates them (every combination of per-stage choices x input sizes) or
draws, mutates and crosses them for :func:`evolve`, an OFA-style evolutionary search.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
from torch import nn

from stim_hf.errors import ConfigError
from stim_hf.method import ResidualFamily, ResidualStage, Subnet, resolve_sample_space
from stim_hf.method.sampling import smallest_input_side

# The smallest sub-network input side, as the trainer's MIN_SUBNET_INPUT_SIZE.
MIN_INPUT_SIZE = 8


class CandidateSpace:
    """The sub-networks of a sampling rule (prefix or subset) and sample space, at several input sizes.

    Per stage, the prefix rule keeps the first ``n - d`` blocks for ``d = 0..space[s]``; the subset
    rule keeps any subset of the blocks that drops at most ``space[s]`` skippable ones (as
    :class:`~stim_hf.method.SubnetSampler` draws them in training).
    """

    def __init__(
        self, stages: Sequence[ResidualStage], rule: str, sample_space: str | Sequence[int], sizes: Sequence[int]
    ) -> None:
        self.rule = rule
        self.space = resolve_sample_space(sample_space, stages, rule)
        self.sizes = sorted(sizes)
        self.num_blocks = tuple(s.num_blocks for s in stages)
        self._droppable = [
            list(range(s.num_blocks - limit, s.num_blocks))
            if rule == "prefix"
            else [i for i, flag in enumerate(s.skippable) if flag]
            for s, limit in zip(stages, self.space, strict=True)
        ]
        self._k_probs = []  # how many blocks a draw drops: uniform over the kept sets, as training draws
        for blocks, limit in zip(self._droppable, self.space, strict=True):
            weights = [1.0 if rule == "prefix" else math.comb(len(blocks), k) for k in range(limit + 1)]
            self._k_probs.append(np.asarray(weights) / sum(weights))

    def _choices(self, s: int) -> int:
        if self.rule == "prefix":
            return self.space[s] + 1
        return sum(math.comb(len(self._droppable[s]), k) for k in range(self.space[s] + 1))

    def __len__(self) -> int:
        """Number of candidates (sub-networks x input sizes)."""
        return math.prod(self._choices(s) for s in range(len(self.num_blocks))) * len(self.sizes)

    def _stage_options(self, s: int) -> list[tuple[int, ...]]:
        n = self.num_blocks[s]
        if self.rule == "prefix":
            return [tuple(range(n - k)) for k in range(self.space[s], -1, -1)]
        return [
            tuple(i for i in range(n) if i not in dropped)
            for k in range(self.space[s], -1, -1)
            for dropped in itertools.combinations(self._droppable[s], k)
        ]

    def enumerate(self) -> list[Subnet]:
        """Every candidate: input sizes ascending, then the kept blocks, fewest first."""
        options = [self._stage_options(s) for s in range(len(self.num_blocks))]
        return [Subnet(kept, self.num_blocks, size) for size in self.sizes for kept in itertools.product(*options)]

    def _draw_stage(self, s: int, rng: np.random.Generator) -> tuple[int, ...]:
        k = int(rng.choice(len(self._k_probs[s]), p=self._k_probs[s]))
        n = self.num_blocks[s]
        if self.rule == "prefix":
            return tuple(range(n - k))
        dropped = set(rng.choice(self._droppable[s], size=k, replace=False).tolist()) if k else set()
        return tuple(i for i in range(n) if i not in dropped)

    def random(self, rng: np.random.Generator) -> Subnet:
        """A candidate drawn per stage as training draws, at a uniformly drawn input size."""
        kept = tuple(self._draw_stage(s, rng) for s in range(len(self.num_blocks)))
        return Subnet(kept, self.num_blocks, int(self.sizes[rng.integers(len(self.sizes))]))

    def mutate(self, subnet: Subnet, rng: np.random.Generator, prob: float) -> Subnet:
        """``subnet`` with each stage and the input size redrawn with probability ``prob``."""
        kept = tuple(self._draw_stage(s, rng) if rng.random() < prob else k for s, k in enumerate(subnet.kept))
        size = int(self.sizes[rng.integers(len(self.sizes))]) if rng.random() < prob else subnet.input_size
        return Subnet(kept, self.num_blocks, size)

    def crossover(self, first: Subnet, second: Subnet, rng: np.random.Generator) -> Subnet:
        """Each stage and the input size from one of two parents, at random."""
        kept = tuple(a if rng.random() < 0.5 else b for a, b in zip(first.kept, second.kept, strict=True))
        return Subnet(kept, self.num_blocks, first.input_size if rng.random() < 0.5 else second.input_size)

    def cheapest(self, block_cost: Callable[[int, int, int], float]) -> Subnet:
        """The cheapest candidate: the smallest size, and per stage the dearest droppable blocks dropped.

        ``block_cost(stage, block, size)`` is what dropping one block saves.
        """
        size = self.sizes[0]
        kept = []
        for s, blocks in enumerate(self._droppable):
            dearest = sorted(blocks, key=lambda b, s=s: (-block_cost(s, b, size), b))[: self.space[s]]
            kept.append(tuple(i for i in range(self.num_blocks[s]) if i not in dearest))
        return Subnet(tuple(kept), self.num_blocks, size)


def parse_input_sizes(text: str | Sequence[int] | None) -> list[int] | None:
    """``"16,24,32"`` into sorted distinct sides (at least 8 px); None stays None (the default sizes)."""
    if text is None:
        return None
    try:
        sizes = [int(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip()]
    except ValueError:
        raise ConfigError(f"--input-sizes {text!r} must be comma-separated integers, e.g. 16,24,32") from None
    if not sizes or min(sizes) < MIN_INPUT_SIZE:
        raise ConfigError(f"--input-sizes {text!r} must give sides of at least {MIN_INPUT_SIZE} pixels")
    return sorted(set(sizes))


def default_input_sizes(
    full_size: int, min_input_scale: float, steps: int, family: ResidualFamily, model: nn.Module
) -> list[int]:
    """``steps`` sides from ``floor(min_input_scale x full_size)`` (not below the family's smallest) to ``full_size``."""
    if not family.supports_smaller_inputs or min_input_scale >= 1.0:
        return [full_size]
    low = max(MIN_INPUT_SIZE, family.min_input_size(model) if family.min_input_size else 0)
    low = min(full_size, max(low, smallest_input_side(min_input_scale, full_size)))
    return sorted({round(float(v)) for v in np.linspace(low, full_size, max(1, steps))})


def evolve(
    space: CandidateSpace,
    rng: np.random.Generator,
    allowed: Callable[[Subnet], bool],
    score: Callable[[list[Subnet]], None],
    rank: Callable[[Subnet], tuple],
    population: int,
    generations: int,
    parent_ratio: float = 0.25,
    mutation_ratio: float = 0.5,
    mutation_prob: float = 0.1,
    first: Sequence[Subnet] = (),
) -> None:
    """OFA-style evolution: score a population, keep the best as parents, refill by mutation and crossover.

    Only ``allowed`` candidates (those within the budget) enter the population; ``score`` scores a
    list of new candidates, ``rank`` orders scored ones (best first). ``first`` joins the first
    population when it is short of allowed candidates. Deterministic for a given ``rng`` state when
    ``score`` and ``allowed`` are.
    """
    tries = 50 * population
    seen: set[Subnet] = set()

    def fill(count: int, propose: Callable[[], Subnet]) -> list[Subnet]:
        found: list[Subnet] = []
        for _ in range(tries):
            if len(found) >= count:
                break
            subnet = propose()
            if subnet not in seen and allowed(subnet):
                seen.add(subnet)
                found.append(subnet)
        return found

    members = fill(population, lambda: space.random(rng))
    for subnet in first:
        if len(members) < population and subnet not in seen:
            seen.add(subnet)
            members.append(subnet)
    score(members)
    num_parents = max(1, round(parent_ratio * population))
    num_mutants = round(mutation_ratio * (population - num_parents))
    for _ in range(generations):
        parents = sorted(members, key=rank)[:num_parents]

        def parent(parents: list[Subnet] = parents) -> Subnet:
            return parents[rng.integers(len(parents))]

        mutants = fill(num_mutants, lambda parent=parent: space.mutate(parent(), rng, mutation_prob))
        crossed = fill(
            population - num_parents - len(mutants), lambda parent=parent: space.crossover(parent(), parent(), rng)
        )
        if not mutants and not crossed:
            break
        score(mutants + crossed)
        members = parents + mutants + crossed
