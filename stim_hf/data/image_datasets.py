"""Data arguments and dataset loading for image classification.

:class:`DataArguments` says where the images come from (a hub dataset, a builtin dataset, an image
folder, or parquet / arrow files) and how to preprocess them; :func:`load_image_datasets` turns
that into a ``DatasetDict`` with a ``"train"`` and a ``"validation"`` split whose label column is a
``ClassLabel``; :func:`get_label_names` gives the class names for the model config.

Image transforms are applied lazily afterwards (see :mod:`stim_hf.data.transforms`).
"""

import glob
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import datasets
import numpy as np

from stim_hf.data.builtin_datasets import check_builtin_dataset_name, is_builtin_dataset_name, load_builtin_dataset
from stim_hf.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

AUGMENTATIONS = ("cifar", "imagenet", "none")
IMAGE_PIPELINES = ("pil", "predecoded", "device_color")
PREDECODED_AUGMENTATIONS = ("cifar", "none")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ROW_INDEX_COLUMN = "__row_index__"
"""Column added by :func:`load_image_datasets`: the row of each example in the split it was loaded
from (before validation carving and ``max_*_samples``), so that an undecodable image can be
reported by row."""

_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
_INTEGER_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})


@dataclass
class DataArguments:
    """Where the images come from and how they are preprocessed (parsed by ``HfArgumentParser``).

    Exactly one source: ``dataset_name`` (a hub dataset, a local dataset directory, or a builtin
    dataset such as ``sklearn:digits``), ``train_dir`` (an image folder with one subfolder per
    class) or ``train_file`` (parquet / arrow files). Without validation data, a stratified,
    seeded fraction ``train_val_split`` of the training data becomes the validation split.
    """

    training_source_required: ClassVar[bool] = True
    """False in :class:`EvaluationDataArguments`: validation data alone will do."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A Hugging Face dataset (hub name or local dataset directory) or a builtin dataset "
            "written '<package>:<name>' (builtin: sklearn:digits)."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration (subset) of dataset_name, if it has several."}
    )
    train_dir: str | None = field(
        default=None,
        metadata={"help": "Image folder for training, one subfolder per class (train_dir/<class>/<image>)."},
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "Image folder for validation, same class subfolders as train_dir."}
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "Parquet or arrow file(s) for training: a path or a glob such as 'data/train-*.parquet'."},
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Parquet or arrow file(s) for validation: a path or a glob."}
    )
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images (an Image feature)."})
    label_column_name: str = field(
        default="label", metadata={"help": "Column holding the labels (a ClassLabel or integer ids 0..C-1)."}
    )
    train_split: str = field(default="train", metadata={"help": "Split of dataset_name used for training."})
    validation_split: str | None = field(
        default=None,
        metadata={
            "help": "Split of dataset_name used for validation. Default: 'validation' or 'test' if present, "
            "else a fraction train_val_split of the training split is carved off."
        },
    )
    train_val_split: float = field(
        default=0.15,
        metadata={
            "help": "Fraction of the training data carved off (stratified, seeded) when there is no validation data."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Keep a seeded random subset of this many training examples (for quick runs)."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep a seeded random subset of this many validation examples."}
    )
    image_size: int = field(default=32, metadata={"help": "Side S of the square training crop (and of the eval crop)."})
    eval_image_size: int | None = field(
        default=None,
        metadata={
            "help": "Side of the eval centre crop when it differs from image_size (the released ImageNet "
            "ST++ recipe trains at 200 and tests at 224). Default: image_size."
        },
    )
    eval_resize: int | None = field(
        default=None,
        metadata={
            "help": "Shorter side the images are resized to before the centre crop at evaluation. "
            "Default: image_size for 'cifar' and 'none', round(image_size / 0.875) for 'imagenet'."
        },
    )
    augmentation: str = field(
        default="cifar",
        metadata={
            "help": "Preset: 'cifar' (pad + random crop + flip), 'imagenet' (random resized crop + flip + "
            "colour jitter; resize + centre crop at eval) or 'none' (resize + centre crop)."
        },
    )
    image_mean: str | None = field(
        default=None,
        metadata={
            "help": "Normalisation mean, 3 comma-separated floats. Default: CIFAR's for 'cifar', else ImageNet's."
        },
    )
    image_std: str | None = field(
        default=None,
        metadata={
            "help": "Normalisation std, 3 comma-separated floats. Default: CIFAR's for 'cifar', else ImageNet's."
        },
    )
    dataset_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache directory of the datasets library (default: HF_DATASETS_CACHE)."},
    )
    image_pipeline: str = field(
        default="pil",
        metadata={
            "help": "'pil': decode and augment every image in the DataLoader workers each epoch (any preset, any "
            "image size). 'predecoded': decode once into a cached uint8 column, then crop, flip and normalise "
            "on the training device in batch (presets 'cifar' and 'none'; keeps a GPU fed on small images). "
            "'device_color': decode and crop in the workers as 'pil' does, then colour jitter and normalise on "
            "the training device in batch (any preset; for ImageNet-style images, where the workers are the limit)."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "Processes for the one-off decoding of image_pipeline='predecoded' (default: one)."},
    )

    def __post_init__(self) -> None:
        for name in (
            "dataset_name",
            "dataset_config_name",
            "train_dir",
            "validation_dir",
            "train_file",
            "validation_file",
            "validation_split",
            "image_mean",
            "image_std",
            "dataset_cache_dir",
        ):
            value = getattr(self, name)
            if isinstance(value, str) and not value.strip():
                setattr(self, name, None)
        self._check_sources()
        self._check_values()
        self._check_paths()

    # -- validation -------------------------------------------------------------------------------

    def _check_sources(self) -> None:
        sources = [name for name in ("dataset_name", "train_dir", "train_file") if getattr(self, name) is not None]
        if not sources and not self.training_source_required:
            self._check_evaluation_source()
            return
        if len(sources) != 1:
            given = "none was given" if not sources else f"got {' and '.join(sources)}"
            raise ConfigError(
                f"exactly one data source is needed, {given}; set one of dataset_name (a Hugging Face "
                "dataset or a builtin one such as sklearn:digits), train_dir (an image folder with one "
                "subfolder per class) or train_file (parquet or arrow files)"
            )
        if self.validation_dir is not None and self.train_dir is None:
            raise ConfigError(
                "validation_dir is set but train_dir is not; set train_dir to the training image folder "
                "(validation_dir only goes with train_dir)"
            )
        if self.validation_file is not None and self.train_file is None:
            raise ConfigError(
                "validation_file is set but train_file is not; set train_file to the training files "
                "(validation_file only goes with train_file)"
            )
        if self.dataset_name is None:
            for name, value in (
                ("dataset_config_name", self.dataset_config_name),
                ("validation_split", self.validation_split),
            ):
                if value is not None:
                    raise ConfigError(
                        f"{name} only applies to dataset_name; unset it, or use validation_dir / "
                        "validation_file to give validation data with train_dir / train_file"
                    )
            if self.train_split != "train":
                raise ConfigError(
                    f"train_split='{self.train_split}' only applies to dataset_name; unset it when loading "
                    "train_dir / train_file"
                )
        elif is_builtin_dataset_name(self.dataset_name):
            check_builtin_dataset_name(self.dataset_name)
            if self.dataset_config_name is not None:
                raise ConfigError(
                    f"builtin dataset '{self.dataset_name}' has no configurations; unset dataset_config_name"
                )
        if self.validation_split is not None and self.validation_split == self.train_split:
            raise ConfigError(
                f"validation_split and train_split are both '{self.train_split}'; pick another validation "
                "split, or unset validation_split to carve one off the training data"
            )

    def _check_evaluation_source(self) -> None:
        given = [name for name in ("validation_file", "validation_dir") if getattr(self, name) is not None]
        if len(given) != 1:
            problem = "no data was given" if not given else "validation_file and validation_dir are both set"
            raise ConfigError(
                f"{problem}; give the images to evaluate with validation_file (parquet or arrow files) or "
                "validation_dir (an image folder), or the training data set (dataset_name, train_dir or train_file)"
            )
        for name in ("dataset_config_name", "validation_split"):
            if getattr(self, name) is not None:
                raise ConfigError(f"{name} only applies to dataset_name; unset it")

    @property
    def has_training_source(self) -> bool:
        """Whether a training source is set (``dataset_name``, ``train_dir`` or ``train_file``)."""
        return any(getattr(self, name) is not None for name in ("dataset_name", "train_dir", "train_file"))

    def _check_values(self) -> None:
        if self.image_column_name == self.label_column_name:
            raise ConfigError(
                f"image_column_name and label_column_name are both '{self.image_column_name}'; "
                "they must name two different columns"
            )
        if not 0.0 < self.train_val_split < 1.0:
            raise ConfigError(
                f"train_val_split={self.train_val_split} must be a fraction strictly between 0 and 1 (e.g. 0.1)"
            )
        if self.image_size < 8:
            raise ConfigError(f"image_size={self.image_size} is too small; use at least 8 (e.g. 32 for CIFAR)")
        if self.eval_image_size is not None and self.eval_image_size < 8:
            raise ConfigError(f"eval_image_size={self.eval_image_size} is too small; use at least 8 or unset it")
        if self.eval_resize is not None and self.eval_resize < self.resolved_eval_image_size():
            raise ConfigError(
                f"eval_resize={self.eval_resize} is smaller than the eval crop ({self.resolved_eval_image_size()}), "
                "so the centre crop would pad the image; set eval_resize >= eval_image_size or unset it"
            )
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} must be at least 1; unset it to use all the examples")
        augmentation = str(self.augmentation).strip().lower()
        if augmentation not in AUGMENTATIONS:
            raise ConfigError(
                f"augmentation='{self.augmentation}' is not a known preset; use one of {', '.join(AUGMENTATIONS)}"
            )
        self.augmentation = augmentation
        pipeline = str(self.image_pipeline).strip().lower()
        if pipeline not in IMAGE_PIPELINES:
            raise ConfigError(
                f"image_pipeline='{self.image_pipeline}' is not known; use one of {', '.join(IMAGE_PIPELINES)}"
            )
        self.image_pipeline = pipeline
        if pipeline == "predecoded":
            check_predecoded_augmentation(augmentation)
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            raise ConfigError(
                f"preprocessing_num_workers={self.preprocessing_num_workers} must be at least 1; unset it for one"
            )
        self.normalization()  # parses image_mean / image_std, raising ConfigError if malformed

    def _check_paths(self) -> None:
        for name in ("train_dir", "validation_dir"):
            path = getattr(self, name)
            if path is None:
                continue
            if not os.path.exists(os.path.expanduser(path)):
                raise DataError(
                    f"{name} '{path}' does not exist; check the path (relative paths are resolved from the "
                    f"current directory, {os.getcwd()})"
                )
            if not os.path.isdir(os.path.expanduser(path)):
                raise DataError(
                    f"{name} '{path}' is not a directory; give an image folder with one subfolder per class, "
                    "or use train_file / validation_file for parquet or arrow files"
                )
        for name in ("train_file", "validation_file"):
            if getattr(self, name) is not None:
                resolve_data_files(getattr(self, name), name)

    # -- derived values ---------------------------------------------------------------------------

    def normalization(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """The (mean, std) used by ``Normalize``: ``image_mean`` / ``image_std`` or the preset's defaults."""
        default_mean, default_std = (
            (CIFAR_MEAN, CIFAR_STD) if self.augmentation == "cifar" else (IMAGENET_MEAN, IMAGENET_STD)
        )
        mean = _parse_triple(self.image_mean, "image_mean") if self.image_mean is not None else default_mean
        std = _parse_triple(self.image_std, "image_std") if self.image_std is not None else default_std
        if any(s <= 0 for s in std):
            raise ConfigError(f"image_std='{self.image_std}' must be positive in every channel")
        return mean, std

    def crop_padding(self) -> int:
        """Zero padding on each side before the ``cifar`` preset's random crop: ``image_size // 8`` (4 at 32 px)."""
        return self.image_size // 8

    def resolved_eval_image_size(self) -> int:
        """Side of the eval centre crop (``eval_image_size``, else ``image_size``)."""
        return self.eval_image_size if self.eval_image_size is not None else self.image_size

    def resolved_eval_resize(self) -> int:
        """Shorter side of the images before the eval centre crop (``eval_resize`` or the preset's)."""
        if self.eval_resize is not None:
            return self.eval_resize
        if self.augmentation == "imagenet":
            return round(self.resolved_eval_image_size() / 0.875)
        return self.resolved_eval_image_size()


