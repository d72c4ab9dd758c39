"""The image processor saved beside every model: the evaluation's pixels, through transformers' own code."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor

from stim_hf.data.image_datasets import DataArguments
from stim_hf.data.transforms import build_image_processor, build_transforms, eval_resize_and_crop


@pytest.mark.parametrize(
    ("augmentation", "size", "input_size"),
    [("imagenet", 16, None), ("cifar", 16, None), ("none", 24, None), ("imagenet", 16, 12), ("cifar", 16, 10)],
)
def test_processor_gives_the_evaluation_pixels(tmp_path, augmentation, size, input_size):
    """Non-square images of many sizes (every crop offset parity) and image modes, saved and reloaded."""
    data_args = DataArguments(dataset_name="sklearn:digits", image_size=size, augmentation=augmentation)
    build_image_processor(data_args, input_size).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    transform = build_transforms(data_args, train=False, input_size=input_size)
    rng = np.random.default_rng(0)
    for height, width in [(h, w) for h in range(16, 27) for w in range(16, 40, 5)]:
        image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for mode in ("RGB", "L", "P", "CMYK"):
            converted = image.convert(mode)
            ours = transform(converted)
            theirs = processor(converted, return_tensors="pt")["pixel_values"][0]
            assert ours.shape == theirs.shape == (3, input_size or size, input_size or size)
            # The same pixels; transformers folds the 1/255 scaling into the normalisation (float rounding).
            torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5, msg=f"{height}x{width} {mode}")


def test_another_input_size_keeps_the_crop_share():
    imagenet = DataArguments(dataset_name="sklearn:digits", image_size=224, augmentation="imagenet")
    assert eval_resize_and_crop(imagenet) == (256, 224)
    assert eval_resize_and_crop(imagenet, 160) == (183, 160)
    assert eval_resize_and_crop(imagenet, 224) == (256, 224)
    cifar = DataArguments(dataset_name="sklearn:digits", image_size=32)
    assert eval_resize_and_crop(cifar, 14) == (14, 14)
