"""Scoring trained networks: the held-out images, the search over a checkpoint, a sub-network exported and scored on
the test split, and a pick fine-tuned and scored again."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any


def data_arguments(args: argparse.Namespace, with_test: bool, image_size: int = 32, train_file: Path | None = None):
    """CIFAR-10 as the recipes load it (at ``image_size``: a network trained at S px sees its images as its training
    did; ``train_file``: the images a plan with a fixed split trains on, default the whole training split); the test
    split only where a figure is meant to be a test figure."""
    from stim_hf.data.image_datasets import DataArguments

    return DataArguments(
        train_file=str(train_file or args.data_dir / "train.parquet"),
        validation_file=str(args.data_dir / "test.parquet") if with_test else None,
        max_eval_samples=args.test_samples or None,
        image_size=image_size,
        augmentation="cifar",
    )


_TEST_SPLIT: dict[str, Any] = {}


def test_batches(args: argparse.Namespace, image_size: int = 32) -> tuple[list[Any], Any]:
    """The test split with the evaluation transforms at ``image_size``, decoded once per process and size: (image
    batches, labels). Every export here takes it as ``pipeline()`` would: a CIFAR ResNet at a smaller input resizes it
    itself (``resize_input_to``), so one decoding at 32 px serves every input size of a network trained at 32 px; a
    network trained at S px ships an image processor at S, which these batches at S reproduce."""
    if image_size not in _TEST_SPLIT:
        import torch

        from stim_hf.data.image_datasets import load_image_datasets
        from stim_hf.data.transforms import with_image_transforms

        data = data_arguments(args, with_test=True, image_size=image_size)
        split = with_image_transforms(load_image_datasets(data, seed=42)["validation"], data, train=False)
        images = torch.stack([row["pixel_values"] for row in split])
        labels = torch.tensor(split.with_format(None)[data.label_column_name])
        _TEST_SPLIT[image_size] = list(images.split(500)), labels
    return _TEST_SPLIT[image_size]


def test_top1(
    checkpoint: Path,
    depths,
    input_size: int,
    args: argparse.Namespace,
    image_size: int = 32,
    train_file: Path | None = None,
) -> float:
    """Top-1 (%) on the test split of a sub-network, exported with re-estimated BatchNorm statistics (what the export's
    own ``--evaluate`` measures, on images decoded once); ``image_size``: the size the network trained at,
    ``train_file``: the images its statistics are re-estimated on (default: the training split)."""
    import torch

    from stim_hf.tools.export import export_subnet

    with tempfile.TemporaryDirectory() as out:
        model = export_subnet(
            str(checkpoint),
            list(depths),
            Path(out) / "export",
            recalibrate_bn=args.recalibrate_bn,
            data_args=data_arguments(args, with_test=True, image_size=image_size, train_file=train_file),
            seed=42,
            input_size=input_size,
        )
        info = json.loads((Path(out) / "export" / "export_info.json").read_text())
    if info["input_resized_by"] == "image processor":
        raise SystemExit(f"{checkpoint}: its export resizes in the image processor; score it with --evaluate instead")
    batches, labels = test_batches(args, image_size)
    with torch.no_grad():
        predicted = torch.cat([model(pixel_values=batch).logits.argmax(-1) for batch in batches])
    return round(100 * (predicted == labels).float().mean().item(), 2)


class TestScores:
    """Test top-1 of (checkpoint, depths, size), each exported and scored once per seed, with a line each.

    Kept in ``path`` (JSON, written after every score) so that a rerun with other budgets (``--redo``) scores only
    what it has not scored before.
    """

    def __init__(self, args: argparse.Namespace, path: Path) -> None:
        self.args, self.path = args, path
        self.scored: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def __call__(self, label: str, folder: Path, candidate, reference_flops: int) -> dict[str, Any]:
        depths = ",".join(map(str, candidate.depths))
        key = f"{folder.name} {depths} @{candidate.input_size}"
        if key not in self.scored:
            self.scored[key] = test_top1(folder, candidate.depths, candidate.input_size, self.args)
            print(f"  {label} {depths} @{candidate.input_size}: test top-1 {self.scored[key]}", flush=True)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.scored, indent=1, sort_keys=True) + "\n")
        return {
            "network": label,
            "depths": list(candidate.depths),
            "input_size": candidate.input_size,
            "flops": candidate.flops,
            "flop_share": round(candidate.flops / reference_flops, 4),
            "heldout_top1": round(100 * candidate.accuracy, 2),
            "test_top1": self.scored[key],
        }


def best_within(candidates: list[tuple[str, Any]], limit: float) -> tuple[str, Any] | None:
    """The most accurate (label, candidate) on the held-out images with FLOPs within ``limit`` (ties: the cheaper):
    the search's own rule for a pick (:func:`stim_hf.tools.search.pick_candidate`)."""
    from stim_hf.tools.search import pick_candidate

    within = [(label, c) for label, c in candidates if c.flops <= limit * (1 + 1e-9)]
    chosen = pick_candidate([c for _, c in within])
    return next(((label, c) for label, c in within if c is chosen), None)


