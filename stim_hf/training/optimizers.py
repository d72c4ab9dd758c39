"""torch's fused optimizer kernels for the Trainer's own optimizers (``fused_optimizer``).

The Trainer builds ``optim: sgd`` and ``optim: adamw_torch`` without ``fused``, so torch updates
the parameters one tensor at a time on a CPU and in a few multi-tensor kernels per step on a GPU.
The fused kernel does the whole update in one pass: 5x less host time for SGD over CIFAR
ResNet-56's 173 tensors on this project's CPU, bit-identical there (docs/benchmarks.md; record in
``docs/measurements/cpu_2026-11-26c/optimizer_step.txt``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# Optimizer classes whose fused kernel runs on every device torch lists for fused kernels
# (torch.optim.Adagrad's, for one, is CPU-only, so it is not here).
FUSABLE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _fused_devices() -> tuple[str, ...]:
    try:  # torch's own list; private, so fall back to the devices it has always held
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:
        return ("cuda", "cpu")


def with_fused_kernel(
    optimizer_cls: type, optimizer_kwargs: dict[str, Any], parameters: Iterable[torch.nn.Parameter]
) -> dict[str, Any]:
    """``optimizer_kwargs`` plus ``fused=True`` where torch has a fused kernel for this optimizer and these parameters.

    Unchanged when the class has no fused kernel on every device, when the kwargs already choose
    an implementation (``fused`` / ``foreach``), or when any parameter is not a plain floating-point
    tensor on a device with fused kernels (DTensor shards, XLA, integer parameters).
    """
    if optimizer_cls not in FUSABLE_OPTIMIZERS or {"fused", "foreach"} & optimizer_kwargs.keys():
        return optimizer_kwargs
    devices = _fused_devices()
    for parameter in parameters:
        if (
            type(parameter.data) is not torch.Tensor
            or not parameter.is_floating_point()
            or parameter.device.type not in devices
        ):
            return optimizer_kwargs
    return {**optimizer_kwargs, "fused": True}
