"""Where a worker's time goes on one ImageNet-style training image: each step of the ``imagenet`` preset, timed.

  python bench/jpeg_steps.py                  # 40 generated JPEGs of 300..500 px, 224 px crops, one thread
  python bench/jpeg_steps.py --count 200 --size 176

Decodes every image as the pipelines do (``decode_rgb``: TorchCodec where installed, else PIL; PIL
alone is timed too, for comparison), then runs the preset's own torchvision steps
(``stim_hf.data.transforms.build_transforms``) one at a time, in the order the DataLoader workers run them, and prints milliseconds per image for
each (best of ``--repeats`` passes), then what the ``pil`` and ``device_color`` pipelines leave to
the workers. One compute thread, as in a DataLoader worker. Last, the device part of
``device_color`` (batched jitter + normalisation, ``DeviceImageAugmentation``) on a batch, on the
GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.transforms import v2

import stim_hf.data.transforms as transforms_module
from stim_hf.data.device_augmentation import DeviceImageAugmentation
from stim_hf.data.device_color import COLOR_JITTER_KEY, jitter_parameters
from stim_hf.data.image_datasets import DataArguments
from stim_hf.data.transforms import build_transforms, decode_image, decode_rgb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_pipeline import make_jpegs  # noqa: E402  (bench/data_pipeline.py: the same generated JPEGs)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Steps the device_color pipeline runs on the training device instead of in the workers.
DEVICE_STEPS = (v2.ColorJitter, v2.ToDtype, v2.Normalize)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="batch of the device part's timing")
    parser.add_argument("--cifar-dir", default=None, help="also time decoding the CIFAR-10 parquet's JPEGs")
    parser.add_argument("--json", default=None)
    a = parser.parse_args()
    torch.set_num_threads(1)
    to_rgb_tensor = v2.Compose([v2.RGB(), v2.ToImage()])
    steps = build_transforms(DataArguments(dataset_name="unused", image_size=a.size, augmentation="imagenet"), True)
    with tempfile.TemporaryDirectory() as folder:
        make_jpegs(folder, a.count)
        files = [{"bytes": path.read_bytes(), "path": None} for path in sorted(Path(folder).rglob("*.jpg"))]
    times: dict[str, float] = {}
    for _ in range(a.repeats):
        per_step: dict[str, float] = {}
        for value in files:
            start = time.perf_counter()
            to_rgb_tensor(decode_image(value))  # for comparison: PIL decoding, then RGB + ToImage
            per_step["PIL reference"] = per_step.get("PIL reference", 0.0) + time.perf_counter() - start
            start = time.perf_counter()
            image = decode_rgb(value)
            per_step["decode"] = per_step.get("decode", 0.0) + time.perf_counter() - start
            for step in steps.transforms:
                start = time.perf_counter()
                image = step(image)
                name = type(step).__name__
                per_step[name] = per_step.get(name, 0.0) + time.perf_counter() - start
        for name, seconds in per_step.items():
            times[name] = min(times.get(name, float("inf")), seconds / len(files) * 1e3)
    reference_ms = times.pop("PIL reference")
    decoder = "TorchCodec" if transforms_module._torchcodec_decode is not None else "PIL"
    pipeline_ms = times["decode"] + times["RGB"] + times["ToImage"]
    print(
        f"to an RGB uint8 tensor (decode + RGB + ToImage): {pipeline_ms:.3f} ms/image with {decoder}, "
        f"{reference_ms:.3f} with PIL ({reference_ms / pipeline_ms:.2f}x)"
    )
    device_steps = {step.__name__ for step in DEVICE_STEPS}
    print(f"imagenet preset, {a.size} px training crops of {len(files)} JPEGs (300..500 px), one thread, ms/image")
    for name, ms in times.items():
        where = "device" if name in device_steps else "workers"
        label = f"decode ({decoder})" if name == "decode" else name
        print(f"  {label:<22}{ms:>7.3f}   (device_color: {where})")
    total = sum(times.values())
    workers = sum(ms for name, ms in times.items() if name not in device_steps)
    print(f"pil, in the workers:          {total:.2f} ms/image")
    print(f"device_color, in the workers: {workers:.2f} ms/image ({total / workers:.2f}x the images per worker)")
    if a.cifar_dir:
        cifar_us = cifar_decode_us(a, to_rgb_tensor)
        print(
            f"CIFAR-10 JPEGs (32 px) to an RGB uint8 tensor: {cifar_us[decoder]:.1f} us/image with {decoder}, "
            f"{cifar_us['PIL']:.1f} with PIL ({cifar_us['PIL'] / cifar_us[decoder]:.2f}x)"
        )
    device_ms = device_part_ms(a)
    print(f"device_color, on the {DEVICE.type} for a batch of {a.batch}: {device_ms:.3f} ms/image (jitter + normalise)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"args": vars(a), "decoder": decoder, "pil_to_tensor_ms": reference_ms, "ms_per_image": times,
                 "pil_ms": total, "device_color_ms": workers,
                 "device_part_ms": device_ms, "device": DEVICE.type},
                f, indent=2,
            )  # fmt: skip


def cifar_decode_us(a: argparse.Namespace, to_rgb_tensor: v2.Compose) -> dict[str, float]:
    """us per image to decode the first 2000 CIFAR-10 test PNGs to RGB tensors: the pipelines' way and PIL's."""
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(a.cifar_dir, "test.parquet")).slice(0, 2000)
    values = table.column("img" if "img" in table.column_names else "image").to_pylist()
    decoder = "TorchCodec" if transforms_module._torchcodec_decode is not None else "PIL"
    ways = {decoder: lambda v: to_rgb_tensor(decode_rgb(v)), "PIL": lambda v: to_rgb_tensor(decode_image(v))}
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(a.repeats):  # alternated
        for name, way in ways.items():
            start = time.perf_counter()
            for value in values:
                way(value)
            best[name] = min(best[name], (time.perf_counter() - start) / len(values) * 1e6)
    return best


def device_part_ms(a: argparse.Namespace) -> float:
    """ms per image of device_color's device part (DeviceImageAugmentation on a uint8 batch), best of the repeats."""
    jitter = v2.ColorJitter(0.4, 0.4, 0.4)
    finish = DeviceImageAugmentation((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), padding=0)
    pixels = torch.randint(0, 256, (a.batch, 3, a.size, a.size), dtype=torch.uint8, device=DEVICE)
    params = torch.stack([jitter_parameters(jitter) for _ in range(a.batch)]).to(DEVICE)
    best = float("inf")
    for _ in range(a.repeats + 1):  # the first pass warms up
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        finish({"pixel_values": pixels, COLOR_JITTER_KEY: params})
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best / a.batch * 1e3


if __name__ == "__main__":
    main()