def heldout_file(seed: int, train_samples: int | None, args: argparse.Namespace) -> Path:
    """``--holdout-samples`` images of the training split that none of the seed's networks trained on, as a parquet
    file in the study folder (outside the project), written once.

    The seed's runs all trained on the same seeded subset of ``train_samples`` images; the search scores every
    candidate on images outside it, so that a pick is not favoured for having seen its held-out images."""
    import numpy as np
    from datasets import load_dataset

    from stim_hf.data.image_datasets import ROW_INDEX_COLUMN, DataArguments, load_image_datasets

    path = args.study / f"heldout_seed{seed}_{args.holdout_samples}.parquet"
    if path.is_file():
        return path
    source = args.data_dir / "train.parquet"
    raw = load_dataset("parquet", data_files=str(source), split="train")
    if train_samples is None or train_samples + args.holdout_samples > len(raw):
        raise SystemExit(
            f"seed {seed}: the runs trained on {train_samples or len(raw):,} of the {len(raw):,} training images, "
            f"which leaves fewer than --holdout-samples {args.holdout_samples:,} unseen ones to pick on"
        )
    trained = load_image_datasets(
        DataArguments(train_file=str(source), validation_file=str(args.data_dir / "test.parquet"),
                      max_train_samples=train_samples), seed=seed,
    )["train"]  # fmt: skip
    seen = set(trained[ROW_INDEX_COLUMN])
    assert len(seen) == train_samples, "the training runs' subset was not reproduced"
    unseen = np.array([row for row in range(len(raw)) if row not in seen])
    rows = np.sort(np.random.default_rng(seed).choice(unseen, args.holdout_samples, replace=False))
    partial = path.with_suffix(".partial")
    raw.select(rows.tolist()).to_parquet(str(partial))
    partial.replace(path)
    return path


def search(
    folders: dict[str, Path],
    sample_space: str,
    out: Path,
    heldout: Path,
    args: argparse.Namespace,
    image_size: int = 32,
    input_sizes: str | None = None,
    train_file: Path | None = None,
    holdout_samples: int | None = None,
):
    """One exhaustive search, without a budget, over ``folders`` (label -> checkpoint); writes ``pareto.*``.

    Candidates are scored on the ``heldout`` images (unseen training-split images, :func:`heldout_file`), loaded at
    ``image_size``, at ``input_sizes`` (default ``--input-sizes``) with BatchNorm re-estimated on training images."""
    from stim_hf.tools.search import SearchArguments, search_subnets

    data = dataclasses.replace(
        data_arguments(args, with_test=False, image_size=image_size, train_file=train_file),
        validation_file=str(heldout),
        max_eval_samples=None,
    )
    return search_subnets(
        [str(folder) for folder in folders.values()],
        data,
        SearchArguments(
            sampling="prefix",
            sample_space=sample_space,
            input_sizes=input_sizes or args.input_sizes,
            labels=list(folders),
            score_split="validation",
            holdout_samples=holdout_samples or args.holdout_samples,
            recalibrate_bn=args.search_recalibrate_bn,
            halving_rounds=1,  # every candidate on all the held-out images
            latency="none",  # a shared CPU's latencies say little; FLOPs are the budget here
            device="cpu",
            output_dir=str(out),
            overwrite=True,
            progress=False,
        ),
    )


def finetune_pick(checkpoint: Path, pick: dict[str, Any], epochs: int, train: dict[str, Any], args) -> dict[str, Any]:
    """Export ``pick`` as :func:`test_top1` does, fine-tune it ``epochs`` epochs towards ``checkpoint`` on the images
    that network was trained on (``train``: its study result: the seeded subset of ``train_samples`` images, or a
    fixed split's ``train_file``), and score it on the test split before and after."""
    from stim_hf.tools.export import export_subnet
    from stim_hf.tools.finetune import finetune_export
    from stim_hf.tools.finetune_config import FinetuneArguments

    train_file = checkpoint.parent / train["train_file"] if train.get("train_file") else None
    # The training run's seeded subset: the same seed picks it again (a fixed split: all of its training part).
    data = dataclasses.replace(
        data_arguments(args, with_test=True, train_file=train_file), max_train_samples=train["train_samples"]
    )
    with tempfile.TemporaryDirectory() as out:
        export = Path(out) / "export"
        export_subnet(
            str(checkpoint),
            list(pick["depths"]),
            export,
            recalibrate_bn=args.recalibrate_bn,
            data_args=data_arguments(args, with_test=True, train_file=train_file),
            seed=42,
            input_size=pick["input_size"],
        )
        finetune = FinetuneArguments(
            epochs=epochs, seed=train["seed"], device="cpu", recalibrate_bn=args.recalibrate_bn, logging_steps=10**6
        )
        record = finetune_export(export, data, finetune).record
    return {
        "depths": list(pick["depths"]),
        "input_size": pick["input_size"],
        "flop_share": pick["flop_share"],
        "epochs": epochs,
        "train_samples": record["train_samples"],
        "learning_rate": record["learning_rate"],
        "test_top1_before": round(100 * record["before"]["accuracy"], 2),
        "test_top1_after": round(100 * record["after"]["accuracy"], 2),
        "train_minutes": round(record["train_seconds"] / 60, 2),
        "minutes": round(record["seconds"] / 60, 2),
    }
