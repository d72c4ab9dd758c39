"""Data pipeline: can the `datasets` image pipeline feed stimulative training without the model waiting?

  python bench/performance/data_pipeline.py                                   # CPU: CIFAR-10 parquet + 224 px JPEGs
  python bench/performance/data_pipeline.py --cifar-dir shared/data/cifar10 --warmup 30 --steps 150 --jpeg-workers 0,8 \
      --jpeg-count 1600 --jpeg-batch 64                                  # on a GPU machine (bench/performance/gpu_check.sh)

Three measurements, each printed as a table and written to JSON with --json:

1. Pipeline alone: images/s out of the Trainer's own training DataLoader (decode + augment +
   collate, the recipe's ``dataloader_num_workers``, moved to the device and finished by the
   trainer's ``batch_transform``), for CIFAR-10 parquet with both image pipelines ('pil':
   torchvision per image in the workers; 'predecoded': decoded once, crop / flip / normalise on
   the device in batch), and for 224 px ImageNet-style JPEGs (generated, ``imagenet`` preset) at
   several worker counts, with 'pil' and 'device_color' (colour jitter and normalisation on the
   device in batch).
2. CIFAR-10 ResNet-56, ST++ (K = --num-subnets), batch 128, through StimulativeTrainer.train():
   throughput with pre-made tensors in memory, then end to end with each pipeline. Target
   (issue 6): end to end >= 0.9 x pre-made.
3. For the JPEGs: the ResNet-50 (224 px) training step throughput on a device-resident batch
   (bench/performance/step_cost.py), to say how many workers the JPEG pipeline needs to keep up.

The CIFAR parquet files are read from --cifar-dir (the project's shared data folder); the JPEGs are
written to a temporary folder. The one-off decoding of the 'predecoded' pipeline is timed cold
(fresh datasets cache) and reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

import stim_hf.data.transforms as transforms_module
from stim_hf import StimulativeTrainer, StimulativeTrainingArguments
from stim_hf.cli.train import pipeline_batch_transform, with_pipeline_transforms
from stim_hf.data.image_datasets import DataArguments, load_image_datasets
from stim_hf.data.transforms import collate_image_batch
from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import framework_overhead  # noqa: E402  (bench/performance/framework_overhead.py: in-memory tensors, the step timer)
import step_cost  # noqa: E402  (bench/performance/step_cost.py: the model step on a device-resident batch)


def training_args(a: argparse.Namespace, workers: int, max_steps: int) -> StimulativeTrainingArguments:
    """The benchmark's Trainer settings: the recipe's ST++ and optimiser, no saving, no evaluation."""
    cuda = torch.cuda.is_available()
    return StimulativeTrainingArguments(
        output_dir=os.path.join(tempfile.gettempdir(), "bench_data_pipeline"), stim_method="stpp",
        num_subnets=a.num_subnets, per_device_train_batch_size=a.batch, max_steps=max_steps, learning_rate=0.05,
        optim="sgd", lr_scheduler_type="constant", report_to="none", save_strategy="no", logging_steps=10**6,
        disable_tqdm=True, use_cpu=not cuda, bf16=cuda, channels_last=cuda, dataloader_num_workers=workers,
        num_eval_subnets=0, seed=0,
    )  # fmt: skip


def cifar_model(depth: int) -> CifarResNetForImageClassification:
    """A randomly initialised CIFAR ResNet (same weights every call)."""
    torch.manual_seed(0)
    return CifarResNetForImageClassification(CifarResNetConfig(depth=depth, num_labels=10))


def cifar_data_args(a: argparse.Namespace, pipeline: str, cache_dir: str) -> DataArguments:
    """The CIFAR-10 recipe's data settings with the given image pipeline."""
    return DataArguments(
        train_file=os.path.join(a.cifar_dir, "train.parquet"),
        validation_file=os.path.join(a.cifar_dir, "test.parquet"),
        image_size=32, augmentation="cifar", image_pipeline=pipeline, dataset_cache_dir=cache_dir,
        preprocessing_num_workers=a.workers or None,
    )  # fmt: skip