@dataclass
class EvaluationDataArguments(DataArguments):
    """:class:`DataArguments` of the commands that evaluate saved models (``stim-hf loafing``, ``export``).

    The same fields, but a training source is optional: ``validation_file`` or ``validation_dir``
    alone gives the images to evaluate. Training images are needed only to re-estimate BatchNorm
    statistics, or to carve a validation split off them.
    """

    training_source_required: ClassVar[bool] = False


def check_predecoded_augmentation(augmentation: str) -> None:
    """Refuse augmentation presets the pre-decoded pipeline cannot run, naming the fix."""
    if augmentation not in PREDECODED_AUGMENTATIONS:
        raise ConfigError(
            f"image_pipeline='predecoded' runs the augmentation presets {', '.join(PREDECODED_AUGMENTATIONS)} "
            f"(fixed-size images, crops and flips on the device), not '{augmentation}'; use image_pipeline: pil "
            "for ImageNet-style random resized crops"
        )


def _parse_triple(text: str, name: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(part) for part in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ConfigError(
            f"{name}='{text}' must be 3 comma-separated numbers, one per RGB channel (e.g. "
            "'0.485,0.456,0.406'); unset it to use the preset's values"
        )
    return values  # type: ignore[return-value]


def resolve_data_files(pattern: str, arg_name: str = "train_file") -> tuple[str, list[str]]:
    """Resolve a ``train_file`` / ``validation_file`` value to (builder name, sorted absolute paths).

    Accepts one path or a glob (``**`` allowed); all files must be ``.parquet`` or all ``.arrow``.
    Raises :class:`DataError` for a missing path or an empty glob, :class:`ConfigError` for other
    file types, so that a typo is reported at parse time rather than deep inside ``datasets``.
    """
    where = f"relative paths are resolved from the current directory, {os.getcwd()}"
    path = os.path.expanduser(pattern)
    if glob.has_magic(path):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"{arg_name} pattern '{pattern}' matches no file; check the pattern ({where})")
    elif not os.path.exists(path):
        raise DataError(f"{arg_name} '{pattern}' does not exist; check the path ({where})")
    elif os.path.isdir(path):
        raise DataError(
            f"{arg_name} '{pattern}' is a directory; give a .parquet / .arrow file or a glob such as "
            f"'{os.path.join(pattern, '*.parquet')}' (image folders go in train_dir / validation_dir)"
        )
    else:
        files = [path]
    suffixes = sorted({Path(f).suffix.lower() for f in files})
    unsupported = [s or "(no extension)" for s in suffixes if s not in _FILE_BUILDERS]
    if unsupported:
        raise ConfigError(
            f"{arg_name} '{pattern}' includes files of type {', '.join(unsupported)}; give .parquet or "
            ".arrow files (image folders go in train_dir / validation_dir)"
        )
    if len(suffixes) > 1:
        raise ConfigError(f"{arg_name} '{pattern}' mixes {' and '.join(suffixes)} files; give files of one type")
    return _FILE_BUILDERS[suffixes[0]], [os.path.abspath(f) for f in files]


