"""The device_color image pipeline: geometry in the workers at uint8, colour jitter + normalisation on the device."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import itertools  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import REPO_ROOT  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.transforms import v2  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402

from stim_hf.cli.train import main, pipeline_batch_transform  # noqa: E402
from stim_hf.data.device_augmentation import DeviceImageAugmentation  # noqa: E402
from stim_hf.data.device_color import COLOR_JITTER_KEY, color_jitter, jitter_parameters, with_uint8_transforms  # noqa: E402
from stim_hf.data.image_datasets import DataArguments, load_image_datasets  # noqa: E402
from stim_hf.data.transforms import collate_image_batch, with_image_transforms  # noqa: E402
from stim_hf.training.checkpointing import SeededBatchDataset  # noqa: E402

ADJUSTMENTS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """20 JPEGs of 40..90 px (smooth colour fields, two classes) as an image folder, the imagenet preset at 32 px."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i in range(20):
        height, width = (int(v) for v in rng.integers(40, 91, 2))
        yy, xx = np.mgrid[0:height, 0:width]
        field = np.stack([np.sin(xx / (5 + c) + i) * np.cos(yy / (7 + c)) for c in range(3)], -1)
        pixels = (127 + 100 * field + rng.normal(0, 8, field.shape)).clip(0, 255).astype(np.uint8)
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(root / f"c{i % 2}" / f"{i}.jpg", quality=90)
    args = DataArguments(
        train_dir=str(root), validation_dir=str(root), image_size=32, augmentation="imagenet",
        image_pipeline="device_color",
    )  # fmt: skip
    return args, load_image_datasets(args, seed=0)


def test_color_jitter_is_torchvision_on_every_image_by_its_own_draw():
    torch.manual_seed(0)
    pixels = torch.rand(6, 3, 9, 11)
    orders = list(itertools.permutations(range(3)))  # every order once
    factors = torch.empty(6, 3).uniform_(0.6, 1.4)
    params = torch.cat([factors, torch.tensor(orders, dtype=torch.float32)], dim=1)
    expected = []
    for image, draw in zip(pixels, params, strict=True):
        for which in draw[3:].long().tolist():
            image = ADJUSTMENTS[which](image, float(draw[which]))
        expected.append(image)
    torch.testing.assert_close(color_jitter(pixels, params), torch.stack(expected), atol=1e-6, rtol=0)


def test_jitter_parameters_are_torchvisions_draw():
    jitter = v2.ColorJitter(0.4, 0.4, 0.4)
    torch.manual_seed(11)
    params = jitter_parameters(jitter)
    torch.manual_seed(11)
    drawn = jitter.make_params([])
    assert params[:3].tolist() == pytest.approx(
        [drawn["brightness_factor"], drawn["contrast_factor"], drawn["saturation_factor"]]
    )
    assert params[3:].long().tolist() == [i for i in drawn["fn_idx"].tolist() if i != 3]


def test_training_batches_match_the_default_pipeline_under_the_same_random_state(jpegs):
    """Same crops, flips and jitter draws as 'pil'; what differs is pil's rounding to uint8 after each adjustment."""
    args, splits = jpegs
    rows = list(range(16))
    default = with_image_transforms(splits["train"], args, train=True)
    uint8 = with_uint8_transforms(splits["train"], args, train=True)
    torch.manual_seed(4)
    expected = collate_image_batch(default.__getitems__(rows))["pixel_values"]
    torch.manual_seed(4)
    batch = collate_image_batch(uint8.__getitems__(rows))
    assert batch["pixel_values"].dtype == torch.uint8 and batch[COLOR_JITTER_KEY].shape == (16, 6)
    finished = DeviceImageAugmentation.from_data_args(args)(dict(batch))
    assert COLOR_JITTER_KEY not in finished and finished["pixel_values"].dtype == torch.float32
    std = torch.tensor(args.normalization()[1]).view(1, 3, 1, 1)
    difference = (finished["pixel_values"] - expected).abs() * std * 255  # in uint8 steps
    assert difference.max() <= 4.0  # a different crop or flip would differ by far more
    assert difference.mean() < 2.5


def test_eval_pixels_match_the_default_pipeline(jpegs):
    args, splits = jpegs
    rows = list(range(len(splits["validation"])))
    expected = collate_image_batch(with_image_transforms(splits["validation"], args, False).__getitems__(rows))
    batch = collate_image_batch(with_uint8_transforms(splits["validation"], args, False).__getitems__(rows))
    assert COLOR_JITTER_KEY not in batch
    finished = pipeline_batch_transform(args)(batch)
    torch.testing.assert_close(finished["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=1e-5)


def test_jitter_follows_the_seeded_loader(jpegs):
    """Draws come from the data loader's per-batch seed: the same batch, the same draws, in workers too."""
    args, splits = jpegs
    train = SeededBatchDataset(with_uint8_transforms(splits["train"], args, train=True), seed=3)
    first = collate_image_batch(train.__getitems__(list(range(8))))
    again = collate_image_batch(train.__getitems__(list(range(8))))
    other = collate_image_batch(train.__getitems__(list(range(8, 16))))
    assert torch.equal(first[COLOR_JITTER_KEY], again[COLOR_JITTER_KEY])
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    assert not torch.equal(first[COLOR_JITTER_KEY], other[COLOR_JITTER_KEY])
    loader = DataLoader(train, batch_size=8, num_workers=2, collate_fn=collate_image_batch)
    assert torch.equal(next(iter(loader))[COLOR_JITTER_KEY], first[COLOR_JITTER_KEY])


def test_the_job_trains_and_evaluates_with_device_color(tmp_path):
    out = tmp_path / "q"
    metrics = main(
        [str(REPO_ROOT / "configs" / "quickstart.yaml"), "--output_dir", str(out), "--max_steps", "12",
         "--augmentation", "imagenet", "--image_pipeline", "device_color", "--report_to", "none",
         "--disable_tqdm", "true", "--num_eval_subnets", "0"]
    )  # fmt: skip
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses and all(np.isfinite(losses))
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_samples"] == 360
