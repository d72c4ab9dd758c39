"""Builtin datasets: small image datasets built from data shipped inside installed packages.

They need no download, so the quickstart config, the tests and CI work offline. A builtin
dataset is named ``<package>:<name>`` in ``DataArguments.dataset_name`` (hub dataset names never
contain a colon).

Every builder returns a :class:`datasets.DatasetDict` with a ``"train"`` split only; the
validation split is carved off by :func:`stim_hf.data.image_datasets.load_image_datasets` (``train_val_split``,
stratified, seeded), exactly as for any other source without validation data.
"""

from __future__ import annotations

from collections.abc import Callable

import datasets
import numpy as np

from stim_hf.errors import ConfigError

DIGITS_IMAGE_SIZE = 32
"""Side of the RGB images of ``sklearn:digits`` (upscaled from 8x8 so that CIFAR models apply)."""


def sklearn_digits() -> datasets.DatasetDict:
    """scikit-learn's handwritten digits (1797 images, 10 classes) as a CIFAR-like image dataset.

    The 8x8 grayscale images (values 0..16) are scaled to 0..255 uint8, upscaled bilinearly to
    32x32 and converted to RGB, so CIFAR-style models and transforms apply unchanged. The
    result is deterministic. Returns ``{"train": Dataset}`` with features
    ``{"image": Image(), "label": ClassLabel(names=["0", ..., "9"])}``.
    """
    import PIL.Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = [
        PIL.Image.fromarray(array, mode="L")
        .resize((DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), PIL.Image.Resampling.BILINEAR)
        .convert("RGB")
        for array in pixels
    ]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    train = datasets.Dataset.from_dict(
        {"image": images, "label": digits.target.astype(np.int64).tolist()}, features=features
    )
    return datasets.DatasetDict({"train": train})


BUILTIN_DATASETS: dict[str, Callable[[], datasets.DatasetDict]] = {
    "sklearn:digits": sklearn_digits,
}
"""Registry of builtin datasets: name -> builder returning a DatasetDict with a "train" split."""


def is_builtin_dataset_name(name: str) -> bool:
    """Whether ``name`` is written as a builtin dataset (``<package>:<name>``) rather than a hub name.

    Hub names and local paths never look like that (a colon and no path separator), so a
    misspelt builtin name is reported as such instead of being looked up on the hub.
    """
    return ":" in name and "/" not in name and "\\" not in name


def check_builtin_dataset_name(name: str) -> None:
    """Raise :class:`ConfigError` listing the builtin names if ``name`` is not one of them."""
    if name not in BUILTIN_DATASETS:
        known = ", ".join(sorted(BUILTIN_DATASETS))
        raise ConfigError(
            f"unknown builtin dataset '{name}'; set dataset_name to one of the builtin datasets ({known}) "
            "or to a Hugging Face dataset name (without ':')"
        )


def load_builtin_dataset(name: str) -> datasets.DatasetDict:
    """Build the builtin dataset ``name`` (see :data:`BUILTIN_DATASETS`); ConfigError if unknown."""
    check_builtin_dataset_name(name)
    return BUILTIN_DATASETS[name]()