# -- loading ----------------------------------------------------------------------------------------


def load_image_datasets(data_args: DataArguments, seed: int) -> datasets.DatasetDict:
    """Load the configured source as a ``DatasetDict`` with a "train" and a "validation" split.

    (With evaluation data only, :class:`EvaluationDataArguments`, the "validation" split alone.)

    Checks that the image and label columns exist and that every label is a valid class id, casts
    integer labels to a ``ClassLabel`` (names "0".."C-1") so both splits share one label map, adds
    :data:`ROW_INDEX_COLUMN`, carves a stratified validation split off the training data when there
    is none (seeded by ``seed``), then keeps seeded random subsets of ``max_train_samples`` /
    ``max_eval_samples`` examples. Column names are kept as configured. Raises :class:`DataError`
    naming the split, row or column at fault.
    """
    train, validation = _load_source(data_args)
    image_column, label_column = data_args.image_column_name, data_args.label_column_name
    if train is None:  # evaluation data only (EvaluationDataArguments)
        return datasets.DatasetDict({"validation": _load_validation_only(validation, data_args, seed)})
    train_what = "training data"
    _check_split(train, data_args, train_what)
    names = get_label_names(train, label_column)
    train = _as_class_label(train, label_column, names, train_what)
    train = _add_row_index(train)
    if validation is not None:
        _check_split(validation, data_args, "validation data")
        validation = _as_class_label(validation, label_column, names, "validation data")
        validation = _add_row_index(validation)
    else:
        train, validation = _carve_validation(train, data_args.train_val_split, label_column, seed)
    train = _random_subset(train, data_args.max_train_samples, seed)
    validation = _random_subset(validation, data_args.max_eval_samples, seed)
    logger.info(
        "loaded %d training and %d validation images, %d classes (image column '%s', label column '%s')",
        len(train),
        len(validation),
        len(names),
        image_column,
        label_column,
    )
    return datasets.DatasetDict({"train": train, "validation": validation})


