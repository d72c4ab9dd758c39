"""The ``device_color`` image pipeline: decode and crop in the workers at uint8, colour and normalise on the device.

The default pipeline (:mod:`stim_hf.data.transforms`) runs every step of a preset on each image in the
DataLoader workers. For the ``imagenet`` preset, colour jitter and the conversion to float take
about a third of a worker's time per image (docs/benchmarks.md, data pipeline), and the float image is 4x
the bytes of a uint8 one through the worker queue, the collate and the copy to the device. This
pipeline keeps decoding and the geometric steps in the workers, exactly as the default pipeline
does them, and sends uint8 images with each image's colour-jitter parameters, drawn in the
workers under the data loader's seeded random state (so resume stays exact) by torchvision's own
``ColorJitter``. The trainer's ``batch_transform`` (:class:`stim_hf.data.device_augmentation.DeviceImageAugmentation`)
then runs the jitter for the whole batch at once (:func:`color_jitter`) and normalises. On a GPU
that costs little; on a CPU it runs in the training process and is slower end to end
(docs/benchmarks.md, data pipeline).

The result is torchvision's ``ColorJitter(0.4, 0.4, 0.4)`` with per-image randomness, computed in
float32 instead of rounding to uint8 after each of its three adjustments.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import datasets
import torch
from torchvision.transforms import v2

from stim_hf.data.transforms import BatchImageTransform, build_transforms, with_batch_image_transform

if TYPE_CHECKING:
    from stim_hf.data.image_datasets import DataArguments

COLOR_JITTER_KEY = "color_jitter"
"""Batch key of each image's jitter: (brightness, contrast, saturation factors, then the 3 adjustments' order)."""

# torchvision's grayscale weights (v2.functional.rgb_to_grayscale).
_GRAY = (0.2989, 0.587, 0.114)
_CONTRAST, _SATURATION = 1, 2  # and 0: brightness, whose target is black


def jitter_parameters(jitter: v2.ColorJitter) -> torch.Tensor:
    """One image's draw of ``jitter``'s parameters, as torchvision draws them: float32 (6,).

    ``(brightness, contrast, saturation, first, second, third)``: the three factors, then which
    adjustment (0 brightness, 1 contrast, 2 saturation) comes in each place.
    """
    params = jitter.make_params([])
    order = [index for index in params["fn_idx"].tolist() if index != 3]  # 3 is hue, not part of the preset
    factors = [params["brightness_factor"], params["contrast_factor"], params["saturation_factor"]]
    return torch.tensor([*factors, *order], dtype=torch.float32)


def color_jitter(pixels: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation of every image by its own factors, in its own order, in batch.

    ``pixels`` is float (B, 3, H, W) in [0, 1], ``params`` (B, 6) from :func:`jitter_parameters`.
    Each adjustment is torchvision's on float images: a blend ``f * x + (1 - f) * target``
    clamped to [0, 1], whose target is black (brightness), the image's mean gray (contrast) or its
    per-pixel gray (saturation). In each of the three places every image is blended with its own
    target at once: a few elementwise operations over the batch per place, no host synchronisation.
    """
    params = params.to(device=pixels.device, dtype=pixels.dtype)
    factors, order = params[:, :3], params[:, 3:].long()
    red, green, blue = _GRAY
    for place in range(3):
        which = order[:, place]
        factor = factors.gather(1, which[:, None]).view(-1, 1, 1, 1)
        # Per image: the target is gray (saturation), its mean (contrast) or black (brightness).
        saturation = (which == _SATURATION).to(pixels.dtype).view(-1, 1, 1, 1)
        contrast = (which == _CONTRAST).to(pixels.dtype).view(-1, 1, 1, 1)
        gray = (pixels[:, 0:1] * red).add_(pixels[:, 1:2], alpha=green).add_(pixels[:, 2:3], alpha=blue)
        target = torch.addcmul(gray.mean(dim=(2, 3), keepdim=True).mul_(contrast), gray, saturation)
        pixels = torch.lerp(target, pixels, factor).clamp_(0.0, 1.0)
    return pixels


def uint8_transforms(data_args: DataArguments, train: bool) -> tuple[v2.Compose, v2.ColorJitter | None]:
    """The preset's steps for one PIL image up to a uint8 tensor, and the colour jitter left for the device."""
    steps = list(build_transforms(data_args, train).transforms)
    jitter = next((step for step in steps if isinstance(step, v2.ColorJitter)), None)
    # Everything before the float conversion, the jitter excepted, as the default pipeline runs it.
    cut = next(i for i, step in enumerate(steps) if isinstance(step, v2.ToDtype))
    geometry = [step for step in steps[:cut] if step is not jitter]
    return v2.Compose([*geometry, v2.ToPureTensor()]), jitter


def with_uint8_transforms(dataset: datasets.Dataset, data_args: DataArguments, train: bool) -> datasets.Dataset:
    """A view of ``dataset`` whose rows are uint8 images, labels and (training) colour-jitter parameters.

    Each image's parameters are drawn right after its geometric steps, the order in which the
    default pipeline's ``ColorJitter`` draws them: with the same random state both pipelines
    crop, flip and jitter every image alike. Pair it with
    :class:`stim_hf.data.device_augmentation.DeviceImageAugmentation` as the trainer's ``batch_transform``,
    which jitters and normalises on the device.
    """
    transform, jitter = uint8_transforms(data_args, train)
    per_image = None if jitter is None else (COLOR_JITTER_KEY, functools.partial(jitter_parameters, jitter))
    batch_transform = BatchImageTransform(
        transform, data_args.image_column_name, data_args.label_column_name, per_image=per_image
    )
    return with_batch_image_transform(dataset, data_args, batch_transform)
