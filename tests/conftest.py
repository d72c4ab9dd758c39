"""Shared test setup: everything runs offline, on the CPU, with small models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models on 2 shared cores: one intra-op thread is several times faster than two, and the
# multi-process tests start their own processes anyway. An OMP_NUM_THREADS that is set wins: the
# suite must pass at any thread count (docs/compatibility.md).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_DIR = REPO_ROOT.parent / "shared" / "data" / "cifar10"


def make_tensor_dataset(n=64, size=16, num_labels=10, seed=0, poisoned=None):
    """A learnable synthetic image dataset (``pixel_values`` float tensors, ``labels``) as a real ``datasets.Dataset``.

    One channel's mean moves with the label, so a few steps of training visibly learn. ``poisoned``:
    the index of a sample that gets an infinite pixel (non-finite loss tests).
    """
    import numpy as np
    from datasets import Array3D, Dataset, Features, Value

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_labels, n)
    images = rng.normal(size=(n, 3, size, size)).astype(np.float32)
    images[:, 0] += labels[:, None, None] * 0.3
    if poisoned is not None:
        images[poisoned, 1, 3, 5] = np.inf  # e.g. a division by a zero std in someone's preprocessing
    # Array3D: torch formatting reads the images as arrays (a nested-list column is ~25x slower).
    features = Features({"pixel_values": Array3D(shape=images.shape[1:], dtype="float32"), "labels": Value("int64")})
    return Dataset.from_dict({"pixel_values": images, "labels": labels}, features=features).with_format("torch")


@pytest.fixture
def tiny_cifar_resnet():
    """A ResNet-14 (2 blocks per stage, width 8/16/32) with random weights, 10 classes."""
    from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification

    def build(depth: int = 14, widths=(8, 16, 32), num_labels: int = 10, seed: int = 0, **kwargs):
        import torch

        torch.manual_seed(seed)
        config = CifarResNetConfig(depth=depth, widths=list(widths), num_labels=num_labels, **kwargs)
        return CifarResNetForImageClassification(config)

    return build