def _load_validation_only(validation: datasets.Dataset, data_args: DataArguments, seed: int) -> datasets.Dataset:
    what = "validation data"
    _check_split(validation, data_args, what)
    names = get_label_names(validation, data_args.label_column_name)
    validation = _add_row_index(_as_class_label(validation, data_args.label_column_name, names, what))
    validation = _random_subset(validation, data_args.max_eval_samples, seed)
    logger.info("loaded %d validation images, %d classes (no training data)", len(validation), len(names))
    return validation


def get_label_names(dataset: datasets.Dataset, label_column: str) -> list[str]:
    """Class names of ``dataset``'s label column, in class-id order (used for ``id2label``).

    A ``ClassLabel`` gives its names. Integer labels give the sorted ids as strings, and must then
    be exactly 0..C-1 (else :class:`DataError`, asking to cast the column to a ``ClassLabel``); any
    other type is a :class:`DataError` too.
    """
    feature = dataset.features.get(label_column)
    if feature is None:
        raise DataError(
            f"label column '{label_column}' not found (columns: {', '.join(dataset.column_names)}); "
            "set label_column_name to one of them"
        )
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if not _is_integer_feature(feature):
        raise _label_type_error(label_column, feature)
    values = _label_values(dataset, label_column, "dataset")
    if values.size == 0:
        raise DataError(f"cannot infer the classes of an empty dataset (label column '{label_column}')")
    negative = np.flatnonzero(values < 0)
    if negative.size:
        row = int(negative[0])
        raise DataError(
            f"label {int(values[row])} in row {row} (column '{label_column}') is negative; class ids must be "
            "0..C-1: drop unlabelled rows (-1 usually marks them) or cast the column to a ClassLabel"
        )
    ids = np.unique(values)
    if int(ids[-1]) != len(ids) - 1:
        missing = sorted(set(range(int(ids[-1]) + 1)) - {int(i) for i in ids})
        raise DataError(
            f"label column '{label_column}' holds integer ids that are not 0..C-1 ({len(ids)} distinct ids "
            f"up to {int(ids[-1])}, missing {_preview(missing)}); cast the column to a ClassLabel with one "
            "name per class (datasets.ClassLabel(names=[...]), or dataset.class_encode_column) and save the "
            "data again"
        )
    return [str(int(i)) for i in ids]


