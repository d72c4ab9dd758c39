"""BatchNorm handling for sub-network passes.

Sub-network passes run in train mode and would otherwise blend the statistics of shallower nets
on smaller inputs into the full network's running statistics.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from stim_hf.method import ResidualStage, Subnet, resize_for_subnet, use_subnet

DEFAULT_RECALIBRATION_SAMPLES = 1024
"""Training images a sub-network's BatchNorm statistics are re-estimated on, by default, before it is
scored (``subnet_bn_recalibration_samples``, ``stim-hf loafing`` / ``export --recalibrate-bn``)."""


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm (and SyncBatchNorm) layer of ``model`` that tracks running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextmanager
def frozen_running_stats(model: nn.Module | Sequence[_BatchNorm]) -> Iterator[None]:
    """Inside the block, BatchNorm layers normalise with batch statistics but update nothing.

    With ``track_running_stats`` off, a train-mode BatchNorm passes no running buffers to the
    kernel: it still uses the batch's statistics, and neither the running mean / variance nor
    ``num_batches_tracked`` change, exactly as if the pass had not happened. ``model`` may be
    the list :func:`batchnorm_layers` returns, kept by a caller that freezes every step.
    """
    layers = batchnorm_layers(model) if isinstance(model, nn.Module) else model
    # A plain attribute: object.__setattr__ sets it as nn.Module.__setattr__ would, 12x faster
    # (12 against 150 us per pass for ResNet-56's 57 layers on a CPU).
    try:
        for layer in layers:
            object.__setattr__(layer, "track_running_stats", False)
        yield
    finally:
        for layer in layers:
            object.__setattr__(layer, "track_running_stats", True)


@contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Restore Python, NumPy and torch (CPU and CUDA) random states on exit.

    Recalibration draws batches and augmentations; training must not see a different random
    stream because of it (bit-exact resume, same results with and without recalibration points).
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def recalibration_indices(
    dataset_size: int, num_samples: int, seed: int | Sequence[int], rank: int = 0, world_size: int = 1
) -> list[int]:
    """Process ``rank``'s share of ``num_samples`` training images drawn with ``seed``: the same images everywhere.

    The first ``num_samples`` indices of a seeded permutation of ``range(dataset_size)`` (all of them
    when the data set is smaller), dealt out so every process gets as many: equal shares run equal
    numbers of forward passes, which SyncBatchNorm's collectives need (a process with one batch more
    would wait for the others forever); the few images left over by an uneven split are not used.
    """
    order = np.random.default_rng(seed).permutation(dataset_size)
    count = min(num_samples, dataset_size)
    return order[rank : count - count % world_size : world_size].tolist()


class _PooledMoments:
    """Count, mean and sum of squared deviations of a BatchNorm layer's input, per channel, over many batches.

    Batches are merged exactly (Chan et al.'s parallel update), so the result is the mean and the
    variance of all the activations seen, as if they had been one batch.
    """

    def __init__(self, layer: _BatchNorm) -> None:
        device = layer.running_mean.device
        self.dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.count = 0
        self.batches = 0
        self.mean = torch.zeros(layer.num_features, dtype=self.dtype, device=device)
        self.m2 = torch.zeros_like(self.mean)

    def add(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Merge a batch of ``n`` values per channel with this mean and sum of squared deviations."""
        total = self.count + n
        delta = mean.to(self.dtype) - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2.to(self.dtype) + delta.square() * (self.count * n / total)
        self.count = total
        self.batches += 1

    def add_activations(self, x: torch.Tensor) -> None:
        """Merge the activations ``x`` (batch, channels, ...) of one forward pass."""
        var, mean = torch.var_mean(x.float(), dim=[0, *range(2, x.dim())], correction=0)
        n = x.numel() // x.shape[1]
        self.add(n, mean, var * n)

    def add_kernel_statistics(self, layer: _BatchNorm, x: torch.Tensor) -> None:
        """Merge the batch statistics the BatchNorm kernel just left in ``layer``'s buffers (momentum 1)."""
        n = x.numel() // x.shape[1]
        self.add(n, layer.running_mean, layer.running_var * (n - 1))  # the kernel keeps the unbiased variance


def _pool_across_processes(
    moments: list[_PooledMoments], all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Replace every layer's moments by those of all processes' activations together (three all-reduces)."""
    sizes = [m.mean.numel() for m in moments]
    counts = all_reduce_sum(
        torch.tensor([float(m.count) for m in moments], dtype=moments[0].dtype, device=moments[0].mean.device)
    )
    sums = all_reduce_sum(torch.cat([m.mean * m.count for m in moments])).split(sizes)
    means = [total / count if count else total for total, count in zip(sums, counts.tolist(), strict=True)]
    m2 = all_reduce_sum(
        torch.cat([m.m2 + m.count * (m.mean - mean).square() for m, mean in zip(moments, means, strict=True)])
    ).split(sizes)
    for m, count, mean, deviations in zip(moments, counts.tolist(), means, m2, strict=True):
        m.count, m.mean, m.m2 = int(count), mean, deviations


@contextmanager
def estimating_batchnorm(
    layers: Sequence[_BatchNorm], all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Iterator[None]:
    """Inside the block, ``layers`` normalise with batch statistics, which are pooled exactly.

    On exit every layer that ran gets the mean and the (unbiased) variance of all the activations
    it saw, pooled over the batches as if they had been one batch (Once-for-All's estimate, with
    the variance between batches counted too), and a batch counter equal to the batches seen; a
    layer that did not run (inside a dropped block) keeps its statistics. ``all_reduce_sum`` (a
    function summing a tensor over processes; every process must run as many batches) pools across
    processes, so every rank ends with the statistics of all the processes' images together. The
    layers' mode and momentum are restored; the rest of the model is left as it is (call
    ``model.eval()`` first, so that dropout and drop-path stay off).
    """
    moments = {layer: _PooledMoments(layer) for layer in layers}
    saved = [
        (
            layer.training,
            layer.momentum,
            layer.running_mean.clone(),
            layer.running_var.clone(),
            layer.num_batches_tracked.clone(),
        )
        for layer in layers
    ]
    # Alone, the kernel's own batch statistics are read from the buffers (momentum 1): no second pass
    # over each input. Across processes SyncBatchNorm's buffers hold every process's statistics, so
    # each process pools its own inputs instead, and the processes' moments are merged on exit.
    from_inputs = all_reduce_sum is not None
    if from_inputs:
        hook = lambda layer, inputs, _: moments[layer].add_activations(inputs[0])  # noqa: E731
    else:
        hook = lambda layer, inputs, _: moments[layer].add_kernel_statistics(layer, inputs[0])  # noqa: E731
    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with torch.no_grad():
            for layer in layers:
                layer.train()
                if not from_inputs:
                    layer.momentum = 1.0
                    layer.running_mean.zero_()  # 0 * a non-finite old value would still be NaN
                    layer.running_var.fill_(1.0)
        with frozen_running_stats(layers) if from_inputs else nullcontext():
            yield
    finally:
        for handle in handles:
            handle.remove()
        if from_inputs and layers:
            _pool_across_processes(list(moments.values()), all_reduce_sum)
        with torch.no_grad():
            for layer, (training, momentum, mean, var, tracked) in zip(layers, saved, strict=True):
                layer.train(training)
                layer.momentum = momentum
                pooled = moments[layer]
                if pooled.count:
                    layer.running_mean.copy_(pooled.mean)
                    layer.running_var.copy_(pooled.m2 / max(pooled.count - 1, 1))  # unbiased, as BatchNorm keeps it
                    layer.num_batches_tracked.fill_(pooled.batches)
                else:
                    layer.running_mean.copy_(mean)
                    layer.running_var.copy_(var)
                    layer.num_batches_tracked.copy_(tracked)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[dict],
    num_samples: int,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    forward_kwargs: dict | None = None,
) -> int:
    """Re-estimate every BatchNorm layer's running statistics on ``num_samples`` images, exactly.

    Runs the model on ``batches`` (dicts with ``pixel_values``, cut to ``num_samples`` images) with
    its BatchNorm layers normalising by batch statistics and every other module in eval mode
    (no dropout or stochastic depth), under :func:`estimating_batchnorm`: each layer gets the
    exact statistics of all the activations it saw, whatever the batch sizes, pooled across
    processes with ``all_reduce_sum``. Modes are restored. Returns the images seen by this process.
    """
    layers = batchnorm_layers(model)
    if not layers or num_samples <= 0:
        return 0
    modes = [(module, module.training) for module in model.modules()]
    seen = 0
    try:
        model.eval()
        with estimating_batchnorm(layers, all_reduce_sum):
            for batch in batches:
                if seen >= num_samples:
                    break
                pixel_values = batch["pixel_values"][: num_samples - seen]
                model(pixel_values=pixel_values, **(forward_kwargs or {}))
                seen += pixel_values.shape[0]
    finally:
        for module, training in modes:
            module.training = training
    return seen


def batchnorm_state(model: nn.Module) -> list[tuple[torch.Tensor, ...]]:
    """Copies of every BatchNorm layer's running mean, running variance and batch counter."""
    return [
        (layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone())
        for layer in batchnorm_layers(model)
    ]


@torch.no_grad()
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
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    forward_kwargs: dict | None = None,
) -> Iterator[int]:
    """Inside the block, ``model``'s BatchNorm statistics are re-estimated for ``subnet`` (or the full net).

    Runs :func:`recalibrate_batchnorm` on ``num_samples`` images of ``batches`` (moved to
    ``device``, default the model's) while the model runs as ``subnet``, resized to its input size
    if it has one; yields the number of images used by this process. Every statistic (and the
    batch counters) is put back on exit, bit for bit, so the model is again exactly as before.
    """
    if device is None:
        device = next(model.parameters()).device
    saved = batchnorm_state(model)
    moved = ({"pixel_values": resize_for_subnet(b["pixel_values"].to(device), subnet)} for b in batches)
    try:
        with nullcontext() if subnet is None or subnet.is_full else use_subnet(stages, subnet):
            seen = recalibrate_batchnorm(model, moved, num_samples, all_reduce_sum, forward_kwargs)
        yield seen
    finally:
        restore_batchnorm_state(model, saved)
