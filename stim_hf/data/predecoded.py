"""The pre-decoded image pipeline: decode once into uint8, crop / flip / normalise on the training device.

The default pipeline (:mod:`stim_hf.data.transforms`) decodes every image and runs torchvision's
transforms on it in the DataLoader workers, every epoch. That costs CPU time per image that a fast
accelerator does not wait for gladly (docs/benchmarks.md, data pipeline). This one:

1. :func:`predecode` decodes each image once, converts it to RGB and brings it to its stored size
   (``Resize`` + ``CenterCrop``, the same operations as the default pipeline), and
   keeps it as raw uint8 CHW bytes in an arrow column, cached by ``datasets`` like any ``map``;
2. :class:`PredecodedBatchTransform` turns a batch of rows into one uint8 tensor and, for
   training, draws each image's random crop offsets and flip (so the draws follow the data
   loader's seeded random state: resume stays exact, see ``SeededBatchDataset``);
3. :class:`stim_hf.data.device_augmentation.DeviceImageAugmentation`, applied by the trainer once the batch is on the device, pads,
   crops and flips every image by its own parameters in one gather, then converts to float and
   normalises.

Steps 2 and 3 together are torchvision's ``RandomCrop(S, padding=S // 8)`` + ``RandomHorizontalFlip``
+ ``ToDtype`` + ``Normalize`` (the ``cifar`` preset) with per-image randomness; with ``none``,
and at evaluation, only the normalisation is left. ``imagenet`` (random resized crops of
images of any size) stays on the default pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import datasets
import torch
from torchvision.transforms import v2

from stim_hf.data.image_datasets import ROW_INDEX_COLUMN, check_predecoded_augmentation
from stim_hf.data.transforms import CenterCrop, decode_rgb, undecoded_images

if TYPE_CHECKING:
    from stim_hf.data.image_datasets import DataArguments

PIXELS_COLUMN = "__pixels__"
"""Column of raw uint8 CHW image bytes written by :func:`predecode`."""

CROP_FLIP_KEY = "crop_flip"
"""Batch key of the per-image augmentation parameters ``(top, left, flip)`` (int16, one row per image)."""


def stored_size(data_args: DataArguments, train: bool) -> tuple[int, int]:
    """(resize, crop) applied once at decoding: the training size, or the eval resize and crop."""
    if train and data_args.augmentation == "cifar":
        return data_args.image_size, data_args.image_size
    crop = data_args.image_size if train else data_args.resolved_eval_image_size()
    return data_args.resolved_eval_resize(), crop


class DecodeToUint8:
    """``datasets.map`` function: decode, RGB, resize + centre crop, and store as uint8 CHW bytes.

    A plain class so that ``datasets`` fingerprints it (and caches the result) from its settings.
    """

    def __init__(self, image_column: str, resize: int, crop: int) -> None:
        self.image_column = image_column
        self.resize, self.crop = resize, crop
        self.geometry = v2.Compose(
            [v2.RGB(), v2.ToImage(), v2.Resize(resize, antialias=True), CenterCrop(crop), v2.ToPureTensor()]
        )

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        """Map a batch of rows to ``{PIXELS_COLUMN: [bytes, ...]}`` (3 x crop x crop uint8 each)."""
        rows = batch.get(ROW_INDEX_COLUMN)
        pixels = []
        for i, value in enumerate(batch[self.image_column]):
            image = decode_rgb(value, None if rows is None else int(rows[i]))
            pixels.append(self.geometry(image).numpy().tobytes())
        return {PIXELS_COLUMN: pixels}


def predecode(
    dataset: datasets.Dataset, data_args: DataArguments, train: bool, num_proc: int | None = None
) -> datasets.Dataset:
    """``dataset`` with its images decoded once into :data:`PIXELS_COLUMN` (the image column dropped).

    The images are brought to their stored size (:func:`stored_size`) with the same torchvision
    operations as the default pipeline, so evaluation sees the same pixels either way. An
    undecodable image raises :class:`DataError` naming its row here, before training starts.
    The result is cached by ``datasets`` (a second run with the same data and sizes reads it back).
    """
    check_predecoded_augmentation(data_args.augmentation)
    image_column = data_args.image_column_name
    dataset = undecoded_images(dataset, data_args)
    resize, crop = stored_size(data_args, train)
    features = datasets.Features({k: v for k, v in dataset.features.items() if k != image_column})
    features[PIXELS_COLUMN] = datasets.Value("binary")
    decoded = dataset.map(
        DecodeToUint8(image_column, resize, crop),
        batched=True,
        batch_size=256,
        remove_columns=[image_column],
        features=features,
        num_proc=num_proc,
        desc=f"decoding {'training' if train else 'validation'} images once ({crop}x{crop} uint8)",
    )
    return decoded.with_format(None)


class PredecodedBatchTransform:
    """Batched ``datasets`` transform: uint8 pixels, labels and (training) each image's crop offsets and flip.

    The crop offsets ``(top, left)`` index the image padded by ``padding`` on every side and are
    uniform in ``[0, 2 * padding]``; the flip is a fair coin. They are drawn from torch's global
    random state, which the trainer's data loader seeds per batch.
    """

    def __init__(self, size: int, label_column: str, padding: int | None) -> None:
        self.size = size
        self.label_column = label_column
        self.padding = padding

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        """Map raw rows to ``{"pixel_values": uint8 (n, 3, S, S), "labels": [int, ...], CROP_FLIP_KEY: ...}``."""
        raw = batch[PIXELS_COLUMN]
        count = len(raw)
        pixels = torch.frombuffer(bytearray().join(raw), dtype=torch.uint8).view(count, 3, self.size, self.size)
        out: dict[str, Any] = {
            "pixel_values": pixels,
            "labels": [int(label) for label in batch[self.label_column]],
        }
        if self.padding is not None:
            offsets = torch.randint(0, 2 * self.padding + 1, (count, 2))
            flips = torch.randint(0, 2, (count, 1))
            out[CROP_FLIP_KEY] = torch.cat([offsets, flips], dim=1).to(torch.int16)
        return out


def with_predecoded_transforms(
    dataset: datasets.Dataset, data_args: DataArguments, train: bool, num_proc: int | None = None
) -> datasets.Dataset:
    """A view of ``dataset`` (decoded once, see :func:`predecode`) whose rows are uint8 images + labels.

    Pair it with :class:`stim_hf.data.device_augmentation.DeviceImageAugmentation` (``StimulativeTrainer(batch_transform=...)``),
    which finishes the augmentation and normalisation on the device.
    """
    label_column = data_args.label_column_name
    decoded = predecode(dataset, data_args, train, num_proc)
    _, crop = stored_size(data_args, train)
    padding = data_args.crop_padding() if train and data_args.augmentation == "cifar" else None
    transform = PredecodedBatchTransform(crop, label_column, padding)
    return decoded.with_transform(transform, columns=[PIXELS_COLUMN, label_column])


def crop_and_flip(pixels: torch.Tensor, crop_flip: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad every image by ``padding``, crop it at its own ``(top, left)`` and flip it if asked, in one gather.

    ``pixels`` is (B, C, H, W) of any dtype, ``crop_flip`` (B, 3) integers. Returns (B, C, H, W)
    in channels-last memory order (the gather produces it; convolutions prefer it).
    """
    count, _, height, width = pixels.shape
    padded = torch.nn.functional.pad(pixels, (padding, padding, padding, padding))
    params = crop_flip.to(device=pixels.device, dtype=torch.long)
    top, left, flip = params[:, 0], params[:, 1], params[:, 2].bool()
    rows = top[:, None] + torch.arange(height, device=pixels.device)
    cols = left[:, None] + torch.arange(width, device=pixels.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_index = torch.arange(count, device=pixels.device)[:, None, None]
    gathered = padded[batch_index, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return gathered.permute(0, 3, 1, 2)