def pipeline_dataset(data_args: DataArguments, splits):  # noqa: ANN001
    """(training dataset, batch_transform, seconds to prepare it) for ``data_args``' pipeline (the job's own code)."""
    start = time.perf_counter()
    dataset = with_pipeline_transforms(splits["train"], data_args, train=True)
    return dataset, pipeline_batch_transform(data_args), time.perf_counter() - start


def loader_throughput(trainer: StimulativeTrainer, batches: int, skip: int) -> float:
    """Images/s out of the trainer's training DataLoader, batches moved to the device and finished.

    Timed from batch ``skip`` on; with ``skip=0`` from the creation of the loader's iterator, so
    the start of its worker processes is included.
    """
    seen, start = 0, time.perf_counter()
    for index, batch in enumerate(trainer.get_train_dataloader()):
        batch = trainer._prepare_inputs(batch)
        if index < skip:
            if index == skip - 1:  # the clock starts before batch `skip` is fetched
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                start = time.perf_counter()
            continue
        seen += len(batch["labels"])
        if index + 1 == skip + batches:
            break
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def train_throughput(a: argparse.Namespace, dataset: Dataset, batch_transform, workers: int) -> tuple[float, float]:  # noqa: ANN001
    """(images/s, data_wait_fraction) of StimulativeTrainer.train() on ``dataset`` over the steps after ``--warmup``.

    The data wait fraction is the trainer's own (logged with every loss): the share of those steps' host time
    spent waiting for batches, measured within the run, so unlike a ratio of two runs no machine noise between
    runs enters it. ``1 - fraction`` estimates end to end / pre-made from this one run.
    """
    timer = framework_overhead.StepTimer(a.warmup)
    trainer = StimulativeTrainer(
        model=cifar_model(a.depth), args=training_args(a, workers, a.warmup + a.steps), train_dataset=dataset,
        data_collator=collate_image_batch, batch_transform=batch_transform, callbacks=[timer],
    )  # fmt: skip
    timer.pace = trainer.pace
    trainer.train()  # no training log inside the run (logging_steps), so the pace clocks run on to its end
    wait = trainer.pace.data_wait_s - timer.pace_at_start[0]
    step = trainer.pace.step_s - timer.pace_at_start[1]
    return a.steps * a.batch / (timer.end - timer.start), (wait / step if step > 0 else 0.0)


