"""The ONNX files of an export folder: ``model.onnx`` (and ``model.int8.onnx``), checked on the user's own images.

``stim-hf export ... --onnx`` writes the export's ONNX file beside its weights, checks it in ONNX
Runtime against PyTorch on validation images and times both (:func:`~stim_hf.tools.onnx_export.export_onnx`);
``--int8`` adds a static int8 file calibrated on training images, with validation top-1 before and
after (:func:`~stim_hf.tools.onnx_export.quantize_int8`). A budget-switching folder gets one file
per front point under ``onnx/``. Every figure is measured on the user's run, at export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from stim_hf.data.image_datasets import DataArguments, load_image_datasets
from stim_hf.data.transforms import collate_image_batch, with_image_transforms
from stim_hf.errors import ConfigError
from stim_hf.tools.datasets_progress import datasets_work_in_lines
from stim_hf.tools.onnx_export import export_onnx, quantize_int8, require_onnx

CHECK_IMAGES = 64
"""Validation images the ONNX file is checked on against PyTorch."""
CALIBRATION_IMAGES = 256
"""Training images int8 calibration runs on."""
MAX_VALIDATION_IMAGES = 10_000
"""At most this many validation images score fp32 against int8 (all of CIFAR's test split); the record says how many."""
MAX_VALIDATION_BYTES = 1 << 30
"""...and at most this much memory for them: 10,000 CIFAR images take 123 MB, 10,000 ImageNet crops 6 GB (1,782 fit)."""


@dataclass
class OnnxImages:
    """Real images at the size the exported model is fed: to check the file, to calibrate int8, to score both."""

    check: torch.Tensor
    calibration: torch.Tensor | None = None
    validation: tuple[torch.Tensor, torch.Tensor] | None = None
    validation_source: str | None = None


def check_onnx_request(onnx: bool, int8: bool, data_args: DataArguments | None) -> None:
    """Refuse ``--onnx`` / ``--int8`` that cannot run (no packages, no images), before anything is loaded."""
    if int8 and not onnx:
        raise ConfigError("--int8 quantizes the ONNX file: add --onnx")
    if not onnx:
        return
    require_onnx()
    if data_args is None:
        raise ConfigError(
            "--onnx checks the file in ONNX Runtime on real images: give the data of training (--config RECIPE.yaml, "
            "or --dataset_name / --train_file / --validation_file ...)"
        )


def load_onnx_images(
    data_args: DataArguments, seed: int, input_size: int | None, int8: bool, batch_size: int = 128
) -> OnnxImages:
    """Validation images (evaluation transforms at ``input_size``) and, for ``int8``, seeded training images."""
    with datasets_work_in_lines("loading the images"):
        splits = load_image_datasets(data_args, seed=seed)
    validation = with_image_transforms(splits["validation"], data_args, train=False, input_size=input_size)
    image_bytes = 4 * validation[0]["pixel_values"].numel()
    limit = min(MAX_VALIDATION_IMAGES, max(CHECK_IMAGES, MAX_VALIDATION_BYTES // image_bytes))
    count = min(len(validation), limit if int8 else CHECK_IMAGES)
    rows = list(range(count))
    if count < len(validation):  # a seeded sample: validation files are often sorted by class
        rows = sorted(np.random.default_rng(seed).permutation(len(validation))[:count].tolist())
    images, labels = _load(Subset(validation, rows), batch_size)
    result = OnnxImages(check=images[:CHECK_IMAGES])
    if int8:
        train = with_image_transforms(splits["train"], data_args, train=False, input_size=input_size)
        rows = np.random.default_rng(seed).permutation(len(train))[:CALIBRATION_IMAGES].tolist()
        result.calibration = _load(Subset(train, rows), batch_size)[0]
        result.validation = (images, labels)
        whole = count == len(validation)
        result.validation_source = (
            f"all {count:,} images of the validation split" if whole else
            f"{count:,} of the {len(validation):,} validation images (seed {seed})"
        )  # fmt: skip
    return result


def _load(dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(DataLoader(dataset, batch_size=batch_size, collate_fn=collate_image_batch))
    return torch.cat([b["pixel_values"] for b in batches]), torch.cat([b["labels"] for b in batches])


def write_onnx_files(model: nn.Module, folder: str | Path, stem: str, images: OnnxImages) -> dict[str, Any]:
    """Write ``<stem>.onnx`` (checked, timed) and, with calibration images, ``<stem>.int8.onnx`` into ``folder``.

    Returns the record for ``export_info.json``: the ONNX file's (max difference to PyTorch,
    latency in PyTorch and ONNX Runtime at batch 1 and 32), and under ``int8`` the quantized
    file's, with the validation top-1 of both ONNX files and of the PyTorch model.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = export_onnx(model, folder / f"{stem}.onnx", images.check)
    if images.calibration is not None and images.validation is not None:
        record["int8"] = quantize_int8(
            folder / f"{stem}.onnx", folder / f"{stem}.int8.onnx", images.calibration, images.validation
        )
        record["int8"]["top1"]["source"] = images.validation_source
        record["int8"]["top1"]["pytorch"] = _pytorch_accuracy(model, *images.validation)
    return record


@torch.no_grad()
def _pytorch_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    device = next(model.parameters()).device
    hits = 0
    for start in range(0, len(images), batch_size):
        logits = model(pixel_values=images[start : start + batch_size].to(device)).logits
        hits += int((logits.argmax(-1).cpu() == labels[start : start + batch_size]).sum())
    return hits / len(images)


__all__ = [
    "CALIBRATION_IMAGES",
    "CHECK_IMAGES",
    "MAX_VALIDATION_IMAGES",
    "OnnxImages",
    "check_onnx_request",
    "load_onnx_images",
    "write_onnx_files",
]
