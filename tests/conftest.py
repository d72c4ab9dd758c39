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


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)`` mounts a tmpfs of ``size`` (``"4m"``) under ``tmp_path`` and returns its path: a real
    filesystem that fills up (a failed write gets the OS's own error). Unmounted afterwards. Skips, naming why, where
    no tmpfs can be mounted (it takes root, or CAP_SYS_ADMIN)."""
    import gc
    import subprocess

    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        try:
            result = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True, text=True
            )
        except FileNotFoundError:
            pytest.skip("no mount command here: the full-disk tests need a small tmpfs")
        if result.returncode != 0:
            why = (result.stderr or result.stdout).strip().splitlines()[-1:] or [f"status {result.returncode}"]
            pytest.skip(f"cannot mount a tmpfs here ({why[0]}; it takes root or CAP_SYS_ADMIN): no real full disk")
        mounted.append(point)
        return point

    yield mount
    gc.collect()  # a writer torch left open on a failed write holds the filesystem busy until it is collected
    for point in reversed(mounted):
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill_disk(disk: Path, leave: int = 0) -> Path:
    """Fill the filesystem of ``disk`` with a file of zeros until ``leave`` bytes are free (to the page); its path."""
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    filler = disk / "filler"
    with open(filler, "ab") as handle:
        handle.write(bytes(max(0, free - leave)))
    return filler