def make_jpegs(folder: str, count: int, classes: int = 10) -> None:
    """``count`` ImageNet-like JPEGs (crops of 300..500 px of a smooth textured field + noise) in class subfolders."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:640, 0:640] / 640
    field = np.stack([np.sin(9 * xx + c) * np.cos(7 * yy * (c + 1)) for c in range(3)], -1)
    texture = (127 + 90 * field + rng.normal(0, 20, field.shape)).clip(0, 255).astype(np.uint8)
    for i in range(count):
        height, width = int(rng.integers(300, 501)), int(rng.integers(300, 501))
        top, left = int(rng.integers(0, 641 - height)), int(rng.integers(0, 641 - width))
        crop = texture[top : top + height, left : left + width]
        target = os.path.join(folder, f"class_{i % classes}")
        os.makedirs(target, exist_ok=True)
        PIL.Image.fromarray(np.roll(crop, i % 3, axis=-1)).save(os.path.join(target, f"{i:05d}.jpg"), quality=90)


def measure_cifar(a: argparse.Namespace, device: str) -> dict:
    """CIFAR-10: each pipeline alone, then ResNet-56 ST++ training with pre-made tensors and end to end."""
    with tempfile.TemporaryDirectory() as cache_dir:
        # -- CIFAR-10: pipeline alone ---------------------------------------------------------------
        splits = load_image_datasets(cifar_data_args(a, "pil", cache_dir), seed=0)
        cifar: dict = {}
        for pipeline in ("pil", "predecoded"):
            data_args = cifar_data_args(a, pipeline, cache_dir)
            dataset, transform, decode_s = pipeline_dataset(data_args, splits)
            trainer = StimulativeTrainer(
                model=cifar_model(20), args=training_args(a, a.workers, 1), train_dataset=dataset,
                data_collator=collate_image_batch, batch_transform=transform,
            )  # fmt: skip
            rate = loader_throughput(trainer, a.loader_batches, skip=3)
            cifar[pipeline] = {"dataset": dataset, "transform": transform, "loader_images_per_s": rate}
            cifar[pipeline]["decode_once_s"] = decode_s

        # -- CIFAR-10 ResNet-56 ST++: pre-made tensors vs end to end --------------------------------
        # Alternated repeats, best of each: machine noise and one-off kernel creation (a CPU's oneDNN
        # creates kernels per input size, once per process) hit every configuration alike.
        premade = framework_overhead.InMemory((a.warmup + a.steps) * a.batch, 32)
        runs: dict[str, list[float]] = {"pre-made tensors": [], "end to end, pil": [], "end to end, predecoded": []}
        waits: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(a.repeats):
            for name, dataset, transform, workers in [("pre-made tensors", premade, None, 0)] + [
                (f"end to end, {p}", cifar[p]["dataset"], cifar[p]["transform"], a.workers)
                for p in ("pil", "predecoded")
            ]:
                rate, wait = train_throughput(a, dataset, transform, workers)
                runs[name].append(rate)
                waits[name].append(wait)
        rows = {name: max(rates) for name, rates in runs.items()}

    print(f"\nCIFAR-10 parquet, batch {a.batch}, {a.workers} workers, {device}")
    print(f"{'pipeline':<12}{'images/s (pipeline alone)':>28}{'one-off decoding':>20}")
    for pipeline in ("pil", "predecoded"):
        c = cifar[pipeline]
        print(f"{pipeline:<12}{c['loader_images_per_s']:>28.0f}{c['decode_once_s']:>19.1f}s")
    reference = rows["pre-made tensors"]
    print(f"\nResNet-{a.depth}, ST++ K={a.num_subnets}, StimulativeTrainer.train()")
    print(f"{'data':<28}{'images/s':>10}{'/ pre-made':>12}   runs (data_wait_fraction)")
    for name, rate in rows.items():
        each = ", ".join(f"{r:.1f} ({w:.3f})" for r, w in zip(runs[name], waits[name], strict=True))
        print(f"{name:<28}{rate:>10.1f}{rate / reference:>12.3f}   {each}")
    return {
        "pipeline_alone": {
            p: {k: v for k, v in c.items() if k not in ("dataset", "transform")} for p, c in cifar.items()
        },
        "training_images_per_s": rows,
        "training_runs": runs,
        "training_data_wait_fraction": waits,
        "ratio_to_premade": {k: v / reference for k, v in rows.items()},
    }


# 'device_color, workers only': the same loader without the device's jitter + normalisation, i.e. what the
# workers deliver; on a GPU machine the device's part costs little, on a CPU it runs in the training process.
JPEG_PIPELINES = ("pil", "device_color", "device_color, workers only")


def measure_jpegs(a: argparse.Namespace, device: str) -> dict:
    """224 px JPEGs through each pipeline and worker count, against ResNet-50's training step."""
    cuda = torch.cuda.is_available()
    jpeg: dict = {pipeline: {} for pipeline in JPEG_PIPELINES}
    with tempfile.TemporaryDirectory() as folder:
        make_jpegs(folder, a.jpeg_count)
        views = {}  # each pipeline's training view and batch_transform, built once over the same split
        splits = None
        for pipeline in JPEG_PIPELINES:
            data_args = DataArguments(
                train_dir=folder, image_size=224, augmentation="imagenet", train_val_split=0.1,
                image_pipeline=pipeline.split(",")[0],
            )  # fmt: skip
            splits = splits or load_image_datasets(data_args, seed=0)
            dataset, transform, _ = pipeline_dataset(data_args, splits)
            views[pipeline] = dataset, None if pipeline.endswith("workers only") else transform
        for _ in range(a.jpeg_repeats):  # alternated, best of each
            for workers in [int(w) for w in a.jpeg_workers.split(",")]:
                for pipeline, (dataset, transform) in views.items():
                    args = training_args(a, workers, 1)
                    args.per_device_train_batch_size = a.jpeg_batch
                    trainer = StimulativeTrainer(
                        model=cifar_model(20), args=args, train_dataset=dataset, data_collator=collate_image_batch,
                        batch_transform=transform,
                    )  # fmt: skip
                    # In one process: steady state after 2 batches. With workers: the whole pass over the
                    # images from the loader's start (prefetching would flatter a partial pass).
                    batches = len(dataset) // a.jpeg_batch
                    rate = (
                        loader_throughput(trainer, batches - 2, 2)
                        if workers == 0
                        else loader_throughput(trainer, batches, 0)
                    )
                    jpeg[pipeline][workers] = max(rate, jpeg[pipeline].get(workers, 0.0))
    step_args = argparse.Namespace(
        model="resnet50", tiny=False, batch=a.resnet50_batch or (128 if cuda else 16), image_size=224,
        steps=10 if cuda else 3, warmup=5 if cuda else 2, fp32=False,
    )  # fmt: skip
    target = torch.device("cuda" if cuda else "cpu")
    model_rates = {
        name: step_cost.measure(name, step_cost.CONFIGS[name], step_args, target)["images_per_s"]
        for name in ("CT", "ST++ K=6")
    } if not a.skip_model else {}  # fmt: skip
    print(f"\n224 px JPEGs (imagenet preset: decode + random resized crop + flip + colour jitter), {device}")
    print(f"{'pipeline':<28}{'workers':>8}{'images/s':>10}{'images/s per worker':>22}")
    for pipeline, rates in jpeg.items():
        for workers, rate in rates.items():
            print(f"{pipeline:<28}{workers:>8}{rate:>10.0f}{rate / workers if workers else rate:>22.0f}")
    for pipeline, rates in jpeg.items():
        per_worker = rates[0] if 0 in rates else max(rate / max(workers, 1) for workers, rate in rates.items())
        for name, rate in model_rates.items():
            print(
                f"ResNet-50 {name} at 224 px, batch {step_args.batch}, device-resident batch: {rate:.0f} images/s "
                f"-> needs about {rate / per_worker:.2f} cores of '{pipeline}' decoding"
            )
    return {"loader_images_per_s": jpeg, "resnet50_images_per_s": model_rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar-dir", default=os.path.join(os.path.dirname(__file__), "../../../shared/data/cifar10"))
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--num-subnets", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="dataloader_num_workers (the CIFAR recipe's: 2)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="alternated repeats of the training runs (best kept)")
    parser.add_argument("--loader-batches", type=int, default=60, help="batches timed in the pipeline-only runs")
    parser.add_argument("--jpeg-count", type=int, default=400)
    parser.add_argument(
        "--jpeg-workers", default="0,2", help="worker counts for the 224 px JPEG pipeline (0: in the main process)"
    )
    parser.add_argument("--jpeg-batch", type=int, default=32)
    parser.add_argument("--jpeg-repeats", type=int, default=1, help="alternated repeats of the JPEG runs (best kept)")
    parser.add_argument("--resnet50-batch", type=int, default=None, help="default: 128 on a GPU, 16 on a CPU")
    parser.add_argument("--skip-cifar", action="store_true")
    parser.add_argument("--skip-jpeg", action="store_true")
    parser.add_argument("--skip-model", action="store_true", help="no ResNet-50 step next to the JPEG pipelines")
    parser.add_argument("--pil-decoder", action="store_true", help="decode with PIL even where TorchCodec is installed")
    parser.add_argument("--json", default=None)
    a = parser.parse_args()
    if a.pil_decoder:
        transforms_module._torchcodec_decode = None  # the loader's worker processes fork with it
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    result: dict = {"device": device, "args": vars(a)}
    if not a.skip_cifar:
        result["cifar"] = measure_cifar(a, device)
    if not a.skip_jpeg:
        result["jpeg"] = measure_jpegs(a, device)
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
