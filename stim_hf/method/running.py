"""Running a model as one of its sub-networks, without copying weights."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from stim_hf.errors import ModelStructureError
from stim_hf.method.sampling import Subnet
from stim_hf.method.stages import ResidualStage


def resize_for_subnet(pixel_values: torch.Tensor, subnet: Subnet | None) -> torch.Tensor:
    """``pixel_values`` resized bilinearly to ``subnet.input_size`` (height; width keeps the aspect ratio).

    A no-op when the sub-network has no input size of its own or the batch already has it. The
    trainer, the FLOP counter and the loafing analysis all resize through here.
    """
    return pixel_values if subnet is None else resize_input(pixel_values, subnet.input_size)


def resize_input(pixel_values: torch.Tensor, size: int | None) -> torch.Tensor:
    """A batch resized bilinearly to height ``size`` (width keeps the aspect ratio); a no-op for None or its size."""
    if size is None or size == pixel_values.shape[-2]:
        return pixel_values
    height, width = pixel_values.shape[-2:]
    return F.interpolate(
        pixel_values, size=(size, max(1, round(width * size / height))), mode="bilinear", align_corners=False
    )


@contextmanager
def use_subnet(stages: Sequence[ResidualStage], subnet: Subnet) -> Iterator[None]:
    """Make the model that owns ``stages`` run as ``subnet`` inside the ``with`` block.

    Each stage's container temporarily holds only the kept blocks (same module objects, so
    gradients reach the shared weights); the full containers are restored in ``finally``, also
    when the forward raises. Dropping a block that is not skippable raises
    :class:`ModelStructureError` before anything is changed.
    """
    if len(subnet.kept) != len(stages):
        raise ModelStructureError(
            f"sub-network {subnet.describe()} has {len(subnet.kept)} stages, the model has {len(stages)}"
        )
    for stage, kept in zip(stages, subnet.kept, strict=True):
        dropped = set(range(stage.num_blocks)) - set(kept)
        bad = [i for i in sorted(dropped) if not stage.skippable[i]]
        if bad or any(not 0 <= i < stage.num_blocks for i in kept):
            raise ModelStructureError(
                f"sub-network {subnet.describe()} drops block(s) {bad} of stage '{stage.name}', "
                "whose input and output shapes differ; only identity-shortcut blocks can be dropped"
            )
    saved = []
    try:
        for stage, kept in zip(stages, subnet.kept, strict=True):
            if len(kept) == stage.num_blocks:
                continue
            modules = stage.container._modules
            saved.append((stage.container, modules))
            items = list(modules.items())
            stage.container._modules = OrderedDict(items[i] for i in kept)
        yield
    finally:
        for container, modules in reversed(saved):
            container._modules = modules
