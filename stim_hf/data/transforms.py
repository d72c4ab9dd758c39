"""Image transforms (torchvision ``transforms.v2`` presets), lazy dataset transforms and collation.

:func:`build_transforms` maps one PIL image to a normalised float tensor (C, H, W);
:func:`with_image_transforms` applies it on the fly to a ``datasets.Dataset`` (decoding the images
itself, so that a corrupt file is reported as a :class:`DataError` naming its row and path);
:func:`collate_image_batch` stacks examples into the batch the Trainer feeds the model.

Everything here is a module-level class or function, so datasets carrying these transforms pickle
into DataLoader worker processes (``dataloader_num_workers > 0``, any start method).
With on-the-fly transforms the Trainer must keep unused columns (``remove_unused_columns=False``).
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Any

import datasets
import PIL.Image
import torch
from torchvision.transforms import v2
from transformers import BitImageProcessor

from stim_hf.data.image_datasets import ROW_INDEX_COLUMN
from stim_hf.errors import DataError

try:  # optional (extra "fast-decode"); a build for another torch fails to load: PIL decodes then
    from torchcodec.decoders import decode_image as _torchcodec_decode
except Exception:  # noqa: BLE001
    _torchcodec_decode = None

if TYPE_CHECKING:
    from collections.abc import Callable

    from stim_hf.data.image_datasets import DataArguments

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)


class CenterCrop:
    """A centre crop of ``size`` x ``size`` placed as transformers' image processors place it.

    The offsets round down (torchvision's ``CenterCrop`` rounds half to even, one pixel apart when
    the excess is 3, 7, 11, ... pixels), so the image processor saved beside every model
    (:func:`build_image_processor`) sees exactly the pixels the evaluation saw. The image is at
    least ``size`` on both sides (``eval_resize`` >= the crop, checked by the data arguments).
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Crop the (..., H, W) image (or tensor) to its centre ``size`` x ``size``."""
        height, width = image.shape[-2:]
        return v2.functional.crop(image, (height - self.size) // 2, (width - self.size) // 2, self.size, self.size)

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size}, offsets rounded down)"


def eval_resize_and_crop(data_args: DataArguments, input_size: int | None = None) -> tuple[int, int]:
    """(shorter side after the resize, side of the centre crop) of evaluation, at ``input_size`` if given.

    By default the configured ``eval_resize`` and ``eval_image_size`` (or their presets). At another
    ``input_size`` the crop is that size and the resize scales with it, so the crop keeps the same
    share of the image: 256 / 224 at 224 becomes 183 / 160 at 160.
    """
    resize, crop = data_args.resolved_eval_resize(), data_args.resolved_eval_image_size()
    if input_size is None or input_size == crop:
        return resize, crop
    return max(input_size, round(resize * input_size / crop)), input_size


def build_transforms(data_args: DataArguments, train: bool, input_size: int | None = None) -> v2.Compose:
    """The preset transform for one PIL image -> float32 tensor (3, S, S), S = ``image_size``.

    Every preset converts the image to RGB (grayscale, CMYK, RGBA, palette...) and ends with
    ``ToDtype(float32, scale=True)`` + ``Normalize(mean, std)``. Geometric steps:

    - ``cifar``: train ``Resize(S)`` (a no-op when the shorter side is already S) +
      ``RandomCrop(S, padding=S // 8)`` + ``RandomHorizontalFlip``; eval ``Resize(eval_resize)``
      (a no-op at the image's size) + :class:`CenterCrop` ``(S)``.
    - ``imagenet``: train ``RandomResizedCrop(S)`` + ``RandomHorizontalFlip`` +
      ``ColorJitter(0.4, 0.4, 0.4)``; eval ``Resize(eval_resize)`` + ``CenterCrop(S)``.
    - ``none``: ``Resize(eval_resize)`` + ``CenterCrop(S)`` for train and eval alike.

    (:class:`CenterCrop` places the crop as transformers' image processors do.)

    At evaluation the crop is ``eval_image_size`` when set (train at 200, test at 224), or
    ``input_size`` with a resize scaled to it (:func:`eval_resize_and_crop`).
    """
    size = data_args.image_size
    resize, eval_crop = eval_resize_and_crop(data_args, None if train else input_size)
    mean, std = data_args.normalization()
    if data_args.augmentation == "cifar" and train:
        geometry = [
            v2.Resize(size, antialias=True),
            v2.RandomCrop(size, padding=data_args.crop_padding()),
            v2.RandomHorizontalFlip(),
        ]
    elif data_args.augmentation == "imagenet" and train:
        geometry = [
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
        ]
    else:
        crop = size if train else eval_crop
        geometry = [v2.Resize(resize, antialias=True), CenterCrop(crop)]
    return v2.Compose(
        [
            v2.RGB(),
            v2.ToImage(),
            *geometry,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
            v2.ToPureTensor(),
        ]
    )


def build_image_processor(data_args: DataArguments, input_size: int | None = None) -> BitImageProcessor:
    """A transformers image processor doing what evaluation does: RGB, resize, centre crop, normalise.

    A ``BitImageProcessor`` (``AutoImageProcessor`` loads it from ``preprocessor_config.json``):
    the shorter side resized to ``eval_resize`` (bilinear, antialiased, as torchvision's ``Resize``
    on the decoded image), a centre crop of ``eval_image_size`` (at ``input_size`` if given, see
    :func:`eval_resize_and_crop`), scaled to [0, 1] and normalised with the data's mean and std.
    Saved beside a model, it lets ``pipeline("image-classification", model=DIR)`` preprocess images
    as the evaluation did.
    """
    resize, crop = eval_resize_and_crop(data_args, input_size)
    mean, std = data_args.normalization()
    return BitImageProcessor(
        do_convert_rgb=True,
        do_resize=True,
        size={"shortest_edge": resize},
        resample=PIL.Image.Resampling.BILINEAR,
        do_center_crop=True,
        crop_size={"height": crop, "width": crop},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
    )


def decode_image(value: Any, row: int | None = None) -> PIL.Image.Image:
    """Decode a stored image (``{"bytes", "path"}`` dict, path or PIL image) the way ``datasets.Image`` does.

    A corrupt, truncated or unreadable image raises :class:`DataError` naming the row (when
    known) and the file, instead of a PIL traceback from deep inside a DataLoader worker.
    """
    try:
        return datasets.Image().decode_example(value)
    except _DECODE_ERRORS as error:
        path = _stored_path(value)
        where = f"row {row} of its source split" if row is not None else "an example"
        file = f" (file '{path}')" if path else ""
        raise DataError(
            f"cannot decode the image of {where}{file}: {type(error).__name__}: {error}; the file is "
            "corrupt, truncated or not an image: replace or delete it (or drop the row) and run again"
        ) from error


# Formats and PIL modes for which TorchCodec's decoding to RGB gives datasets' decoding + ``v2.RGB()``
# pixel for pixel, EXIF orientation included for JPEG (tests/test_data.py checks each; a 16-bit PNG,
# for one, differs, and BMP it does not read).
_TORCHCODEC_DECODES = {"JPEG": ("RGB", "L", "CMYK"), "PNG": ("RGB", "RGBA", "L", "LA", "P")}
_ORIENTATION = 0x0112


def decode_rgb(value: Any, row: int | None = None) -> torch.Tensor | PIL.Image.Image:
    """A stored image as the presets see it after ``v2.RGB()``; a uint8 (3, H, W) tensor where TorchCodec decodes it.

    With TorchCodec installed (``pip install "stim_hf[fast-decode]"``), JPEG and PNG images in the
    modes of ``_TORCHCODEC_DECODES`` are decoded by it: the same pixels as :func:`decode_image`
    followed by ``v2.RGB()``, in less time (docs/benchmarks.md, data pipeline). PIL reads the header first, so
    its decompression-bomb check still applies. Anything else (other formats or modes, a PNG with an
    EXIF orientation, a path that is not local, a file TorchCodec refuses) goes through
    :func:`decode_image`, which names a corrupt file in a :class:`DataError`.
    """
    data = _local_bytes(value) if _torchcodec_decode is not None else None
    if data is not None:
        try:
            with PIL.Image.open(io.BytesIO(data)) as header:  # reads the header only
                oriented = header.getexif().get(_ORIENTATION) not in (None, 1)
                fast = header.mode in _TORCHCODEC_DECODES.get(header.format, ()) and not (
                    oriented and header.format != "JPEG"
                )
        except _DECODE_ERRORS:
            fast = False  # decode_image reports it
        if fast:
            try:
                return _torchcodec_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB")
            except (RuntimeError, ValueError):
                pass  # decode_image decides, and names the file if it is corrupt
        # The bytes already read, so that a local file is not read a second time; the path names it in errors.
        value = {"bytes": data, "path": _stored_path(value)}
    return decode_image(value, row)


def _stored_path(value: Any) -> str | None:
    """The path of a stored image (``{"bytes", "path"}`` dict or path), if it has one."""
    return value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None


def _local_bytes(value: Any) -> bytes | None:
    """The encoded bytes of a stored image held in memory or in a local file; None otherwise."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return value["bytes"]
    path = _stored_path(value)
    if path is not None and os.path.isfile(path):
        with open(path, "rb") as handle:
            return handle.read()
    return None


class BatchImageTransform:
    """Batched ``datasets`` transform: decodes + transforms images, returns ``pixel_values`` and ``labels``.

    A plain class (not a closure or lambda) so that it pickles into DataLoader workers.
    ``per_image`` (a batch key and a function of no arguments) adds, for every image, a value
    drawn right after that image's transform, e.g. augmentation parameters left for the device.
    """

    def __init__(
        self,
        transform: Callable[[PIL.Image.Image], torch.Tensor],
        image_column: str,
        label_column: str,
        per_image: tuple[str, Callable[[], torch.Tensor]] | None = None,
    ):
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.per_image = per_image

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        """Map a batch of raw rows to ``{"pixel_values": [tensor, ...], "labels": [int, ...]}`` (+ ``per_image``)."""
        rows = batch.get(ROW_INDEX_COLUMN)
        pixel_values, drawn = [], []
        for i, value in enumerate(batch[self.image_column]):
            pixel_values.append(self.transform(decode_rgb(value, None if rows is None else int(rows[i]))))
            if self.per_image is not None:
                drawn.append(self.per_image[1]())
        out = {"pixel_values": pixel_values, "labels": [int(label) for label in batch[self.label_column]]}
        if self.per_image is not None:
            out[self.per_image[0]] = drawn
        return out


def undecoded_images(dataset: datasets.Dataset, data_args: DataArguments) -> datasets.Dataset:
    """``dataset`` with its image and label columns checked and the image column cast to ``Image(decode=False)``.

    Both pipelines decode the images themselves (:func:`decode_image`), so that an undecodable
    file raises a :class:`DataError` naming it. A missing column, or an image column that holds
    no images, is a :class:`DataError` naming the argument to set.
    """
    image_column, label_column = data_args.image_column_name, data_args.label_column_name
    columns = ", ".join(dataset.column_names)
    for arg, kind, column in (
        ("image_column_name", "image", image_column),
        ("label_column_name", "label", label_column),
    ):
        if column not in dataset.column_names:
            raise DataError(f"{kind} column '{column}' not found (columns: {columns}); set {arg} to one of them")
    feature = dataset.features[image_column]
    if not isinstance(feature, datasets.Image):
        raise DataError(
            f"image column '{image_column}' holds {feature!r}, not images; set image_column_name to a column "
            f"of type Image (columns: {columns})"
        )
    if feature.decode:
        dataset = dataset.cast_column(image_column, datasets.Image(mode=feature.mode, decode=False))
    return dataset


def with_image_transforms(
    dataset: datasets.Dataset, data_args: DataArguments, train: bool, input_size: int | None = None
) -> datasets.Dataset:
    """A view of ``dataset`` whose rows are ``{"pixel_values": tensor, "labels": int}``, built on access.

    Uses ``dataset.with_transform`` with :func:`build_transforms`'s preset (training augmentation
    when ``train``; evaluation at ``input_size`` if given); images are decoded by
    :func:`decode_image` (the image column is cast to ``Image(decode=False)``) so undecodable files
    raise a :class:`DataError` naming them. The Trainer needs ``remove_unused_columns=False`` for this.
    """
    transform = BatchImageTransform(
        build_transforms(data_args, train, input_size), data_args.image_column_name, data_args.label_column_name
    )
    return with_batch_image_transform(dataset, data_args, transform)


def with_batch_image_transform(
    dataset: datasets.Dataset, data_args: DataArguments, transform: BatchImageTransform
) -> datasets.Dataset:
    """``dataset`` (image column checked and left undecoded) viewed through ``transform`` on access."""
    dataset = undecoded_images(dataset, data_args)
    image_column, label_column = data_args.image_column_name, data_args.label_column_name
    wanted = [image_column, label_column] + ([ROW_INDEX_COLUMN] if ROW_INDEX_COLUMN in dataset.column_names else [])
    return dataset.with_transform(transform, columns=wanted)


def collate_image_batch(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The Trainer's collator: stack examples into ``{"pixel_values": (B, C, H, W), "labels": (B,)}``.

    Other tensor-valued keys (the pre-decoded pipeline's ``crop_flip``) are stacked too.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    batch = {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long),
    }
    for key, value in examples[0].items():  # e.g. the pre-decoded pipeline's per-image augmentation parameters
        if key not in batch and isinstance(value, torch.Tensor):
            batch[key] = torch.stack([example[key] for example in examples])
    return batch
