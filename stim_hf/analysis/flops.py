"""Counting the FLOPs of a model, or of one of its sub-networks, on an example input.

Counts come from :class:`torch.utils.flop_counter.FlopCounterMode`, i.e. from the operations that
actually run: a convolution or matrix multiplication of ``M`` multiply-accumulates counts ``2 M``
FLOPs; element-wise operations, normalisation, activations and pooling count nothing (they are a
small share of a convolutional network's work and are not what the papers count either).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from stim_hf.method import ResidualStage, Subnet, resize_for_subnet, use_subnet


@torch.no_grad()
def count_flops(
    model: nn.Module,
    example: torch.Tensor,
    stages: Sequence[ResidualStage] | None = None,
    subnet: Subnet | None = None,
    forward_kwargs: dict | None = None,
) -> int:
    """FLOPs of one forward pass of ``model`` (or of ``subnet`` of it) on ``example``, per image.

    ``example`` is a batch of pixel values ``(B, C, H, W)`` at the size to count at (the eval
    size); the count is divided by ``B``. With ``subnet`` (and the model's ``stages``, see
    :func:`stim_hf.method.find_residual_stages`) the model runs as that sub-network, on the
    example resized to ``subnet.input_size`` when it has one. The model runs in eval mode and its
    mode is restored afterwards; weights and BatchNorm statistics are not changed.
    """
    if subnet is not None and stages is None:
        raise ValueError("count_flops needs the model's stages to run a sub-network")
    batch = example.shape[0]
    pixel_values = resize_for_subnet(example, subnet)
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        if subnet is not None:
            with use_subnet(stages, subnet), counter:
                model(pixel_values=pixel_values, **(forward_kwargs or {}))
        else:
            with counter:
                model(pixel_values=pixel_values, **(forward_kwargs or {}))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // batch


def subnet_flop_shares(
    model: nn.Module,
    example: torch.Tensor,
    stages: Sequence[ResidualStage],
    subnets: Sequence[Subnet],
) -> tuple[int, list[int], list[float]]:
    """The full network's FLOPs, each sub-network's FLOPs, and each one's share of the full count.

    All counted with :func:`count_flops` on the same ``example``.
    """
    full = count_flops(model, example)
    counts = [count_flops(model, example, stages, subnet) for subnet in subnets]
    return full, counts, [count / full if full else float("nan") for count in counts]
