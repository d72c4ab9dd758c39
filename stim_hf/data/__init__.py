"""The data pipeline: datasets, image transforms, pre-decoded and on-device augmentation.

Layer: imports only :mod:`stim_hf.errors` (see ``docs/architecture.md``). The arguments and loading of
image datasets live in :mod:`stim_hf.data.image_datasets`; their public names are re-exported here.
"""

from stim_hf.data.image_datasets import (
    AUGMENTATIONS,
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGE_PIPELINES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREDECODED_AUGMENTATIONS,
    ROW_INDEX_COLUMN,
    DataArguments,
    EvaluationDataArguments,
    check_predecoded_augmentation,
    get_label_names,
    load_image_datasets,
    resolve_data_files,
)

__all__ = [
    "AUGMENTATIONS",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_PIPELINES",
    "PREDECODED_AUGMENTATIONS",
    "ROW_INDEX_COLUMN",
    "DataArguments",
    "EvaluationDataArguments",
    "check_predecoded_augmentation",
    "get_label_names",
    "load_image_datasets",
    "resolve_data_files",
]
