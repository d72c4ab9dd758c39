"""What a sub-network costs to run: FLOPs (counted), parameters, and latency measured on a device.

FLOPs and parameters of a sub-network are the full network's minus those of the blocks it drops.
That holds exactly because a droppable block keeps its input's shape, so no other block's cost
depends on whether it runs; :class:`CostModel` counts the full network once per input size with
torch's FLOP counter (as :func:`stim_hf.analysis.flops.count_flops` does), reads each block's share off
it, and sums. Latency is measured, never looked up: warm-up passes,
then the median of timed passes, at batch 1 and at a serving batch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from stim_hf.analysis.flops import count_flops
from stim_hf.errors import ConfigError
from stim_hf.method import ResidualStage, Subnet, resize_for_subnet, use_subnet


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (cuda when available, else cpu) or a device this machine has; :class:`ConfigError` otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device '{name}' is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    available = bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())
    if device.type == "mps":
        available = torch.backends.mps.is_available()
    count = backend.device_count() if available and hasattr(backend, "device_count") else 0
    if not available or (device.index is not None and device.index >= count):
        have = f"{count} {device.type} device(s)" if available else f"no {device.type} device"
        raise ConfigError(
            f"--device {name} is not on this machine (torch sees {have}); measure latency where that device "
            "is, or give --device cpu (or auto)"
        )
    return device


class CostModel:
    """FLOPs and parameter counts of a model's sub-networks, from one count per block and input size.

    ``example`` is one image (1, C, S, S) at the full evaluation size S; sub-networks with an
    ``input_size`` are counted at that size.
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Sequence[ResidualStage],
        example: torch.Tensor,
        forward_kwargs: dict | None = None,
    ) -> None:
        self.model = model
        self.stages = list(stages)
        self.example = example[:1]
        self.forward_kwargs = forward_kwargs or {}
        self.full_size = int(example.shape[-2])
        self.full_parameters = sum(p.numel() for p in model.parameters())
        self.block_parameters = [
            [sum(p.numel() for p in block.parameters()) for block in stage.container] for stage in self.stages
        ]
        self._flops: dict[int, tuple[int, list[list[int]]]] = {}
        self._names = {id(module): name for name, module in model.named_modules()}

    def _size_flops(self, size: int) -> tuple[int, list[list[int]]]:
        """The full network's FLOPs at ``size`` and each droppable block's (0 for the others).

        One counted forward gives both: the counter attributes every operation to the modules it
        runs in. A block the counter does not name is counted by dropping it instead.
        """
        if size not in self._flops:
            num_blocks = tuple(s.num_blocks for s in self.stages)
            everything = tuple(tuple(range(n)) for n in num_blocks)
            full_net = Subnet(everything, num_blocks, size)
            pixel_values = resize_for_subnet(self.example, full_net)
            counter = FlopCounterMode(display=False)
            was_training = self.model.training
            try:
                self.model.eval()
                with torch.no_grad(), counter:
                    self.model(pixel_values=pixel_values, **self._kwargs(size))
            finally:
                self.model.train(was_training)
            full = int(counter.get_total_flops())
            by_module = counter.get_flop_counts()
            root = type(self.model).__name__
            per_block = []
            for s, stage in enumerate(self.stages):
                row = []
                for b, block in enumerate(stage.container):
                    if not stage.skippable[b] or stage.num_blocks == 1:
                        row.append(0)
                    elif f"{root}.{self._names.get(id(block))}" in by_module:
                        row.append(int(sum(by_module[f"{root}.{self._names[id(block)]}"].values())))
                    else:
                        kept = list(everything)
                        kept[s] = tuple(i for i in range(stage.num_blocks) if i != b)
                        row.append(full - self._count(Subnet(tuple(kept), num_blocks, size)))
                per_block.append(row)
            self._flops[size] = (full, per_block)
        return self._flops[size]

    def _kwargs(self, size: int) -> dict:
        return self.forward_kwargs if size != self.full_size else {}

    def _count(self, subnet: Subnet) -> int:
        kwargs = self._kwargs(subnet.input_size or self.full_size)
        return count_flops(self.model, self.example, self.stages, subnet, forward_kwargs=kwargs)

    def block_flops(self, size: int) -> list[list[int]]:
        """Per stage and block, the FLOPs that dropping that block saves at input side ``size`` (0: not droppable)."""
        return self._size_flops(size)[1]

    @property
    def full_flops(self) -> int:
        """FLOPs of the full network at the full size."""
        return self._size_flops(self.full_size)[0]

    def flops(self, subnet: Subnet) -> int:
        """FLOPs of one forward pass of ``subnet`` on one image at its input size."""
        full, per_block = self._size_flops(subnet.input_size or self.full_size)
        return full - sum(
            cost for s, kept in enumerate(subnet.kept) for b, cost in enumerate(per_block[s]) if b not in kept
        )

    def parameters(self, subnet: Subnet) -> int:
        """Parameters of ``subnet`` exported as a standalone model."""
        return self.full_parameters - sum(
            count
            for s, kept in enumerate(subnet.kept)
            for b, count in enumerate(self.block_parameters[s])
            if b not in kept
        )


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    stages: Sequence[ResidualStage],
    subnet: Subnet,
    batch_size: int,
    image_size: int,
    device: torch.device,
    warmup: int = 3,
    repeats: int = 10,
    forward_kwargs: dict | None = None,
) -> float:
    """Median wall time in milliseconds of one eval-mode forward of ``subnet`` on a batch, on ``device``.

    The batch is random pixels at the sub-network's input size (``image_size`` when it has none);
    ``warmup`` untimed passes come first; on a GPU every pass is synchronised. The model must be
    on ``device``.
    """
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, device=device)
    pixel_values = resize_for_subnet(pixel_values, subnet)
    was_training = model.training
    model.eval()
    times = []
    try:
        with use_subnet(stages, subnet):
            for index in range(warmup + repeats):
                _synchronize(device)
                start = time.perf_counter()
                model(pixel_values=pixel_values, **(forward_kwargs or {}))
                _synchronize(device)
                if index >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return 1000 * statistics.median(times)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
