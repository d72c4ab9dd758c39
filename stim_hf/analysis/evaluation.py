"""Evaluating saved models and their sub-networks on a data set: the primitives the tools share.

``stim-hf loafing``, ``stim-hf export`` and the TensorBoard monitor score networks with
:func:`evaluate_model`; the commands that work on saved checkpoints draw the images that BatchNorm
statistics are re-estimated on with :func:`recalibration_batches` and decide how many with
:func:`resolve_recalibration_samples` (a training source is needed only when they are used).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from stim_hf.data.image_datasets import DataArguments
from stim_hf.data.transforms import collate_image_batch, with_image_transforms
from stim_hf.errors import ConfigError, DataError
from stim_hf.method import ResidualStage, Subnet, resize_for_subnet, resize_input, use_subnet
from stim_hf.method.batchnorm import DEFAULT_RECALIBRATION_SAMPLES, recalibration_indices

logger = logging.getLogger(__name__)

TRAINING_SOURCE_FLAGS = "--train_file, --train_dir or --dataset_name (or --config RECIPE.yaml)"
"""How the commands' messages name the ways to give training images."""


def use_subnet_or_full(stages: Sequence[ResidualStage] | None, subnet: Subnet | None):
    """``use_subnet(stages, subnet)`` for a proper sub-network, a no-op context for ``None`` or the full one."""
    if subnet is None or subnet.is_full:
        return nullcontext()
    return use_subnet(stages, subnet)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    stages: Sequence[ResidualStage] | None = None,
    subnet: Subnet | None = None,
    device: torch.device | str | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    forward_kwargs: dict | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy and mean cross-entropy of ``model`` (or of ``subnet`` of it) on ``batches``.

    ``batches`` yield ``{"pixel_values", "labels"}`` (moved to ``device``, default the model's).
    The model runs in eval mode (its mode is restored), so BatchNorm uses its running statistics:
    those of the full network unless changed (see
    :func:`~stim_hf.method.batchnorm.subnet_batchnorm_statistics`). A sub-network with an ``input_size``
    gets its batches resized to it. ``gather`` (e.g. ``accelerator.gather_for_metrics``) collects
    per-example results across processes in a distributed run. Returns ``{"accuracy",
    "top5_accuracy", "loss", "num_samples"}`` (top-5 is top-C with fewer than 5 classes).
    """
    if subnet is not None and stages is None:
        raise ValueError("evaluate_model needs the model's stages to run a sub-network")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    sums = torch.zeros(3, dtype=torch.float64)  # top-1 correct, top-5 correct, cross-entropy
    count = 0
    try:
        model.eval()
        with use_subnet_or_full(stages, subnet):
            for batch in batches:
                pixel_values = resize_for_subnet(batch["pixel_values"].to(device), subnet)
                labels = batch["labels"].to(device)
                logits = model(pixel_values=pixel_values, **(forward_kwargs or {})).logits.float()
                top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
                per_example = torch.stack(
                    [
                        (top[:, 0] == labels).float(),
                        (top == labels[:, None]).any(dim=-1).float(),
                        F.cross_entropy(logits, labels, reduction="none"),
                    ],
                    dim=1,
                )
                if gather is not None:
                    per_example = gather(per_example)
                sums += per_example.double().sum(dim=0).cpu()
                count += int(per_example.shape[0])
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("no evaluation examples: the evaluation data is empty")
    accuracy, top5, loss = (sums / count).tolist()
    return {"accuracy": accuracy, "top5_accuracy": top5, "loss": loss, "num_samples": count}


class BatchSource:
    """Re-iterable batches of a transformed dataset: decoded once and kept, or decoded on every pass.

    Keeps the collated batches in memory when ``cache`` is true; otherwise every iteration runs a
    new :class:`~torch.utils.data.DataLoader`. Either way every pass yields the same images.
    """

    def __init__(self, dataset, batch_size: int, num_workers: int = 0, cache: bool = True) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache = cache
        self._batches: list[dict[str, torch.Tensor]] | None = None

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_image_batch,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.cache:
            yield from self._loader()
            return
        if self._batches is None:
            self._batches = list(self._loader())
        yield from self._batches

    def __len__(self) -> int:
        return len(self.dataset)


def recalibration_batches(
    train_split: datasets.Dataset,
    data_args: DataArguments,
    num_samples: int,
    seed: int,
    batch_size: int = 128,
    input_size: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The ``num_samples`` training images that BatchNorm statistics are re-estimated on, as collated batches.

    The first ``num_samples`` of a permutation seeded by ``seed`` (the images
    :func:`~stim_hf.method.batchnorm.recalibration_indices` picks), with the training transforms drawn under
    that seed too, so the same seed gives the same inputs for every network and every checkpoint;
    resized to ``input_size`` when given. The random states are left as they were.
    """
    indices = recalibration_indices(len(train_split), num_samples, seed)
    dataset = with_image_transforms(train_split, data_args, train=True)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=collate_image_batch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batches = list(loader)
    for batch in batches:
        batch["pixel_values"] = resize_input(batch["pixel_values"], input_size)
    return batches


def resolve_recalibration_samples(
    requested: int | None,
    data_args: DataArguments | None,
    flag: str,
    notify: Callable[[str], None] | None = None,
) -> int:
    """How many training images re-estimate BatchNorm statistics: ``requested``, or the default when it is None.

    Without a training source (``data_args`` None or evaluation data only), an unset ``requested``
    falls back to 0, the full network's statistics, with one line (passed to ``notify``, else
    logged as a warning) saying how to get re-estimated numbers; ``requested`` > 0 is then a
    :class:`ConfigError` naming the fix.
    """
    has_training_data = data_args is not None and data_args.has_training_source
    if requested is None:
        if has_training_data:
            return DEFAULT_RECALIBRATION_SAMPLES
        (notify or logger.warning)(
            "no training images given, so sub-networks keep the full network's BatchNorm statistics (inherited); "
            f"give training data ({TRAINING_SOURCE_FLAGS}) to score them with statistics re-estimated for each"
        )
        return 0
    if requested < 0:
        raise ConfigError(f"{flag} {requested} must be >= 0 (0 keeps the full network's BatchNorm statistics)")
    if requested and not has_training_data:
        raise ConfigError(
            f"{flag} {requested} re-estimates BatchNorm statistics on training images, but no training data was "
            f"given; add {TRAINING_SOURCE_FLAGS}, or pass {flag} 0 to keep the full network's statistics"
        )
    return requested


def print_notice(prog: str) -> Callable[[str], None]:
    """A ``notify`` for the commands: the line on stderr, prefixed with the command's name."""
    return lambda line: print(f"{prog}: {line}", file=sys.stderr, flush=True)
