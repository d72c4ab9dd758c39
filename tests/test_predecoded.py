"""The pre-decoded image pipeline: decoded once, cropped / flipped / normalised on the device in batch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import json  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import CIFAR10_DIR, REPO_ROOT  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402

from stim_hf.cli.train import main  # noqa: E402
from stim_hf.data.device_augmentation import DeviceImageAugmentation  # noqa: E402
from stim_hf.data.image_datasets import DataArguments, load_image_datasets  # noqa: E402
from stim_hf.data.predecoded import (  # noqa: E402
    CROP_FLIP_KEY,
    crop_and_flip,
    predecode,
    with_predecoded_transforms,
)
from stim_hf.data.transforms import collate_image_batch, with_image_transforms  # noqa: E402
from stim_hf.errors import ConfigError, DataError  # noqa: E402
from stim_hf.training.checkpointing import SeededBatchDataset  # noqa: E402

needs_cifar = pytest.mark.skipif(
    not (CIFAR10_DIR / "train.parquet").is_file(), reason=f"CIFAR-10 parquet files not found in {CIFAR10_DIR}"
)


@pytest.fixture(scope="module")
def digits():
    args = DataArguments(dataset_name="sklearn:digits", image_size=16, image_pipeline="predecoded")
    return args, load_image_datasets(args, seed=0)


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(8, 20),
    padding=st.integers(1, 4),
    data=st.data(),
)
def test_crop_and_flip_is_torchvision_pad_crop_flip(size, padding, data):
    count = data.draw(st.integers(1, 5))
    params = torch.tensor(
        [
            [
                data.draw(st.integers(0, 2 * padding)),
                data.draw(st.integers(0, 2 * padding)),
                data.draw(st.integers(0, 1)),
            ]
            for _ in range(count)
        ],
        dtype=torch.int16,
    )
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)
    out = crop_and_flip(images, params, padding)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for i, (top, left, flip) in enumerate(params.tolist()):
        expected = TF.crop(TF.pad(images[i], [padding]), top, left, size, size)
        if flip:
            expected = TF.horizontal_flip(expected)
        assert torch.equal(out[i], expected)


def test_eval_pixels_match_the_default_pipeline(digits):
    """Evaluation sees the same pixels from either pipeline (same torchvision resize and crop)."""
    args, splits = digits
    validation = splits["validation"].select(range(40))
    pil = collate_image_batch([with_image_transforms(validation, args, train=False)[i] for i in range(40)])
    rows = with_predecoded_transforms(validation, args, train=False)
    batch = collate_image_batch(rows.__getitems__(list(range(40))))
    assert batch["pixel_values"].dtype == torch.uint8 and CROP_FLIP_KEY not in batch
    finished = DeviceImageAugmentation.from_data_args(args)(batch)
    torch.testing.assert_close(finished["pixel_values"], pil["pixel_values"], atol=1e-5, rtol=1e-5)
    assert torch.equal(finished["labels"], pil["labels"])


def test_training_batches_carry_per_image_crops_and_flips(digits):
    args, splits = digits
    train = with_predecoded_transforms(splits["train"], args, train=True)
    batch = collate_image_batch(train.__getitems__(list(range(256))))
    params = batch[CROP_FLIP_KEY]
    padding = args.image_size // 8
    assert params.shape == (256, 3)
    assert params[:, :2].min() >= 0 and params[:, :2].max() <= 2 * padding
    assert set(params[:, 2].tolist()) == {0, 1}
    assert len({tuple(p) for p in params.tolist()}) > 10  # per image, not one draw for the batch
    raw = batch["pixel_values"].clone()
    finished = DeviceImageAugmentation.from_data_args(args)(batch)
    assert CROP_FLIP_KEY not in finished and finished["pixel_values"].dtype == torch.float32
    mean, std = args.normalization()
    top, left, flip = params[7].tolist()
    expected = TF.crop(TF.pad(raw[7], [padding]), top, left, 16, 16)
    expected = TF.horizontal_flip(expected) if flip else expected
    expected = TF.normalize(expected.float() / 255, list(mean), list(std))
    torch.testing.assert_close(finished["pixel_values"][7], expected, atol=1e-5, rtol=1e-5)


def test_augmentation_follows_the_seeded_loader(digits):
    """Crops and flips are drawn under the data loader's per-batch seed: the same batch, the same draws."""
    args, splits = digits
    train = SeededBatchDataset(with_predecoded_transforms(splits["train"], args, train=True), seed=3)
    first = collate_image_batch(train.__getitems__(list(range(32))))
    again = collate_image_batch(train.__getitems__(list(range(32))))
    other = collate_image_batch(train.__getitems__(list(range(32, 64))))
    assert torch.equal(first[CROP_FLIP_KEY], again[CROP_FLIP_KEY])
    assert not torch.equal(first[CROP_FLIP_KEY], other[CROP_FLIP_KEY])
    loader = DataLoader(train, batch_size=16, num_workers=2, collate_fn=collate_image_batch)
    in_workers = next(iter(loader))
    assert torch.equal(
        in_workers[CROP_FLIP_KEY], collate_image_batch(train.__getitems__(list(range(16))))[CROP_FLIP_KEY]
    )


