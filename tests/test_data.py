"""Data arguments, dataset loading, builtin datasets and image transforms, on real datasets objects."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import io  # noqa: E402
import pickle  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms import v2  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

import stim_hf.data.transforms as transforms_module  # noqa: E402
from stim_hf.data.builtin_datasets import BUILTIN_DATASETS, load_builtin_dataset  # noqa: E402
from stim_hf.data.image_datasets import (  # noqa: E402
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ROW_INDEX_COLUMN,
    DataArguments,
    get_label_names,
    load_image_datasets,
)
from stim_hf.data.transforms import (  # noqa: E402
    build_transforms,
    collate_image_batch,
    decode_image,
    decode_rgb,
    with_image_transforms,
)
from stim_hf.errors import ConfigError, DataError  # noqa: E402

CIFAR_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
needs_cifar = pytest.mark.skipif(
    not (CIFAR_DIR / "train.parquet").is_file(),
    reason=f"CIFAR-10 parquet files not found in {CIFAR_DIR} (the shared/ folder beside the checkout)",
)
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


@pytest.fixture(scope="module")
def digits_args():
    return DataArguments(dataset_name="sklearn:digits")


@pytest.fixture(scope="module")
def digits_splits(digits_args):
    return load_image_datasets(digits_args, seed=0)


def _png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _make_image_folder(root: Path, per_class: int = 4) -> Path:
    """Two classes of small images in every awkward mode: RGB PNG/JPEG, grayscale, CMYK, RGBA, palette."""
    rng = np.random.default_rng(0)
    for class_name in ("cat", "dog"):
        folder = root / class_name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"rgb{i}.png")
            Image.fromarray(pixels).save(folder / f"rgb{i}.jpg", quality=90)
        Image.fromarray(rng.integers(0, 256, size=(16, 16), dtype=np.uint8), mode="L").save(folder / "gray.png")
        Image.fromarray(rng.integers(0, 256, size=(16, 16), dtype=np.uint8), mode="L").save(folder / "gray.jpg")
        Image.new("CMYK", (18, 18), (10, 20, 30, 40)).save(folder / "cmyk.jpg")
        Image.fromarray(rng.integers(0, 256, size=(16, 16, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
        palette = Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).convert("P")
        palette.save(folder / "palette.png", transparency=0)
    return root


# -- DataArguments validation -------------------------------------------------------------------------


def test_exactly_one_source_required(tmp_path):
    with pytest.raises(ConfigError, match="exactly one data source") as info:
        DataArguments()
    for option in ("dataset_name", "train_dir", "train_file"):
        assert option in str(info.value)
    with pytest.raises(ConfigError, match="got dataset_name and train_dir"):
        DataArguments(dataset_name="sklearn:digits", train_dir=str(tmp_path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_val_split": 0.0}, "train_val_split"),
        ({"train_val_split": 1.0}, "train_val_split"),
        ({"image_size": 4}, "image_size=4"),
        ({"max_train_samples": 0}, "max_train_samples=0"),
        ({"max_eval_samples": -3}, "max_eval_samples=-3"),
        ({"augmentation": "autoaugment"}, "cifar, imagenet, none"),
        ({"image_mean": "0.5,0.5"}, "3 comma-separated numbers"),
        ({"image_mean": "a,b,c"}, "3 comma-separated numbers"),
        ({"image_std": "0.2,0,0.2"}, "positive"),
        ({"eval_resize": 16}, "eval_resize=16"),
        ({"label_column_name": "image"}, "two different columns"),
        ({"dataset_name": "sklearn:nope"}, "sklearn:digits"),
        ({"dataset_config_name": "x"}, "builtin dataset 'sklearn:digits' has no configurations"),
        ({"validation_split": "train"}, "both 'train'"),
    ],
)
def test_invalid_values_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DataArguments(**{"dataset_name": "sklearn:digits", **kwargs})


def test_validation_source_needs_matching_train_source(tmp_path):
    with pytest.raises(ConfigError, match="validation_dir is set but train_dir is not"):
        DataArguments(dataset_name="sklearn:digits", validation_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="validation_file is set but train_file is not"):
        DataArguments(train_dir=str(tmp_path), validation_file=str(tmp_path / "x.parquet"))
    with pytest.raises(ConfigError, match="only applies to dataset_name"):
        DataArguments(train_dir=str(tmp_path), validation_split="test")


def test_missing_paths_raise_data_error(tmp_path):
    missing = tmp_path / "nope" / "train.parquet"
    with pytest.raises(DataError, match="does not exist; check the path") as info:
        DataArguments(train_file=str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(DataError, match="matches no file"):
        DataArguments(train_file=str(tmp_path / "*.parquet"))
    with pytest.raises(DataError, match="train_dir .* does not exist"):
        DataArguments(train_dir=str(tmp_path / "missing_dir"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"\.csv.*\.parquet or \.arrow"):
        DataArguments(train_file=str(tmp_path / "data.csv"))


def test_defaults_and_hf_argument_parser():
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        args=["--dataset_name", "sklearn:digits", "--augmentation", "ImageNet", "--image_size", "24"]
    )
    assert args.augmentation == "imagenet"
    assert args.resolved_eval_resize() == round(24 / 0.875)
    assert args.normalization() == (IMAGENET_MEAN, IMAGENET_STD)
    cifar = DataArguments(dataset_name="sklearn:digits")
    assert cifar.resolved_eval_resize() == 32
    assert cifar.normalization() == (CIFAR_MEAN, CIFAR_STD)
    custom = DataArguments(dataset_name="sklearn:digits", image_mean="0.5, 0.5,0.5", image_std="0.25,0.25,0.25")
    assert custom.normalization() == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


# -- builtin dataset, carving, subsets ----------------------------------------------------------------


def test_builtin_digits():
    assert "sklearn:digits" in BUILTIN_DATASETS
    splits = load_builtin_dataset("sklearn:digits")
    assert list(splits) == ["train"]
    train = splits["train"]
    assert len(train) == 1797
    assert train.features["label"].names == [str(i) for i in range(10)]
    assert isinstance(train.features["image"], datasets.Image)
    image = train[0]["image"]
    assert image.mode == "RGB" and image.size == (32, 32)
    assert np.asarray(image).max() > 200  # scaled from 0..16 to 0..255
    again = load_builtin_dataset("sklearn:digits")["train"]
    assert np.array_equal(np.asarray(again[5]["image"]), np.asarray(train[5]["image"]))
    with pytest.raises(ConfigError, match="sklearn:digits"):
        load_builtin_dataset("sklearn:iris")


def test_validation_is_carved_stratified_and_seeded(digits_args, digits_splits):
    train, validation = digits_splits["train"], digits_splits["validation"]
    assert (len(train), len(validation)) == (1527, 270)
    train_rows, val_rows = set(train[ROW_INDEX_COLUMN]), set(validation[ROW_INDEX_COLUMN])
    assert not train_rows & val_rows and len(train_rows | val_rows) == 1797
    all_counts = np.bincount(load_builtin_dataset("sklearn:digits")["train"]["label"][:], minlength=10)
    val_counts = np.bincount(np.asarray(validation["label"][:]), minlength=10)
    assert np.all(np.abs(val_counts - 0.15 * all_counts) <= 1)
    same = load_image_datasets(digits_args, seed=0)["validation"]
    other = load_image_datasets(digits_args, seed=1)["validation"]
    assert same[ROW_INDEX_COLUMN][:] == validation[ROW_INDEX_COLUMN][:]
    assert other[ROW_INDEX_COLUMN][:] != validation[ROW_INDEX_COLUMN][:]
    assert get_label_names(train, "label") == [str(i) for i in range(10)]


def test_max_samples_take_a_seeded_subset():
    args = DataArguments(dataset_name="sklearn:digits", max_train_samples=50, max_eval_samples=20)
    first = load_image_datasets(args, seed=3)
    assert (len(first["train"]), len(first["validation"])) == (50, 20)
    second = load_image_datasets(args, seed=3)
    assert first["train"][ROW_INDEX_COLUMN][:] == second["train"][ROW_INDEX_COLUMN][:]


# -- parquet / arrow files ----------------------------------------------------------------------------


@needs_cifar
def test_cifar_parquet_restores_features(cache_dir):
    args = DataArguments(
        train_file=str(CIFAR_DIR / "train.parquet"),
        validation_file=str(CIFAR_DIR / "test.parquet"),
        max_train_samples=64,
        max_eval_samples=32,
        dataset_cache_dir=cache_dir,
    )
    splits = load_image_datasets(args, seed=0)
    assert (len(splits["train"]), len(splits["validation"])) == (64, 32)
    for split in splits.values():
        assert isinstance(split.features["image"], datasets.Image)
        assert split.features["label"].names == CIFAR_NAMES
    assert get_label_names(splits["train"], "label") == CIFAR_NAMES
    batch = collate_image_batch(list(with_image_transforms(splits["validation"], args, train=False)))
    assert batch["pixel_values"].shape == (32, 3, 32, 32) and batch["labels"].dtype == torch.int64
    # eval transform of a 32x32 image is normalisation only
    image = np.asarray(splits["validation"][0]["image"], dtype=np.float32) / 255.0
    expected = (image - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
    assert np.allclose(batch["pixel_values"][0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


@needs_cifar
def test_cifar_glob_and_missing_column(cache_dir):
    args = DataArguments(train_file=str(CIFAR_DIR / "tr*.parquet"), max_train_samples=10, dataset_cache_dir=cache_dir)
    splits = load_image_datasets(args, seed=0)
    assert len(splits["train"]) == 10 and len(splits["validation"]) > 7000  # 15 % carved off 50,000
    bad = DataArguments(
        train_file=str(CIFAR_DIR / "test.parquet"), label_column_name="labl", dataset_cache_dir=cache_dir
    )
    with pytest.raises(DataError) as info:
        load_image_datasets(bad, seed=0)
    assert str(info.value) == (
        "label column 'labl' not found in the training data (columns: image, label); "
        "set label_column_name to one of them"
    )


def _write_parquet(path: Path, labels, label_feature=None) -> str:
    image = _png_bytes(Image.new("RGB", (8, 8), (200, 100, 50)))
    features = datasets.Features({"image": datasets.Image(), "label": label_feature or datasets.Value("int64")})
    data = {"image": [{"bytes": image, "path": None}] * len(labels), "label": list(labels)}
    # batch_size given: datasets < 5 divides by zero estimating the size of an empty split otherwise.
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path), batch_size=100)
    return str(path)


def test_integer_labels_become_class_label(tmp_path, cache_dir):
    train = _write_parquet(tmp_path / "train.parquet", [0, 1, 2] * 4)
    validation = _write_parquet(tmp_path / "val.parquet", [2, 1, 0])
    args = DataArguments(train_file=train, validation_file=validation, dataset_cache_dir=cache_dir)
    splits = load_image_datasets(args, seed=0)
    for split in splits.values():
        assert split.features["label"] == datasets.ClassLabel(names=["0", "1", "2"])
    assert splits["validation"]["label"][:] == [2, 1, 0]


def test_bad_labels_raise_data_error(tmp_path, cache_dir):
    train = _write_parquet(tmp_path / "train.parquet", [0, 1, 2] * 4)
    out_of_range = _write_parquet(tmp_path / "val.parquet", [0, 1, 3, -1])
    args = DataArguments(train_file=train, validation_file=out_of_range, dataset_cache_dir=cache_dir)
    with pytest.raises(DataError, match="label 3 in row 2 of the validation data"):
        load_image_datasets(args, seed=0)
    gaps = _write_parquet(tmp_path / "gaps.parquet", [0, 1, 3, 3])
    with pytest.raises(DataError, match=r"not 0\.\.C-1 .*missing 2.*ClassLabel"):
        load_image_datasets(DataArguments(train_file=gaps, dataset_cache_dir=cache_dir), seed=0)
    strings = _write_parquet(tmp_path / "str.parquet", ["cat", "dog"], datasets.Value("string"))
    with pytest.raises(DataError, match="class_encode_column"):
        load_image_datasets(DataArguments(train_file=strings, dataset_cache_dir=cache_dir), seed=0)
    names = datasets.ClassLabel(names=["a", "b"])
    empty = _write_parquet(tmp_path / "empty.parquet", [], names)
    with pytest.raises(DataError, match="the training split is empty"):
        load_image_datasets(DataArguments(train_file=empty, dataset_cache_dir=cache_dir), seed=0)


def test_arrow_file(tmp_path, cache_dir):
    digits = load_builtin_dataset("sklearn:digits")["train"].select(range(40))
    digits.save_to_disk(str(tmp_path / "saved"))
    args = DataArguments(train_file=str(tmp_path / "saved" / "*.arrow"), dataset_cache_dir=cache_dir)
    splits = load_image_datasets(args, seed=0)
    assert len(splits["train"]) + len(splits["validation"]) == 40
    assert splits["train"].features["label"].names == [str(i) for i in range(10)]


# -- image folders ------------------------------------------------------------------------------------


def test_image_folder_with_awkward_modes(tmp_path, cache_dir):
    root = _make_image_folder(tmp_path / "images")
    args = DataArguments(train_dir=str(root), train_val_split=0.25, image_size=16, dataset_cache_dir=cache_dir)
    splits = load_image_datasets(args, seed=0)
    assert get_label_names(splits["train"], "label") == ["cat", "dog"]
    assert len(splits["train"]) + len(splits["validation"]) == 2 * 13
    for name, split in splits.items():
        batch = collate_image_batch(list(with_image_transforms(split, args, train=name == "train")))
        assert batch["pixel_values"].shape == (len(split), 3, 16, 16)
        assert batch["pixel_values"].dtype == torch.float32
        assert torch.isfinite(batch["pixel_values"]).all()


def test_image_folder_without_class_subfolders(tmp_path, cache_dir):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    with pytest.raises(DataError, match="subfolder"):
        load_image_datasets(DataArguments(train_dir=str(tmp_path), dataset_cache_dir=cache_dir), seed=0)


def test_corrupt_image_names_row_and_file(tmp_path, cache_dir):
    root = tmp_path / "images"
    for class_name in ("a", "b"):
        (root / class_name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), (i * 40, 0, 0)).save(root / class_name / f"{i}.jpg")
    good = (root / "b" / "0.jpg").read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "a" / "garbage.png").write_bytes(b"not an image at all")
    args = DataArguments(train_dir=str(root), validation_dir=str(root), image_size=8, dataset_cache_dir=cache_dir)
    validation = load_image_datasets(args, seed=0)["validation"]
    paths = validation.cast_column("image", datasets.Image(decode=False))["image"][:]
    rows = {os.path.basename(p["path"]): i for i, p in enumerate(paths)}
    transformed = with_image_transforms(validation, args, train=False)
    with pytest.raises(DataError) as info:
        transformed[rows["truncated.jpg"]]
    message = str(info.value)
    assert f"row {rows['truncated.jpg']}" in message and str(root / "b" / "truncated.jpg") in message
    assert "replace or delete it" in message
    with pytest.raises(DataError, match=r"garbage\.png"):
        transformed[rows["garbage.png"]]
    assert transformed[rows["0.jpg"]]["pixel_values"].shape == (3, 8, 8)


# -- transforms ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("augmentation", ["cifar", "imagenet", "none"])
@pytest.mark.parametrize("train", [True, False])
def test_transform_presets_shape_dtype(augmentation, train):
    args = DataArguments(dataset_name="sklearn:digits", augmentation=augmentation, image_size=24)
    transform = build_transforms(args, train=train)
    for image in (Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("L", (24, 24), 128)):
        out = transform(image)
        assert type(out) is torch.Tensor
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32


def test_eval_crop_can_differ_from_train_crop():
    """The released ImageNet recipe: train crop 200, resize 240 + centre crop 224 at evaluation."""
    args = DataArguments(
        dataset_name="sklearn:digits", augmentation="imagenet", image_size=20, eval_image_size=24, eval_resize=27
    )
    image = Image.new("RGB", (50, 40), (0, 128, 0))
    assert build_transforms(args, train=True)(image).shape == (3, 20, 20)
    assert build_transforms(args, train=False)(image).shape == (3, 24, 24)
    assert (
        DataArguments(
            dataset_name="sklearn:digits", augmentation="imagenet", eval_image_size=224
        ).resolved_eval_resize()
        == 256
    )
    with pytest.raises(ConfigError, match="eval_resize=20 is smaller than the eval crop"):
        DataArguments(dataset_name="sklearn:digits", image_size=16, eval_image_size=24, eval_resize=20)


def test_transform_normalises_with_preset_stats():
    colour = (200, 100, 50)
    image = Image.new("RGB", (48, 48), colour)
    for augmentation, (mean, std) in (("none", (IMAGENET_MEAN, IMAGENET_STD)), ("cifar", (CIFAR_MEAN, CIFAR_STD))):
        args = DataArguments(dataset_name="sklearn:digits", augmentation=augmentation)
        out = build_transforms(args, train=False)(image)
        expected = (np.array(colour) / 255.0 - np.array(mean)) / np.array(std)
        assert np.allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)
    # cifar training: zero padding shows up as normalised black, the rest keeps the colour
    args = DataArguments(dataset_name="sklearn:digits", image_mean="0,0,0", image_std="1,1,1")
    torch.manual_seed(0)
    outs = torch.stack([build_transforms(args, train=True)(Image.new("RGB", (32, 32), colour)) for _ in range(20)])
    values = outs[:, 0].unique()
    assert torch.allclose(values, torch.tensor([0.0, 200 / 255]))


def test_dataloader_with_workers(digits_args, digits_splits):
    dataset = with_image_transforms(digits_splits["train"].select(range(24)), digits_args, train=True)
    restored = pickle.loads(pickle.dumps(dataset))  # what spawn / forkserver workers receive
    assert restored[0]["pixel_values"].shape == (3, 32, 32)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=8, num_workers=2, collate_fn=collate_image_batch, timeout=60
    )
    batches = list(loader)
    assert len(batches) == 3
    assert batches[0]["pixel_values"].shape == (8, 3, 32, 32)
    assert batches[0]["labels"].dtype == torch.int64
    expected = digits_splits["train"].select(range(24))["label"][:]
    assert torch.cat([b["labels"] for b in batches]).tolist() == expected


# -- decoding: TorchCodec where it gives PIL's pixels --------------------------------------------------


def _awkward_images(tmp_path: Path) -> dict[str, dict]:
    """Stored images ({"bytes", "path"}) in every mode, orientation and format the decoders might disagree on."""
    rng = np.random.default_rng(1)
    smooth = np.clip(np.cumsum(rng.normal(0, 6, (30, 40, 3)), axis=1) + 128, 0, 255).astype(np.uint8)
    base = Image.fromarray(smooth)
    images = {
        "jpeg rgb": _png_bytes(base, "JPEG"),
        "jpeg gray": _png_bytes(base.convert("L"), "JPEG"),
        "jpeg cmyk": _png_bytes(base.convert("CMYK"), "JPEG"),
        "png rgb": _png_bytes(base),
        "png rgba": _png_bytes(Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), mode="RGBA")),
        "png gray": _png_bytes(base.convert("L")),
        "png gray + alpha": _png_bytes(base.convert("LA")),
        "png palette": _png_bytes(base.convert("P")),
        "png 16-bit": _png_bytes(Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)),
        "bmp": _png_bytes(base, "BMP"),
        "webp": _png_bytes(base, "WEBP"),
    }
    buffer = io.BytesIO()
    base.convert("P").save(buffer, "PNG", transparency=3)
    images["png palette + transparency"] = buffer.getvalue()
    buffer = io.BytesIO()
    base.save(buffer, "JPEG", progressive=True)
    images["jpeg progressive"] = buffer.getvalue()
    for orientation in range(1, 9):
        exif = base.getexif()
        exif[0x0112] = orientation
        for fmt in ("JPEG", "PNG"):
            buffer = io.BytesIO()
            base.save(buffer, fmt, exif=exif.tobytes())
            images[f"{fmt.lower()} exif orientation {orientation}"] = buffer.getvalue()
    stored = {name: {"bytes": data, "path": None} for name, data in images.items()}
    (tmp_path / "on_disk.jpg").write_bytes(images["jpeg rgb"])
    stored["jpeg in a local file"] = {"bytes": None, "path": str(tmp_path / "on_disk.jpg")}
    return stored


def test_decode_rgb_gives_the_pixels_of_datasets_decoding_then_rgb(tmp_path):
    to_rgb_tensor = v2.Compose([v2.RGB(), v2.ToImage(), v2.ToPureTensor()])
    fast = 0
    for name, value in _awkward_images(tmp_path).items():
        decoded = decode_rgb(value)
        expected = to_rgb_tensor(decode_image(value))
        actual = to_rgb_tensor(decoded)
        assert actual.dtype == torch.uint8 and actual.shape == expected.shape, name
        assert torch.equal(actual, expected), name
        fast += isinstance(decoded, torch.Tensor)
    if transforms_module._torchcodec_decode is not None:  # JPEGs (every orientation) and the common PNG modes
        assert fast == 20
    else:
        assert fast == 0


def test_decode_rgb_names_a_truncated_or_corrupt_file(tmp_path):
    whole = _awkward_images(tmp_path)["jpeg rgb"]["bytes"]
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    for value in (
        {"bytes": whole[: len(whole) // 2], "path": None},
        {"bytes": None, "path": str(tmp_path / "cut.jpg")},
    ):
        with pytest.raises(DataError, match=r"row 7 .*corrupt, truncated or not an image"):
            decode_rgb(value, row=7)
    with pytest.raises(DataError, match="not an image"):
        decode_rgb({"bytes": b"\xff\xd8\xff garbage", "path": None})


def test_without_torchcodec_pil_decodes_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(transforms_module, "_torchcodec_decode", None)
    value = _awkward_images(tmp_path)["jpeg rgb"]
    assert isinstance(decode_rgb(value), Image.Image)