def _load_source(data_args: DataArguments) -> tuple[datasets.Dataset | None, datasets.Dataset | None]:
    cache_dir = data_args.dataset_cache_dir
    if data_args.dataset_name is not None:
        name = data_args.dataset_name
        if is_builtin_dataset_name(name):
            splits = load_builtin_dataset(name)
        else:
            try:
                splits = datasets.load_dataset(name, data_args.dataset_config_name, cache_dir=cache_dir)
            except (FileNotFoundError, ConnectionError, ValueError) as error:
                raise DataError(
                    f"cannot load dataset '{name}': {error}; check dataset_name / dataset_config_name, and "
                    "when offline (HF_DATASETS_OFFLINE=1) make sure the dataset is in the datasets cache"
                ) from error
        return _pick_splits(splits, data_args)
    if not data_args.has_training_source:
        if data_args.validation_file is not None:
            return None, _load_files(data_args.validation_file, "validation_file", cache_dir)
        folder = os.path.join(os.path.abspath(os.path.expanduser(data_args.validation_dir)), "**")
        try:
            return None, datasets.load_dataset(
                "imagefolder", data_files={"validation": folder}, split="validation", cache_dir=cache_dir
            )
        except (FileNotFoundError, ValueError) as error:
            raise DataError(
                f"cannot load the image folder validation_dir '{data_args.validation_dir}' ({type(error).__name__}: "
                f"{error}); put the image files in one subfolder per class (<dir>/<class name>/<image file>)"
            ) from error
    if data_args.train_dir is not None:
        data_files = {"train": os.path.join(os.path.abspath(os.path.expanduser(data_args.train_dir)), "**")}
        if data_args.validation_dir is not None:
            val_dir = os.path.abspath(os.path.expanduser(data_args.validation_dir))
            data_files["validation"] = os.path.join(val_dir, "**")
        try:
            # one call for both folders, so that both splits get the same class names
            splits = datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)
        except (FileNotFoundError, ValueError) as error:
            folders = f"train_dir '{data_args.train_dir}'" + (
                f" / validation_dir '{data_args.validation_dir}'" if data_args.validation_dir else ""
            )
            raise DataError(
                f"cannot load the image folder {folders} ({type(error).__name__}: {error}); put the image "
                "files in one subfolder per class (<dir>/<class name>/<image file>)"
            ) from error
        return splits["train"], splits.get("validation")
    train = _load_files(data_args.train_file, "train_file", cache_dir)
    validation = None
    if data_args.validation_file is not None:
        validation = _load_files(data_args.validation_file, "validation_file", cache_dir)
    return train, validation