def test_imagenet_preset_and_unknown_pipeline_are_refused():
    with pytest.raises(ConfigError, match="image_pipeline: pil"):
        DataArguments(dataset_name="sklearn:digits", augmentation="imagenet", image_pipeline="predecoded")
    with pytest.raises(ConfigError, match="image_pipeline='gpu'.*pil, predecoded"):
        DataArguments(dataset_name="sklearn:digits", image_pipeline="gpu")
    with pytest.raises(ConfigError, match="preprocessing_num_workers"):
        DataArguments(dataset_name="sklearn:digits", preprocessing_num_workers=0)


def test_corrupt_image_is_reported_while_decoding(tmp_path):
    root = tmp_path / "images"
    for class_name in ("a", "b"):
        (root / class_name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), (i * 40, 0, 0)).save(root / class_name / f"{i}.png")
    (root / "b" / "broken.png").write_bytes(b"not an image")
    args = DataArguments(
        train_dir=str(root), validation_dir=str(root), image_size=8, image_pipeline="predecoded",
        dataset_cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    splits = load_image_datasets(args, seed=0)
    with pytest.raises(DataError, match=r"broken\.png.*replace or delete it"):
        predecode(splits["validation"], args, train=False)


@needs_cifar
def test_cifar_decoding_is_cached(tmp_path):
    cache = str(tmp_path / "cache")
    args = DataArguments(
        train_file=str(CIFAR10_DIR / "test.parquet"), image_pipeline="predecoded", max_train_samples=500,
        dataset_cache_dir=cache,
    )  # fmt: skip
    split = load_image_datasets(args, seed=0)["train"]
    first = predecode(split, args, train=True)
    again = predecode(split, args, train=True)
    assert first.cache_files and first.cache_files == again.cache_files
    decoded = np.frombuffer(first[0]["__pixels__"], dtype=np.uint8).reshape(3, 32, 32)
    original = np.asarray(split.cast_column("image", datasets.Image())[0]["image"].convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(decoded, original)


def test_quickstart_trains_with_the_predecoded_pipeline(tmp_path):
    """Four epochs: 0.79-0.86 under every kernel path and thread count tried (docs/compatibility.md).

    Two epochs gave 0.43-0.58 depending on the CPU's kernels: the middle of a fast climb, no place
    for a threshold. A pipeline that mixed up images and labels would stay near chance (0.1).
    """
    out = tmp_path / "q"
    metrics = main(
        [str(REPO_ROOT / "configs" / "quickstart.yaml"), "--output_dir", str(out), "--num_train_epochs", "4",
         "--image_pipeline", "predecoded", "--bn_policy", "recalibrate", "--bn_recalibration_samples", "128",
         "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no"]
    )  # fmt: skip
    assert metrics["eval_accuracy"] > 0.5
    assert json.loads((out / "all_results.json").read_text())["eval_accuracy"] == metrics["eval_accuracy"]
