"""The trainer's ``batch_transform`` for the uint8 image pipelines: finish the augmentation and normalise on the device.

Both ``image_pipeline: predecoded`` (:mod:`stim_hf.data.predecoded`: each image's crop and flip) and
``image_pipeline: device_color`` (:mod:`stim_hf.data.device_color`: each image's colour jitter) send
uint8 batches with per-image augmentation parameters drawn in the workers; this finishes them
once the batch is on the training device, in batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from stim_hf.data.device_color import COLOR_JITTER_KEY, color_jitter
from stim_hf.data.image_datasets import check_predecoded_augmentation
from stim_hf.data.predecoded import CROP_FLIP_KEY, crop_and_flip

if TYPE_CHECKING:
    from stim_hf.data.image_datasets import DataArguments


class DeviceImageAugmentation:
    """The trainer's ``batch_transform`` for uint8 batches: finish the augmentation and normalise, on the device.

    Pre-decoded batches (``image_pipeline: predecoded``) carry each image's crop and flip;
    ``device_color`` batches each image's colour jitter (:mod:`stim_hf.data.device_color`); evaluation
    batches nothing, and are only normalised. Batches whose ``pixel_values`` are not uint8 pass
    through unchanged, so the same trainer can evaluate a default-pipeline dataset.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], padding: int) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.padding = padding
        self._normalisation_on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def from_data_args(cls, data_args: DataArguments) -> DeviceImageAugmentation:
        """The augmentation matching ``data_args``' pipeline, preset, size and normalisation."""
        if data_args.image_pipeline == "predecoded":
            check_predecoded_augmentation(data_args.augmentation)
        mean, std = data_args.normalization()
        return cls(mean, std, data_args.crop_padding())

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Finish a batch on the device: ``pixel_values`` becomes normalised float32; the parameters are consumed."""
        pixels = batch.get("pixel_values")
        crop_flip = batch.pop(CROP_FLIP_KEY, None)
        jitter = batch.pop(COLOR_JITTER_KEY, None)
        if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8:
            return batch
        if crop_flip is not None:
            pixels = crop_and_flip(pixels, crop_flip, self.padding)
        mean, std, shift, scale = self._normalisation(pixels.device)
        if jitter is not None:
            pixels = color_jitter(pixels.float().div_(255.0), jitter)
            batch["pixel_values"] = pixels.sub_(mean).div_(std)
            return batch
        batch["pixel_values"] = torch.addcmul(shift, pixels.float(), scale)
        return batch

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(mean, std, shift, scale) on ``device``, kept per device (no copy per batch).

        (x / 255 - mean) / std = shift + x * scale: one fused pass for a uint8 batch.
        """
        if device not in self._normalisation_on:
            mean, std = self.mean.to(device), self.std.to(device)
            self._normalisation_on[device] = (mean, std, -mean / std, 1.0 / (255.0 * std))
        return self._normalisation_on[device]