def _load_files(pattern: str, arg_name: str, cache_dir: str | None) -> datasets.Dataset:
    builder, files = resolve_data_files(pattern, arg_name)
    try:
        return datasets.load_dataset(builder, data_files={"train": files}, split="train", cache_dir=cache_dir)
    except ValueError as error:
        if "corresponds to no data" not in str(error):  # what datasets says for files without rows
            raise _file_read_error(arg_name, pattern, builder, error) from error
        split = "training" if arg_name == "train_file" else "validation"
        raise DataError(
            f"the {split} split is empty: {arg_name} '{pattern}' holds no rows; give files with examples"
        ) from error
    except (datasets.exceptions.DatasetGenerationError, OSError) as error:
        raise _file_read_error(arg_name, pattern, builder, error) from error


def _file_read_error(arg_name: str, pattern: str, builder: str, error: Exception) -> DataError:
    return DataError(
        f"cannot read {arg_name} '{pattern}' as {builder} ({error}); check that the files are valid "
        f"{builder} files with the same columns"
    )


def _pick_splits(
    splits: datasets.DatasetDict, data_args: DataArguments
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    available = list(splits)
    source = f"dataset '{data_args.dataset_name}'"
    if data_args.train_split not in splits:
        raise DataError(
            f"split '{data_args.train_split}' not found in {source} (splits: {', '.join(available)}); "
            "set train_split to one of them"
        )
    if data_args.validation_split is not None:
        if data_args.validation_split not in splits:
            raise DataError(
                f"split '{data_args.validation_split}' not found in {source} (splits: "
                f"{', '.join(available)}); set validation_split to one of them, or unset it to carve one off "
                "the training split"
            )
        return splits[data_args.train_split], splits[data_args.validation_split]
    for candidate in ("validation", "test"):
        if candidate in splits and candidate != data_args.train_split:
            logger.info("using split '%s' of %s for validation", candidate, source)
            return splits[data_args.train_split], splits[candidate]
    return splits[data_args.train_split], None


def _check_split(dataset: datasets.Dataset, data_args: DataArguments, what: str) -> None:
    """Raise DataError if ``dataset`` is empty or lacks the configured image / label columns."""
    if len(dataset) == 0:
        raise DataError(f"the {what.split()[0]} split is empty; check the data source (files, folder or split name)")
    columns = ", ".join(dataset.column_names)
    for arg, kind, column in (
        ("image_column_name", "image", data_args.image_column_name),
        ("label_column_name", "label", data_args.label_column_name),
    ):
        if column not in dataset.features:
            if data_args.train_dir is not None and kind == "label":
                raise DataError(
                    f"the image folder of the {what} gave no '{column}' column (columns: {columns}): "
                    "imagefolder takes the labels from the subfolder names and needs at least two class "
                    "subfolders; put the images in <dir>/<class name>/<image file>"
                )
            raise DataError(
                f"{kind} column '{column}' not found in the {what} (columns: {columns}); set {arg} to one of them"
            )
    feature = dataset.features[data_args.image_column_name]
    if not isinstance(feature, datasets.Image):
        raise DataError(
            f"image column '{data_args.image_column_name}' of the {what} holds {feature!r}, not images; "
            f"set image_column_name to a column of type Image (columns: {columns})"
        )


def _as_class_label(dataset: datasets.Dataset, column: str, names: list[str], what: str) -> datasets.Dataset:
    """Check every label of ``dataset`` is a class id of ``names``; cast integer labels to that ClassLabel."""
    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        if list(feature.names) != names:
            raise DataError(
                f"the class names of the {what} ({_preview(feature.names)}) differ from those of the "
                f"training data ({_preview(names)}); store both with the same ClassLabel names in the same "
                "order"
            )
    elif not _is_integer_feature(feature):
        raise _label_type_error(column, feature)
    values = _label_values(dataset, column, what)
    bad = np.flatnonzero((values < 0) | (values >= len(names)))
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"label {int(values[row])} in row {row} of the {what} (column '{column}') is not one of the "
            f"{len(names)} class ids 0..{len(names) - 1}; fix or drop that row (-1 usually marks unlabelled "
            "rows, as in many hub test splits: then use a labelled split for validation)"
        )
    if not isinstance(feature, datasets.ClassLabel):
        # not `cast_column`: for a ClassLabel it rewrites the whole table, images included, through `map`;
        # replacing the one column is a metadata-level operation (the new column lives in memory)
        label_feature = datasets.ClassLabel(names=names)
        dataset = dataset.remove_columns([column]).add_column(column, values, feature=label_feature)
    return dataset


def _label_values(dataset: datasets.Dataset, column: str, what: str) -> np.ndarray:
    # read through arrow: `np.asarray(dataset[column])` iterates the lazy Column row by row in datasets 4+
    array = dataset.with_format("arrow", columns=[column])[:].column(column)
    if array.null_count:
        row = int(np.flatnonzero(array.is_null().to_numpy())[0])
        raise DataError(
            f"row {row} of the {what} has no label (null in column '{column}'); drop unlabelled rows or fill "
            "in their labels"
        )
    return np.asarray(array.to_numpy())


def _add_row_index(dataset: datasets.Dataset) -> datasets.Dataset:
    if ROW_INDEX_COLUMN in dataset.column_names:
        return dataset
    return dataset.add_column(ROW_INDEX_COLUMN, np.arange(len(dataset), dtype=np.int64))


def _carve_validation(
    train: datasets.Dataset, fraction: float, label_column: str, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``fraction`` of ``train`` off as validation: stratified by label if possible, seeded."""
    from sklearn.model_selection import train_test_split

    labels = _label_values(train, label_column, "training data")
    indices = np.arange(len(train))
    try:
        kept, carved = train_test_split(
            indices, test_size=fraction, random_state=np.random.RandomState(seed % 2**32), stratify=labels
        )
    except ValueError as error:
        logger.warning("cannot stratify the validation split (%s); carving a random one instead", error)
        try:
            kept, carved = train_test_split(
                indices, test_size=fraction, random_state=np.random.RandomState(seed % 2**32)
            )
        except ValueError as error2:
            raise DataError(
                f"cannot carve a validation split of {fraction} off {len(train)} training examples "
                f"({error2}); give validation data (validation_dir, validation_file or validation_split) or "
                "more training data"
            ) from error2
    return train.select(np.sort(kept)), train.select(np.sort(carved))


def _random_subset(dataset: datasets.Dataset, count: int | None, seed: int) -> datasets.Dataset:
    """The first ``count`` examples of a seeded permutation, kept in dataset order (contiguous reads)."""
    if count is None or count >= len(dataset):
        return dataset
    chosen = np.random.default_rng(seed).permutation(len(dataset))[:count]
    return dataset.select(np.sort(chosen))


def _is_integer_feature(feature: object) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in _INTEGER_DTYPES


def _label_type_error(column: str, feature: object) -> DataError:
    return DataError(
        f"label column '{column}' has type {feature!r}; labels must be a ClassLabel or integer class ids "
        f"0..C-1: cast the column to a ClassLabel (e.g. dataset = dataset.class_encode_column('{column}')) "
        "and save the data again, or set label_column_name to another column"
    )


def _preview(items: list, limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in list(items)[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")
