"""The payoff of ST++ for deployment: one training's searched sub-networks against networks trained alone (issues 30, 41).

The fair front (issue 41, ``--front fair``, the default):

  # the trainings: ResNet-20, -14 and -8 at the random sizes ST++ draws for its sub-networks, the dedicated-size
  # trainings, then today's recipe (lambda 2); resumable, run it again to go on
  python bench/full_network_study.py --plan payoff_fair --out ~/stim_hf_study/payoff_fair --parallel 2
  # score every finished training that has no record yet, then write the report from the committed records
  python bench/subnet_payoff.py --study ~/stim_hf_study/payoff_fair
  # the report alone, from the records (a new machine, no run folders)
  python bench/subnet_payoff.py

Each training is scored once, as soon as it has finished (:func:`score_network`): searched on the seed's held-out
images, its held-out front exported and scored on the test split, and kept as ``networks/seed*/RUN.json`` in
``--report-dir``, to be committed at once. The 32-px trainings and the lambda-5 ST++ of issue 30 enter from their
``seed*/payoff.json``. Per seed and budget, ST++'s pick is set against the pick of every network trained alone (at
32 px, at random sizes, at a dedicated size), and, to name what changed, against the 32-px trainings alone; the
dedicated-size check compares each dedicated training with the random-size one at its size. Writes
``fair/results.json``, ``fair/results.md`` and ``fair/payoff.png``.

The first lever where ST++ falls short of the bar (issue 41), screened on seed 1 first:

  # fine-tune ST++'s picks 5 and 10 epochs at every budget where it misses the bar, seed 1; kept (committed) as
  # finetune/seed1/RUN.json, reported beside the picks and in the cost table
  python bench/subnet_payoff.py --study ~/stim_hf_study/payoff_fair --finetune-epochs 5,10 \
      --finetune-budgets behind --finetune-seeds 1
  # both data sizes side by side (by_data_size.md and .png), from the 5k and the full-data fair reports alone
  python bench/subnet_payoff.py --data-sizes docs/measurements/subnet_payoff,docs/measurements/subnet_payoff/full

Issue 30's search of the payoff plan's four runs per seed (``--front 32px``):

  # the checkpoints, per seed: ST++ (lambda 5, plain KL, cosine_up) and CT ResNet-20 side by side, then ResNet-14
  # and ResNet-8 as CT
  python bench/full_network_study.py --plan payoff --out ~/stim_hf_study/payoff --parallel 2
  # the benchmark (every seed whose four runs have finished; run it again as more finish)
  python bench/subnet_payoff.py --study ~/stim_hf_study/payoff

Per seed, all checkpoints trained on the same 5,000 CIFAR-10 images for the same epochs and schedule:

1. **The trained-once fronts.** One ``stim_hf.tools.search.search_subnets`` over the CT and the ST++ ResNet-20:
   every prefix sub-network (27 depth combinations) at each of ``--input-sizes`` (the sizes ST++ trains on), each
   with its BatchNorm statistics re-estimated at its size on ``--search-recalibrate-bn`` (2,000) training images
   and scored on ``--holdout-samples`` (2,000) held-out **training** images (never the test split): images of the
   training split outside the seed's 5,000, which none of its networks trained on (``heldout_seed*.parquet`` in
   the study folder). No budget:
   the search enumerates every candidate once, and each budget's pick is read off that table.
2. **The from-scratch front.** The same search over the ResNet-20 (CT), ResNet-14 and ResNet-8 trained from
   scratch, each as a whole network (sample space 0,0,0) at the same input sizes with BatchNorm re-estimated at
   each size: the knob ST++'s candidates get. The front is the union over the three trainings.
3. **The picks.** At each of ``--budgets`` (shares of the ResNet-20's FLOPs at 32 px), the most accurate
   candidate on the held-out images within the budget, for ST++, for CT and for the from-scratch union (ties: the
   cheaper). Each pick, every member of each accuracy-FLOPs front and every from-scratch point is exported with
   ``stim_hf.tools.export.export_subnet`` (BatchNorm re-estimated on ``--recalibrate-bn`` training images at its
   input size) and scored on the whole test split.
4. **Fine-tuning** (``--finetune-epochs 5,10``): ST++'s pick at ``--finetune-budgets`` (default: the two budgets
   where ST++'s lead over the from-scratch pick is smallest in the mean over the seeds scored) is exported as in 3,
   fine-tuned for each number of epochs with ``stim-hf finetune``'s defaults (KL from its frozen ResNet-20, on the
   training images that network was trained on) and scored on the test split before and after; its minutes join the
   cost.
5. **The cost.** Each training's minutes (from the study's ``result.json``: the logged pace, and the wall clock
   of the runs, two at a time) and each search's seconds: one ST++ training plus its search against the three
   dedicated trainings plus theirs.

Writes ``results.json`` (every figure; checkpoints keyed by their study setting, the payoff plan's ST++ setting
marked), ``results.md`` (the budget table over seeds with the paired difference, per-seed tables, fronts, cost) and
``payoff.png`` (per seed: the fronts on the test split and the picks; last panel: the picks against the budget, mean
and std over seeds) to ``--report-dir`` (default ``docs/measurements/subnet_payoff``). A seed scored before is read
from its ``seed*/payoff.json`` there, with or without the study's run folders (``--redo`` scores it again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_name, "1")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data" / "cifar10"
# The ST++ the payoff plan trains, as the study names it: lambda 5, plain KL, cosine_up, the 5k study's pick
# (docs/results.md 2) and the CIFAR ST++ recipes' setting until section 2b moved them to lambda 2.
PAYOFF_ST_SETTING = "stpp_l5_kl_cosine_up"
CT_SETTING = "ct"
# The networks trained from scratch, by the study's setting names (the payoff plan's other depths).
SCRATCH = {"ResNet-20": "ct", "ResNet-14": "ct_r14", "ResNet-8": "ct_r8"}
# FLOPs budgets: shares of the ResNet-20 at 32 px, or a from-scratch network's FLOPs at 32 px by its name (ResNet-14:
# 65.3 %, so that the ResNet-14 itself is within its budget).
BUDGETS = "0.10,0.25,0.50,ResNet-14,1.00"
SCRATCH_LABEL = "from scratch"


def finished(folder: Path) -> dict[str, Any] | None:
    """The study's ``result.json`` of a finished run, or None."""
    path = folder / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


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


def finetune_budgets(records: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The budgets to fine-tune at: ``--finetune-budgets`` by name; ``shortest``: the two where ST++ leads the
    from-scratch pick least in the mean; ``behind``: every budget where it does not meet the bar (:func:`bar_verdict`
    is not ``lead``), the budgets issue 41's levers are for."""
    names = [b["budget_name"] for b in records[0]["budgets"]]
    if args.finetune_budgets not in ("shortest", "behind"):
        wanted = args.finetune_budgets.split(",")
        unknown = [name for name in wanted if name not in names]
        if unknown:
            raise SystemExit(f"--finetune-budgets {','.join(unknown)}: not among --budgets {','.join(names)}")
        return wanted
    diffs = {}
    for i, name in enumerate(names):
        diffs[name] = [a - b for a, b in _paired_top1(records, i, "ST++", SCRATCH_LABEL)]
    if args.finetune_budgets == "behind":
        return [name for name in names if diffs[name] and bar_verdict(diffs[name]) != "lead"]
    lead = {name: statistics.mean(d) if d else float("inf") for name, d in diffs.items()}
    return sorted(names, key=lambda name: lead[name])[:2]


def add_finetuning(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Attach each seed's fine-tuned ST++ picks (kept per seed in ``finetune.json``) to its budgets; with
    ``--finetune-epochs``, first fine-tune the picks at the chosen budgets that have not been fine-tuned yet."""
    epochs = [int(e) for e in args.finetune_epochs.split(",") if e.strip()]
    budgets = finetune_budgets(records, args) if epochs else []
    if epochs:
        print(f"fine-tuning ST++'s picks at budgets {', '.join(budgets)} for {epochs} epochs", flush=True)
    for r in records:
        folder = args.study / f"{r['st_setting']}_seed{r['seed']}" if args.study is not None else None
        finetune_seed(r, folder, args.report_dir / f"seed{r['seed']}" / "finetune.json", budgets, epochs, args)


def finetune_seed(
    record: dict[str, Any], folder: Path | None, path: Path, budgets: list[str], epochs: list[int], args
) -> None:
    """One seed's fine-tuned ST++ picks, kept in ``path`` (JSON, written after each): fine-tune the picks at
    ``budgets`` for each of ``epochs`` that ``path`` does not hold yet (from the ST++ run in ``folder``), then attach
    every one held to the budgets whose pick it is (``finetuned``: epochs -> entry)."""
    done: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    picks = [(b, b["picks"]["ST++"]) for b in record["budgets"] if b["picks"]["ST++"] is not None]
    for budget, pick in picks:
        for n in epochs if budget["budget_name"] in budgets else []:
            key = f"{_shape_key(pick)} {n} epochs"
            if key in done:
                continue
            train = finished(folder) if folder is not None else None
            if train is None:
                raise SystemExit(f"{folder}: no finished ST++ run to fine-tune from; give the study's --study")
            done[key] = entry = finetune_pick(folder, pick, n, train, args)
            print(
                f"  seed {record['seed']}, {key}: test top-1 {entry['test_top1_before']} -> "
                f"{entry['test_top1_after']} ({entry['minutes']} min)",
                flush=True,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(done, indent=1, sort_keys=True) + "\n")
    for budget, pick in picks:  # a pick fine-tuned at one budget is the same network at every budget it wins
        prefix = _shape_key(pick) + " "
        finetuned = {k[len(prefix) :].split()[0]: v for k, v in done.items() if k.startswith(prefix)}
        if finetuned:
            budget["finetuned"] = dict(sorted(finetuned.items(), key=lambda item: int(item[0])))


def _shape_key(pick: dict[str, Any]) -> str:
    return f"{','.join(map(str, pick['depths']))} @{pick['input_size']}"


def cost_fields(result: dict[str, Any]) -> dict[str, Any]:
    """A training's cost as the study recorded it."""
    return {key: result.get(key) for key in ("train_minutes", "wall_minutes", "images_per_second")}


def payoff_for_seed(seed: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """Search, pick, export and score one seed's checkpoints (or read the seed's record, written before); None if one
    of its runs has not finished."""
    from stim_hf.analysis.pareto import pareto_front

    cache = args.report_dir / f"seed{seed}" / "payoff.json"
    if cache.is_file() and not args.redo:
        # A seed's record stands without its run folders, so the report can be written again on a new machine.
        record = json.loads(cache.read_text())
        if record["st_setting"] != args.st_setting:
            raise SystemExit(
                f"{cache} holds the search of {record['st_setting']}, not of --st-setting {args.st_setting}: give "
                "another --report-dir for that setting (or --redo to replace this one)"
            )
        return record
    trained = {"ST++": args.st_setting, "CT": CT_SETTING}
    settings = {**trained, **SCRATCH}
    folders = {label: args.study / f"{name}_seed{seed}" for label, name in settings.items()}
    results = {label: finished(folder) for label, folder in folders.items()}
    if any(result is None for result in results.values()):
        return None
    start = time.perf_counter()
    seed_dir = args.report_dir / f"seed{seed}"
    heldout = heldout_file(seed, results["ST++"].get("train_samples"), args)
    subnets = search({label: folders[label] for label in trained}, "full", seed_dir / "search", heldout, args)
    scratch = search({label: folders[label] for label in SCRATCH}, "0,0,0", seed_dir / "search_scratch", heldout, args)
    search_seconds = {
        c.label: round(c.timing.get("total", 0.0), 1) for c in [*subnets.checkpoints, *scratch.checkpoints]
    }
    reference = next(c for c in subnets.checkpoints if c.label == "ST++").full_flops
    score = TestScores(args, seed_dir / "test_scores.json")
    scratch_flops = {c.label: c.full_flops for c in scratch.checkpoints}

    pools = {c.label: [(c.label, x) for x in c.candidates] for c in subnets.checkpoints}
    pools[SCRATCH_LABEL] = [(c.label, x) for c in scratch.checkpoints for x in c.candidates]
    budgets = []
    for budget in args.budgets.split(","):
        share = scratch_flops[budget] / reference if budget in scratch_flops else float(budget)
        picks = {}
        for label, pool in pools.items():
            best = best_within(pool, share * reference)
            picks[label] = None if best is None else score(best[0], folders[best[0]], best[1], reference)
        budgets.append({"budget": round(share, 4), "budget_name": budget, "picks": picks})

    checkpoints = {}
    for c in subnets.checkpoints:
        front = sorted((x for x in c.candidates if x.pareto_flops), key=lambda x: x.flops)
        checkpoints[settings[c.label]] = {
            "label": c.label,
            "recipe": settings[c.label] == PAYOFF_ST_SETTING,
            "full_test_top1": results[c.label]["full_top1"],
            "search_seconds": search_seconds[c.label],
            **cost_fields(results[c.label]),
            "front": [score(c.label, folders[c.label], x, reference) for x in front],
        }
    points = [score(label, folders[label], x, reference) for label, x in pools[SCRATCH_LABEL]]
    on_front = set(pareto_front([p["flops"] for p in points], [p["heldout_top1"] for p in points]))
    for i, point in enumerate(points):
        point["on_front"] = i in on_front
    for label, name in SCRATCH.items():
        checkpoints.setdefault(name, {"label": label, "recipe": False})
        checkpoints[name] |= {
            "scratch_label": label,
            "full_test_top1": results[label]["full_top1"],
            "scratch_search_seconds": search_seconds[label],
            **cost_fields(results[label]),
        }
    record: dict[str, Any] = {
        "seed": seed,
        "reference_flops": reference,
        "recipe_setting": PAYOFF_ST_SETTING,
        "st_setting": args.st_setting,
        "checkpoints": checkpoints,
        "scratch_points": sorted(points, key=lambda p: p["flops"]),
        "budgets": budgets,
        "heldout": {"images": args.holdout_samples, "file": heldout.name, "seen_in_training": False},
        "seconds": round(time.perf_counter() - start, 1),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(record, indent=2) + "\n")
    return record


# -- network records: each training scored once, as soon as it has trained (issue 41) ------------------------------

NETWORK_NAMES = {20: "ResNet-20", 14: "ResNet-14", 8: "ResNet-8"}


def trained_at(result: dict[str, Any]) -> int | str:
    """The size a run trained its full network at: 32, S (``--image_size S``) or ``"random"`` (``full_input_scale``)."""
    source = result.get("input", "batch")
    if source == "random":
        return "random"
    return int(source.removeprefix("px")) if source.startswith("px") else 32


def network_label(result: dict[str, Any]) -> str:
    """``ResNet-8``, or ``ST++ (lambda 2)`` for a stimulatively trained ResNet-20."""
    if result["method"] != "ct":
        return f"ST++ (λ {result['kl_coef']:g})"
    return NETWORK_NAMES.get(result["depth"], f"ResNet-{result['depth']}")


def reference_flops(folder: Path) -> int:
    """FLOPs of the ResNet-20 of the network's own configuration at 32 px (the budgets' unit, whatever depth and size
    ``folder``'s network trained at)."""
    import torch

    from stim_hf.analysis.flops import count_flops
    from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification

    config = CifarResNetConfig.from_pretrained(folder)
    config.depth = 20
    return count_flops(CifarResNetForImageClassification(config), torch.zeros(1, 3, 32, 32))


def network_record_path(args: argparse.Namespace, seed: int, run: str) -> Path:
    """Where the record of the seed's run ``run`` is kept (committed)."""
    return args.report_dir / "networks" / f"seed{seed}" / f"{run}.json"


def score_network(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Search one finished training of the study (``folder``) on the seed's held-out images and score its front on the
    test split; write and return its record (:func:`network_record_path`).

    A network trained alone is searched whole (sample space 0,0,0) at every ``--input-sizes`` size, BatchNorm
    re-estimated at each, or, trained at one size S (``--image_size S``), at S on images loaded at S as its training
    loaded them; an ST++ ResNet-20 over every prefix sub-network at every size. Every candidate keeps its held-out
    top-1; the held-out front's members are exported and scored on the test split (the best candidate within any
    budget is one of them)."""
    result = finished(folder)
    if result is None:
        raise SystemExit(f"{folder}: not a finished run of the study (no result.json)")
    seed, size = result["seed"], trained_at(result)
    image_size = size if isinstance(size, int) else 32
    stimulative = result["method"] != "ct"
    start = time.perf_counter()
    train_file, holdout_samples = None, args.holdout_samples
    if result.get("heldout_file"):  # a plan with a fixed split (payoff_full): its held-out part, all of it
        heldout, train_file = folder.parent / result["heldout_file"], folder.parent / result["train_file"]
        holdout_samples = result["heldout"]
    else:
        heldout = heldout_file(seed, result["train_samples"], args)
    label = network_label(result)
    reference = reference_flops(folder)
    with tempfile.TemporaryDirectory() as out:
        searched = search(
            {label: folder}, "full" if stimulative else "0,0,0", Path(out), heldout, args,
            image_size=image_size, input_sizes=None if image_size == 32 else str(image_size), train_file=train_file,
            holdout_samples=holdout_samples,
        )  # fmt: skip
    (checkpoint,) = searched.checkpoints
    candidates = []
    for candidate in sorted(checkpoint.candidates, key=lambda c: (c.flops, c.depths)):
        point = {
            "network": label,
            "depths": list(candidate.depths),
            "trained_at": size,
            "input_size": candidate.input_size,
            "flops": candidate.flops,
            "flop_share": round(candidate.flops / reference, 4),
            "heldout_top1": round(100 * candidate.accuracy, 2),
            "on_front": bool(candidate.pareto_flops),
        }
        if candidate.pareto_flops or not stimulative:  # a network alone has a point per size: all of them scored
            point["test_top1"] = test_top1(folder, candidate.depths, candidate.input_size, args, image_size, train_file)
            print(f"  {folder.name} {point['depths']} @{point['input_size']}: test {point['test_top1']}", flush=True)
        candidates.append(point)
    record = {
        "run": folder.name,
        "seed": seed,
        "network": label,
        "setting": result["setting"],
        "method": result["method"],
        "kl_coef": result["kl_coef"],
        "depth": result["depth"],
        "trained_at": size,
        "train_samples": result["train_samples"] or 50_000 - result.get("heldout", 0),
        "epochs": result["epochs"],
        "heldout": {"images": holdout_samples, "file": heldout.name, "seen_in_training": False},
        "full_test_top1": result["full_top1"],
        "subnet_top1_recalibrated": result.get("subnet_top1_recalibrated"),
        **cost_fields(result),
        "search_seconds": round(checkpoint.timing.get("total", 0.0), 1),
        "seconds": round(time.perf_counter() - start, 1),
        "reference_flops": reference,
        "candidates": candidates,
    }
    path = network_record_path(args, seed, folder.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def score_finished_networks(args: argparse.Namespace) -> list[Path]:
    """Score every finished run of ``--study`` of the seeds asked for that has no record yet; the records written."""
    seeds = {int(s) for s in args.seeds.split(",")}
    written = []
    for folder in sorted(p for p in args.study.iterdir() if (p / "result.json").is_file()):
        result = finished(folder)
        if result["seed"] in seeds and not network_record_path(args, result["seed"], folder.name).is_file():
            print(f"scoring {folder.name}", flush=True)
            record = score_network(folder, args)
            print(f"{folder.name}: {len(record['candidates'])} candidates in {record['seconds']} s", flush=True)
            written.append(network_record_path(args, result["seed"], folder.name))
    return written


def records_from_payoff(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The network records of a seed scored before network records existed (``seed*/payoff.json``): the 32-px
    trainings alone, every point scored on the held-out and the test images, and the ST++ ResNet-20's front."""
    networks = []
    for name, checkpoint in record["checkpoints"].items():
        scratch = checkpoint.get("scratch_label")
        if scratch is not None:
            points = [dict(p) for p in record["scratch_points"] if p["network"] == scratch]
        else:
            points = [dict(p, on_front=True) for p in checkpoint["front"]]
        label = scratch or f"ST++ (λ {5 if name == PAYOFF_ST_SETTING else '?'})"
        for point in points:
            point["network"], point["trained_at"] = label, 32
            point["on_front"] = True  # of its own network: every point kept is one the picks may take
        networks.append(
            {
                "run": f"{name}_seed{record['seed']}",
                "seed": record["seed"],
                "network": label,
                "setting": name,
                "method": "ct" if scratch else "stpp",
                "trained_at": 32,
                "heldout": record["heldout"],
                "full_test_top1": checkpoint["full_test_top1"],
                **{k: checkpoint.get(k) for k in ("train_minutes", "wall_minutes", "images_per_second")},
                "search_seconds": checkpoint.get("scratch_search_seconds", checkpoint.get("search_seconds")),
                "reference_flops": record["reference_flops"],
                "candidates": points,
                "from": f"seed{record['seed']}/payoff.json",
            }
        )
    return networks


# -- the fair front: ST++'s picks against every network trained alone (issue 41) ------------------------------------

# The from-scratch fronts compared, by the trainings they take: the fair front (every training alone), without the
# dedicated-size trainings, and the 32-px trainings only (the front of issue 30's figures).
FRONTS = {
    SCRATCH_LABEL: lambda size: True,
    "from scratch, 32 px and random sizes": lambda size: size in (32, "random"),
    "from scratch, 32 px only": lambda size: size == 32,
}


def network_records(args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """Every committed network record of ``seed``: the 32-px trainings and lambda-5 ST++ of ``seed*/payoff.json`` and
    the records written since (``networks/seed*/``)."""
    records = []
    payoff = args.report_dir / f"seed{seed}" / "payoff.json"
    if payoff.is_file():
        records += records_from_payoff(json.loads(payoff.read_text()))
    folder = args.report_dir / "networks" / f"seed{seed}"
    records += [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    return records


def pick(points: list[dict[str, Any]], limit: float) -> dict[str, Any] | None:
    """The most accurate point on the held-out images within ``limit`` FLOPs (ties: fewer FLOPs, the smaller input):
    the search's rule (:func:`stim_hf.tools.search.pick_candidate`) on records."""
    within = [p for p in points if "test_top1" in p and p["flops"] <= limit * (1 + 1e-9)]
    return min(within, key=lambda p: (-p["heldout_top1"], p["flops"], p["input_size"]), default=None)


def budget_shares(records: list[dict[str, Any]], names: str, reference: int) -> list[tuple[str, float]]:
    """``--budgets`` as (name, share of the ResNet-20's FLOPs, ``reference``); a network's name is its FLOPs at 32
    px."""
    at_32 = {
        r["network"]: p["flops"] / reference
        for r in records
        if r["method"] == "ct"
        for p in r["candidates"]
        if p["input_size"] == 32 and r["trained_at"] == 32
    }
    shares = []
    for name in names.split(","):
        if name in SCRATCH:
            if name not in at_32:
                raise SystemExit(f"budget {name}: no record of a {name} trained at 32 px to take its FLOPs from")
            shares.append((name, round(at_32[name], 4)))
        else:
            shares.append((name, float(name)))
    return shares


def finetune_path(record: dict[str, Any], args: argparse.Namespace) -> Path:
    """Where a seed's fine-tuned picks of its ST++ run are kept: ``finetune/seed*/RUN.json`` in ``--report-dir``, or,
    for a run scored by issue 30's search (its record from ``seed*/payoff.json``), that seed's ``finetune.json``."""
    if record.get("st_from"):
        return args.report_dir / Path(record["st_from"]).with_name("finetune.json")
    return args.report_dir / "finetune" / f"seed{record['seed']}" / f"{record['st_run']}.json"


def add_fair_finetuning(by_setting: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    """Per ST++ setting: with ``--finetune-epochs``, fine-tune its picks at ``--finetune-budgets`` on
    ``--finetune-seeds`` (issue 41's first lever; screened on seed 1 first); then attach every seed's fine-tuned picks
    kept (:func:`finetune_path`) to the budgets they were picked at."""
    epochs = [int(e) for e in args.finetune_epochs.split(",") if e.strip()]
    seeds = {int(s) for s in (args.finetune_seeds or args.seeds).split(",")}
    for setting, records in by_setting.items():
        budgets = finetune_budgets(records, args) if epochs else []
        if budgets:
            print(f"fine-tuning {setting}'s picks at budgets {', '.join(budgets)} for {epochs} epochs, seeds "
                  f"{', '.join(str(r['seed']) for r in records if r['seed'] in seeds)}", flush=True)  # fmt: skip
        for r in records:
            folder = args.study / r["st_run"] if args.study is not None else None
            chosen = budgets if r["seed"] in seeds else []
            finetune_seed(r, folder, finetune_path(r, args), chosen, epochs, args)


def fair_seed_record(seed: int, st_setting: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """One seed's picks for the ST++ ``st_setting``: per budget, ST++'s pick and each front's (:data:`FRONTS`), from the
    committed network records; None if the seed has no record of that ST++."""
    records = network_records(args, seed)
    st = [r for r in records if r["method"] != "ct" and r["setting"] == st_setting]
    if not st:
        return None
    scratch = [r for r in records if r["method"] == "ct"]
    points = [p | {"run": r["run"]} for r in scratch for p in r["candidates"]]
    budgets = []
    reference = st[0]["reference_flops"]
    if any(r["reference_flops"] != reference for r in scratch):
        raise SystemExit(f"seed {seed}: the records' ResNet-20 FLOPs differ; every network must share one reference")
    for name, share in budget_shares(records, args.budgets, reference):
        picks = {"ST++": pick(st[0]["candidates"], share * reference)}
        for front, takes in FRONTS.items():
            picks[front] = pick([p for p in points if takes(p["trained_at"])], share * reference)
        budgets.append({"budget": share, "budget_name": name, "picks": picks})
    return {
        "seed": seed,
        "st_setting": st_setting,
        "st_network": st[0]["network"],
        "st_run": st[0]["run"],
        **({"st_from": st[0]["from"]} if st[0].get("from") else {}),
        "train_samples": st[0].get("train_samples", 5000),  # issue 30's records: its payoff plan's 5,000
        "epochs": st[0].get("epochs", 100),
        "heldout": st[0]["heldout"],
        "reference_flops": reference,
        "networks": {
            r["run"]: {
                **{k: r.get(k) for k in ("network", "trained_at", "train_minutes", "wall_minutes", "search_seconds")},
                "top1": network_top1(r),
            }
            for r in [*st, *scratch]
        },
        "scratch_points": sorted(
            (p for p in points if "test_top1" in p), key=lambda p: (p["flops"], str(p["trained_at"]))
        ),
        "budgets": budgets,
    }


def network_top1(record: dict[str, Any]) -> float:
    """The test top-1 of a network as it would ship whole: ST++'s full ResNet-20 (the study's analysis), a network
    trained alone at its largest size scored, BatchNorm re-estimated (its running statistics mix every size it
    trained at when it trained at random sizes)."""
    if record["method"] != "ct":
        return record["full_test_top1"]
    scored = [p for p in record["candidates"] if "test_top1" in p]
    return max(scored, key=lambda p: p["input_size"])["test_top1"]


def dedicated_check(records: list[dict[str, Any]]) -> list[str]:
    """Each dedicated-size training against the same network trained at random sizes, run at that size (test top-1,
    paired by seed): the rule that carries a dedicated training into the 50k front (more than +0.5 in the mean)."""
    pairs: dict[tuple[str, int], list[tuple[int, float, float]]] = {}
    for r in records:
        at = {}
        for p in r["scratch_points"]:
            at[p["network"], p["trained_at"], p["input_size"]] = p["test_top1"]
        for (network, trained, size), top1 in at.items():
            if isinstance(trained, int) and trained != 32 and (network, "random", size) in at:
                pairs.setdefault((network, size), []).append((r["seed"], top1, at[network, "random", size]))
    lines = [
        "| network @ size | seeds | trained at that size | trained at random sizes | dedicated − random (paired) "
        "| into the 50k front (> +0.5) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (network, size), rows in sorted(pairs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        diffs = [a - b for _, a, b in rows]
        verdict = "yes" if len(rows) >= 3 and statistics.mean(diffs) > 0.5 else ("no" if len(rows) >= 3 else "-")
        lines.append(
            f"| {network} @{size} | {', '.join(str(seed) for seed, _, _ in rows)} "
            f"| {_mean_std([a for _, a, _ in rows])} | {_mean_std([b for _, _, b in rows])} | {_mean_std(diffs)} "
            f"| {verdict} |"
        )
    return lines if len(lines) > 2 else []


def _fair_pick_text(p: dict[str, Any] | None) -> str:
    if p is None:
        return "-"
    network = p["network"] if not p["network"].startswith("ST++") else ",".join(map(str, p["depths"]))
    trained = "" if p["network"].startswith("ST++") else f", trained at {p['trained_at']}"
    return f"{p['test_top1']:.2f} ({network} @{p['input_size']}{trained}, {100 * p['flop_share']:.0f}%)"


def bar_verdict(diffs: list[float]) -> str:
    """Issue 41's bar at one budget, from ST++'s pick minus the fair front's by seed: ``lead`` (at least +0.5 in the
    mean and ahead on every seed), ``level`` (at least level in the mean) or ``short``."""
    if not diffs:
        return "-"
    if statistics.mean(diffs) >= 0.5 and all(d > 0 for d in diffs):
        return "lead"
    return "level" if statistics.mean(diffs) >= 0 else "short"


def fair_budget_table(records: list[dict[str, Any]]) -> list[str]:
    """Per budget, over the seeds: ST++'s pick against the fair front's (paired, with the bar's verdict) and against
    the 32-px trainings' alone (what was published before)."""
    lines = [
        "| budget | ST++ pick | from-scratch pick (fair front) | ST++ − it | t (p) | seeds ST++ ahead | bar "
        "| 32-px-only pick | ST++ − it |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, budget in enumerate(records[0]["budgets"]):
        st = [r["budgets"][i]["picks"]["ST++"] for r in records]
        fair = [r["budgets"][i]["picks"][SCRATCH_LABEL] for r in records]
        only_32 = [r["budgets"][i]["picks"]["from scratch, 32 px only"] for r in records]
        diffs = [a - b for a, b in _paired_top1(records, i, "ST++", SCRATCH_LABEL)]
        old = [a - b for a, b in _paired_top1(records, i, "ST++", "from scratch, 32 px only")]
        lines.append(
            f"| {_budget_text(budget)} | {_mean_std([p['test_top1'] for p in st if p])} "
            f"| {_mean_std([p['test_top1'] for p in fair if p])} | {_mean_std(diffs)} | {_paired_t(diffs)} "
            f"| {sum(d > 0 for d in diffs)} of {len(diffs)} | {bar_verdict(diffs)} "
            f"| {_mean_std([p['test_top1'] for p in only_32 if p])} | {_mean_std(old)} |"
        )
    return lines


def fair_cost_table(records: list[dict[str, Any]]) -> list[str]:
    """Per seed: the ST++ training plus its search (plus the fine-tuning of its picks, if any), the trainings alone its
    front's picks came from, all of them."""
    lines = [
        "| seed | ST++: train / wall min, search s | fine-tuning its picks: min | picked trainings alone "
        "| their train / wall min, search s | every training alone: train / wall min |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        networks = r["networks"]
        st = next(n for n in networks.values() if n["network"].startswith("ST++"))
        alone = {run: n for run, n in networks.items() if not n["network"].startswith("ST++")}
        picked = sorted({b["picks"][SCRATCH_LABEL]["run"] for b in r["budgets"] if b["picks"][SCRATCH_LABEL]})
        total = lambda key, runs, alone=alone: sum(alone[run].get(key) or 0.0 for run in runs)  # noqa: E731
        once: dict[str, float] = {}  # a pick fine-tuned once counts once, whatever the budgets it wins
        for b in r["budgets"]:
            for n, f in b.get("finetuned", {}).items():
                once.setdefault(f"{n} ep. {_shape_key(f)}", f["minutes"])
        tuning = ", ".join(f"{key}: {minutes:.1f}" for key, minutes in once.items()) or "-"
        names = ", ".join(f"{alone[run]['network']} at {alone[run]['trained_at']}" for run in picked)
        lines.append(
            f"| {r['seed']} | {st['train_minutes']} / {st['wall_minutes']}, {st['search_seconds']} | {tuning} "
            f"| {names} | {total('train_minutes', picked):.1f} / {total('wall_minutes', picked):.1f}, "
            f"{total('search_seconds', picked):.1f} | {total('train_minutes', alone):.1f} / "
            f"{total('wall_minutes', alone):.1f} |"
        )
    return lines


# The lambda-5 screen at full data (issue 41): lambda 5 goes on to seeds 2 and 3 if its picks beat lambda 2's by at least
# SCREEN_GAIN points at SCREEN_BUDGETS or more budgets.
SCREEN_GAIN, SCREEN_BUDGETS = 0.5, 3


def setting_comparison(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> list[str]:
    """Two ST++ settings' picks at each budget and their full networks, paired over the seeds both have, with the
    lambda screen's rule (the first setting's picks ahead by at least ``SCREEN_GAIN`` at ``SCREEN_BUDGETS`` budgets)."""
    a_name, b_name = first[0]["st_network"], second[0]["st_network"]
    pairs = [(a, b) for a in first for b in second if a["seed"] == b["seed"]]
    if not pairs:
        return []
    lines = [
        f"{a_name} against {b_name}, seeds {', '.join(str(a['seed']) for a, _ in pairs)} (test top-1; paired by seed):",
        "",
        f"| budget | {a_name} pick | {b_name} pick | {a_name} − {b_name} | seeds {a_name} ahead |",
        "| --- | --- | --- | --- | --- |",
    ]
    ahead = 0
    for i, budget in enumerate(first[0]["budgets"]):
        both = [(a["budgets"][i]["picks"]["ST++"], b["budgets"][i]["picks"]["ST++"]) for a, b in pairs]
        both = [(x["test_top1"], y["test_top1"]) for x, y in both if x and y]
        diffs = [x - y for x, y in both]
        if diffs and statistics.mean(diffs) >= SCREEN_GAIN:
            ahead += 1
        lines.append(
            f"| {_budget_text(budget)} | {_mean_std([x for x, _ in both])} | {_mean_std([y for _, y in both])} "
            f"| {_mean_std(diffs)} | {sum(d > 0 for d in diffs)} of {len(diffs)} |"
        )
    full = [(network_top1_of(a), network_top1_of(b)) for a, b in pairs]
    lines += [
        f"| full ResNet-20 | {_mean_std([x for x, _ in full])} | {_mean_std([y for _, y in full])} "
        f"| {_mean_std([x - y for x, y in full])} | {sum(x > y for x, y in full)} of {len(full)} |",
        "",
        f"{a_name}'s picks beat {b_name}'s by at least +{SCREEN_GAIN} points at {ahead} of "
        f"{len(first[0]['budgets'])} budgets (the full-data screen's rule: at {SCREEN_BUDGETS} or more, {a_name} "
        f"goes on to seeds 2 and 3): {'met' if ahead >= SCREEN_BUDGETS else 'not met'}.",
        "",
    ]
    return lines


def network_top1_of(record: dict[str, Any]) -> float:
    """A seed record's full ST++ network's test top-1."""
    return record["networks"][record["st_run"]]["top1"]


def fair_markdown(by_setting: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    """The fair report: per ST++ setting the budget table and the per-seed picks, then the dedicated-size check and
    the networks' records (which trainings each seed's fronts hold)."""
    first = next(iter(by_setting.values()))[0]
    test = f"{args.test_samples:,} CIFAR-10 test images" if args.test_samples else "all 10,000 test images"
    lines = [
        f"ST++'s searched sub-networks against networks trained alone (issue 41), CIFAR-10, {first['train_samples']:,} "
        f"training images, {first['epochs']} epochs. Test top-1 (%) on {test}. Every pick is chosen on "
        f"{first['heldout']['images']:,} held-out training images none of the seed's networks trained on, BatchNorm "
        "re-estimated at its size, then exported (BatchNorm re-estimated again) and scored on the test split as "
        "exported. From scratch: the best of ResNet-8, -14 and -20 trained alone, each at 32 px, at the random sizes "
        "ST++ draws for its sub-networks (13..32 px, `full_input_scale 0.43`) and at dedicated sizes "
        "(`--image_size S`), each scored at 13, 19, 26 and 32 px (a dedicated training at its own size only). "
        "'32 px only' is the front of the figures published before (issue 30).",
        "",
    ]
    held: dict[tuple[str, str], list[int]] = {}
    for r in next(iter(by_setting.values())):
        for n in r["networks"].values():
            if not n["network"].startswith("ST++"):
                held.setdefault((n["network"], str(n["trained_at"])), []).append(r["seed"])
    lines += [
        "The fair front holds, by seed: "
        + "; ".join(
            f"{network} trained at {at}{' px' if at.isdigit() else ' sizes'} (seeds {', '.join(map(str, seeds))})"
            for (network, at), seeds in sorted(held.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        )
        + ". The bar: `lead` is at least +0.5 in the mean and ahead on every seed, `level` at least level in the mean.",
        "",
    ]
    seeds = {r["seed"] for r in next(iter(by_setting.values()))}
    if any(set(held_seeds) != seeds for held_seeds in held.values()):
        lines += [
            "**Not every seed's front holds the same trainings yet** (some are still to train): until they do, the "
            "fair-front columns compare unlike fronts across seeds, and the bar's verdict is provisional.",
            "",
        ]
    for setting, records in by_setting.items():
        seeds = ", ".join(str(r["seed"]) for r in records)
        lines += [f"### {records[0]['st_network']} (`{setting}`), seeds {seeds}", "", *fair_budget_table(records), ""]
        lines += [
            "| seed | budget | ST++ pick | " + " | ".join(FRONTS) + " |",
            "| --- | --- | --- |" + " --- |" * len(FRONTS),
        ]
        for r in records:
            for b in r["budgets"]:
                cells = [_fair_pick_text(b["picks"][k]) for k in ("ST++", *FRONTS)]
                lines.append(f"| {r['seed']} | {_budget_text(b)} | " + " | ".join(cells) + " |")
        lines.append("")
        finetuned = finetune_table(records)
        if finetuned:
            lines += [
                "Fine-tuning ST++'s pick (issue 41's first lever; `stim-hf finetune`'s defaults: KL from its frozen "
                "ResNet-20, SGD lr 0.01 cosine, on the images the ResNet-20 trained on), scored on the test split "
                "before and after, against the fair front's pick (paired by the seeds fine-tuned); minutes of the "
                "whole fine-tuning, its training in brackets:",
                "",
                *finetuned,
                "",
            ]
    for records in by_setting.values():
        lines += [
            f"Cost, {records[0]['st_network']}: one ST++ training and its search against the trainings alone whose "
            "points the fair front picked at some budget (what a user would have trained to match every pick), and "
            "against every training the front holds (minutes of training from the logged pace / wall clock):",
            "",
            *fair_cost_table(records),
            "",
        ]
    settings = list(by_setting.values())
    for i, first in enumerate(settings):
        for second in settings[i + 1 :]:
            lines += setting_comparison(first, second)
    any_records = next(iter(by_setting.values()))
    check = dedicated_check(any_records)
    if check:
        lines += ["Dedicated-size check (test top-1 at the size; paired by seed):", "", *check, ""]
    lines += [
        "Trainings each seed's fronts hold (test top-1 of the whole network: ST++'s full ResNet-20; a network trained "
        "alone at its largest size, BatchNorm re-estimated; training minutes from the logged pace / wall clock, two "
        "runs at once):",
        "",
        "| seed | run | network | trained at | top-1 | train / wall min |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in any_records:
        for run, n in sorted(r["networks"].items()):
            lines.append(
                f"| {r['seed']} | {run} | {n['network']} | {n['trained_at']} | {n['top1']} "
                f"| {n['train_minutes']} / {n['wall_minutes']} |"
            )
    return "\n".join(lines) + "\n"


def fair_plot(by_setting: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Per ST++ setting, the picks against the budget (mean and std over seeds): ST++ and each from-scratch front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_setting), figsize=(6 * len(by_setting), 4.5), squeeze=False)
    styles = {"ST++": ("tab:orange", "o-"), SCRATCH_LABEL: ("black", "D-")}
    styles |= {
        "from scratch, 32 px and random sizes": ("tab:gray", "D--"),
        "from scratch, 32 px only": ("tab:blue", "s:"),
    }
    for ax, records in zip(axes[0], by_setting.values(), strict=True):
        shares = [100 * b["budget"] for b in records[0]["budgets"]]
        for label, (color, style) in styles.items():
            values = [[r["budgets"][i]["picks"][label] for r in records] for i in range(len(shares))]
            means = [statistics.mean(p["test_top1"] for p in v) if all(v) else float("nan") for v in values]
            stds = [statistics.stdev(p["test_top1"] for p in v) if all(v) and len(v) > 1 else 0.0 for v in values]
            ax.errorbar(shares, means, yerr=stds, fmt=style, color=color, capsize=3, label=label, ms=4)
        ax.set(xlabel="budget (FLOPs, % of ResNet-20 at 32 px)", ylabel="test top-1 (%)",
               title=f"{records[0]['st_network']}, {len(records)} seed{'s' * (len(records) > 1)}")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fair_report(args: argparse.Namespace) -> int:
    """Score the study's finished trainings that have no record yet (with ``--study``), then write the fair report
    (``fair/results.json``, ``results.md``, ``payoff.png`` in ``--report-dir``) from the committed records."""
    if args.study is not None and args.study.is_dir():
        score_finished_networks(args)
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for setting in args.st_settings.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            record = fair_seed_record(seed, setting, args)
            if record is not None:
                by_setting.setdefault(setting, []).append(record)
    if not by_setting:
        print("no seed has a record of the ST++ settings asked for", file=sys.stderr)
        return 1
    add_fair_finetuning(by_setting, args)
    out = args.report_dir / "fair"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([r for rs in by_setting.values() for r in rs], indent=1) + "\n")
    text = fair_markdown(by_setting, args)
    (out / "results.md").write_text(text)
    fair_plot(by_setting, out / "payoff.png")
    print(text)
    return 0


def _fair_records_by_setting(report_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """A written fair report's seed records (``fair/results.json`` in ``report_dir``), by ST++ setting."""
    path = report_dir / "fair" / "results.json"
    if not path.is_file():
        raise SystemExit(
            f"{path}: no fair report there; write it first (python bench/subnet_payoff.py --report-dir {report_dir})"
        )
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for record in json.loads(path.read_text()):
        by_setting.setdefault(record["st_setting"], []).append(record)
    return by_setting


def _report_link(folder: Path, report_dir: Path) -> str:
    """A markdown link from ``report_dir`` to the fair report in ``folder``."""
    target = os.path.relpath(folder / "fair" / "results.md", report_dir)
    return f"[{target}]({target})"


def _size_name(records: list[dict[str, Any]]) -> str:
    return f"{records[0]['train_samples']:,} images × {records[0]['epochs']} epochs"


def _fair_cells(records: list[dict[str, Any]], budget_name: str) -> tuple[str, str, str, str]:
    """ST++'s pick, the fair front's, their paired difference and the bar's verdict at one budget, over the seeds."""
    names = [b["budget_name"] for b in records[0]["budgets"]]  # a seed's budgets are its report's, in order
    pairs = _paired_top1(records, names.index(budget_name), "ST++", SCRATCH_LABEL) if budget_name in names else []
    if not pairs:  # a budget this data size's report does not hold
        return "-", "-", "-", "-"
    diffs = [a - b for a, b in pairs]
    return (_mean_std([a for a, _ in pairs]), _mean_std([b for _, b in pairs]), _mean_std(diffs),
            f"{bar_verdict(diffs)} ({sum(d > 0 for d in diffs)} of {len(diffs)})")  # fmt: skip


def by_data_size_report(args: argparse.Namespace) -> int:
    """ST++ against the fair front at each data size side by side (``--data-sizes``: the fair reports' folders, e.g.
    the 5k and the full-data one): ``by_data_size.md`` and ``by_data_size.png`` in ``--report-dir``."""
    folders = [Path(d).expanduser().resolve() for d in args.data_sizes.split(",")]
    sizes = [(folder, _fair_records_by_setting(folder)) for folder in folders]
    first = next(iter(sizes[0][1].values()))
    budgets = [(b["budget_name"], b) for b in first[0]["budgets"]]
    columns = [(folder, setting, records) for folder, by_setting in sizes for setting, records in by_setting.items()]
    lines = [
        "ST++'s searched sub-networks against the fair front (every network trained alone: at 32 px, at the random "
        "sizes ST++ draws, at dedicated sizes) by data size, CIFAR-10, test top-1 (%) as exported on all test images, "
        "mean ± std over seeds, paired by seed; bar: `lead` is at least +0.5 in the mean and ahead on every seed, "
        "`level` at least level in the mean (seeds ahead in brackets). Per data size: "
        + "; ".join(
            f"{_size_name(records)}, {records[0]['st_network']}, seeds {', '.join(str(r['seed']) for r in records)} "
            f"({_report_link(folder, args.report_dir)})"
            for folder, _, records in columns
        )
        + ".",
        "",
        "| budget | "
        + " | ".join(
            f"{_size_name(r)}, {r[0]['st_network']}: ST++ / fair front / ST++ − it / bar" for _, _, r in columns
        )
        + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for name, budget in budgets:
        cells = [" / ".join(_fair_cells(records, name)) for _, _, records in columns]
        lines.append(f"| {_budget_text(budget)} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    args.report_dir.mkdir(parents=True, exist_ok=True)
    (args.report_dir / "by_data_size.md").write_text(text)
    by_data_size_plot(sizes, args.report_dir / "by_data_size.png")
    print(text)
    return 0


def by_data_size_plot(sizes: list[tuple[Path, dict[str, list[dict[str, Any]]]]], path: Path) -> None:
    """One panel per data size: each ST++ setting's picks and the fair front's against the budget (mean, std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    colors = ["tab:orange", "tab:red", "tab:purple", "tab:green"]
    for ax, (_, by_setting) in zip(axes[0], sizes, strict=True):
        curves = [
            (r[0]["st_network"], "ST++", r, colors[i % len(colors)], "o-") for i, r in enumerate(by_setting.values())
        ]
        front = next(iter(by_setting.values()))
        curves.append(("fair front (trained alone)", SCRATCH_LABEL, front, "black", "D--"))
        for label, key, records, color, style in curves:
            shares, means, stds = [], [], []
            for i, budget in enumerate(records[0]["budgets"]):
                values = [r["budgets"][i]["picks"][key]["test_top1"] for r in records if r["budgets"][i]["picks"][key]]
                if values:
                    shares.append(100 * budget["budget"])
                    means.append(statistics.mean(values))
                    stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            ax.errorbar(shares, means, yerr=stds, fmt=style, color=color, capsize=3, label=label, ms=4)
        ax.set(xlabel="budget (FLOPs, % of ResNet-20 at 32 px)", ylabel="test top-1 (%)", title=_size_name(front))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- report ------------------------------------------------------------------------------------------


def _mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _paired_t(diffs: list[float]) -> str:
    if len(diffs) < 2 or statistics.stdev(diffs) < 1e-9:
        return "-"
    from scipy.stats import ttest_1samp

    test = ttest_1samp(diffs, 0.0)
    return f"{test.statistic:.2f} (p {test.pvalue:.3f})"


def _pick_text(pick: dict[str, Any] | None, network: bool = False) -> str:
    if pick is None:
        return "-"
    shape = pick["network"] if network else ",".join(map(str, pick["depths"]))
    return f"{pick['test_top1']:.2f} ({shape} @{pick['input_size']}, {100 * pick['flop_share']:.0f}%)"


def _budget_text(budget: dict[str, Any]) -> str:
    """``10 %``, or ``65.3 % (ResNet-14)`` for a budget given as a network's FLOPs."""
    name = budget.get("budget_name", "")
    if name in SCRATCH:
        return f"{100 * budget['budget']:.1f} % ({name})"
    return f"{100 * budget['budget']:.0f} %"


def _top1(record: dict[str, Any], index: int, label: str) -> float | None:
    pick = record["budgets"][index]["picks"][label]
    return None if pick is None else pick["test_top1"]


def _paired_top1(records: list[dict[str, Any]], index: int, first: str, second: str) -> list[tuple[float, float]]:
    """The test top-1 of the ``first`` and ``second`` picks at budget ``index``, by seed, where a seed has both."""
    pairs = [(_top1(r, index, first), _top1(r, index, second)) for r in records]
    return [(a, b) for a, b in pairs if a is not None and b is not None]


def budget_table(records: list[dict[str, Any]]) -> list[str]:
    """Per budget, over seeds: ST++'s pick, the from-scratch pick, the paired difference, CT's pick."""
    lines = [
        "| budget (FLOPs of ResNet-20) | ST++ pick | from-scratch pick | ST++ − from scratch (paired) | t (p) "
        "| seeds ST++ ahead | CT pick |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, budget in enumerate(records[0]["budgets"]):
        st = [_top1(r, i, "ST++") for r in records]
        scratch = [_top1(r, i, SCRATCH_LABEL) for r in records]
        ct = [_top1(r, i, "CT") for r in records]
        diffs = [a - b for a, b in zip(st, scratch, strict=True) if a is not None and b is not None]
        lines.append(
            f"| {_budget_text(budget)} | {_mean_std([v for v in st if v is not None])} "
            f"| {_mean_std([v for v in scratch if v is not None])} | {_mean_std(diffs)} | {_paired_t(diffs)} "
            f"| {sum(d > 0 for d in diffs)} of {len(diffs)} | {_mean_std([v for v in ct if v is not None])} |"
        )
    return lines


def finetune_table(records: list[dict[str, Any]]) -> list[str]:
    """Per budget and number of epochs, over the seeds fine-tuned: ST++'s pick before and after, against scratch."""
    lines = [
        "| budget | epochs | seeds | ST++ pick | fine-tuned | gain (paired) | from-scratch pick "
        "| fine-tuned − from scratch (paired) | seeds ahead | minutes (training) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, budget in enumerate(records[0]["budgets"]):
        counts = sorted({int(n) for r in records for n in r["budgets"][i].get("finetuned", {})})
        for n in counts:
            runs = [
                (r, r["budgets"][i]["finetuned"][str(n)])
                for r in records
                if str(n) in r["budgets"][i].get("finetuned", {})
            ]
            before = [f["test_top1_before"] for _, f in runs]
            after = [f["test_top1_after"] for _, f in runs]
            scratch = [_top1(r, i, SCRATCH_LABEL) for r, _ in runs]
            ahead = [a - b for a, b in zip(after, scratch, strict=True)]
            minutes = statistics.mean(f["minutes"] for _, f in runs)
            train = statistics.mean(f["train_minutes"] for _, f in runs)
            lines.append(
                f"| {_budget_text(budget)} | {n} | {', '.join(str(r['seed']) for r, _ in runs)} | {_mean_std(before)} "
                f"| {_mean_std(after)} | {_mean_std([a - b for a, b in zip(after, before, strict=True)])} "
                f"| {_mean_std(scratch)} | {_mean_std(ahead)} | {sum(d > 0 for d in ahead)} of {len(ahead)} "
                f"| {minutes:.1f} ({train:.1f}) |"
            )
    return lines if len(lines) > 2 else []


def cost_table(records: list[dict[str, Any]]) -> list[str]:
    """One ST++ training plus its search against the three dedicated trainings plus theirs, per seed."""
    lines = [
        "| seed | ST++ ResNet-20: train / wall min, search s | CT ResNet-20: train / wall min | ST++ / CT wall "
        "| ResNet-14, ResNet-8: train / wall min | three from scratch: train / wall min, search s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        by_label = {c["label"]: c for c in r["checkpoints"].values()}
        st, ct = by_label["ST++"], r["checkpoints"][CT_SETTING]
        small = [r["checkpoints"][SCRATCH[name]] for name in ("ResNet-14", "ResNet-8")]
        scratch = [r["checkpoints"][name] for name in SCRATCH.values()]
        total = lambda key, runs: sum(run.get(key) or 0.0 for run in runs)  # noqa: E731
        minutes = lambda run: f"{run['train_minutes']} / {run['wall_minutes']}"  # noqa: E731
        ratio = st["wall_minutes"] / ct["wall_minutes"] if st.get("wall_minutes") and ct.get("wall_minutes") else None
        lines.append(
            f"| {r['seed']} | {st['train_minutes']} / {st['wall_minutes']}, {st['search_seconds']} "
            f"| {ct['train_minutes']} / {ct['wall_minutes']} | {'-' if ratio is None else f'{ratio:.2f}'} "
            f"| {', '.join(minutes(s) for s in small)} "
            f"| {total('train_minutes', scratch):.1f} / {total('wall_minutes', scratch):.1f}, "
            f"{total('scratch_search_seconds', scratch):.1f} |"
        )
    return lines


def report_markdown(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The budget table over seeds, then per seed: the picks, the full networks, the fronts; the cost."""
    test = f"{args.test_samples} CIFAR-10 test images" if args.test_samples else "the whole CIFAR-10 test split"
    setting = records[0]["st_setting"]
    lines = [
        f"Test top-1 (%) on {test}. ST++: `{setting}`"
        + (
            " (the 5k study's pick, the CIFAR ST++ recipes' setting until docs/results.md 2b moved them to λ 2)"
            if setting == PAYOFF_ST_SETTING
            else ""
        )
        + f"; seeds {', '.join(str(r['seed']) for r in records)}. Every pick is chosen on "
        f"{args.holdout_samples:,} held-out training images (training-split images none of the seed's networks "
        "trained on) with BatchNorm re-estimated at its input size on "
        f"{args.search_recalibrate_bn:,} training images (the from-scratch networks exactly as ST++'s candidates), "
        f"then exported with BatchNorm re-estimated on {args.recalibrate_bn:,} training images and scored on the "
        "test split. From scratch: the best of ResNet-8, ResNet-14 and ResNet-20 (CT) at input sizes "
        f"{args.input_sizes} px within the budget.",
        "",
        *budget_table(records),
        "",
        "Per seed (test top-1, shape @ input size, FLOPs share of the ResNet-20 at 32 px):",
        "",
        "| seed | budget | ST++ pick | from-scratch pick | CT pick |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in records:
        for b in r["budgets"]:
            picks = b["picks"]
            lines.append(
                f"| {r['seed']} | {_budget_text(b)} | {_pick_text(picks['ST++'])} "
                f"| {_pick_text(picks[SCRATCH_LABEL], network=True)} | {_pick_text(picks['CT'])} |"
            )
    lines += [
        "",
        "| seed | ST++ full ResNet-20 | CT full ResNet-20 | ResNet-14 | ResNet-8 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in records:
        c = r["checkpoints"]
        st = next(v for v in c.values() if v["label"] == "ST++")
        lines.append(
            f"| {r['seed']} | {st['full_test_top1']:.2f} | {c[CT_SETTING]['full_test_top1']:.2f} "
            f"| {c[SCRATCH['ResNet-14']]['full_test_top1']:.2f} | {c[SCRATCH['ResNet-8']]['full_test_top1']:.2f} |"
        )
    finetuned = finetune_table(records)
    if finetuned:
        lines += [
            "",
            "Fine-tuning ST++'s pick (`stim-hf finetune`'s defaults: KL from its frozen ResNet-20, SGD lr 0.01 cosine, "
            "on the 5,000 training images it was trained on; BatchNorm re-estimated; test top-1 before and after):",
            "",
            *finetuned,
        ]
    lines += ["", "Cost (minutes of training from the logged pace / wall clock with two runs at once; search seconds):"]
    lines += ["", *cost_table(records)]
    lines += ["", "Accuracy-FLOPs fronts (test top-1; chosen on held-out training images):", ""]
    for r in records:
        for c in r["checkpoints"].values():
            if "front" in c:
                cells = ", ".join(
                    f"{','.join(map(str, f['depths']))} @{f['input_size']}: {100 * f['flop_share']:.0f}% -> "
                    f"{f['test_top1']:.2f}"
                    for f in c["front"]
                )
                lines.append(f"- seed {r['seed']}, {c['label']}: {cells}")
        cells = ", ".join(
            f"{p['network']} @{p['input_size']}: {100 * p['flop_share']:.0f}% -> {p['test_top1']:.2f}"
            + ("" if p["on_front"] else " (off the front)")
            for p in r["scratch_points"]
        )
        lines.append(f"- seed {r['seed']}, from scratch: {cells}")
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Per seed: the fronts on the test split, the from-scratch points and the picks; last: picks against budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ST++": "tab:orange", "CT": "tab:blue", SCRATCH_LABEL: "black"}
    fig, axes = plt.subplots(1, len(records) + 1, figsize=(5.5 * (len(records) + 1), 4.5), squeeze=False)
    for ax, r in zip(axes[0], records, strict=False):
        for c in r["checkpoints"].values():
            if "front" in c:
                front = c["front"]
                ax.plot([100 * f["flop_share"] for f in front], [f["test_top1"] for f in front], "o-",
                        color=colors[c["label"]], label=f"{c['label']} front", ms=4)  # fmt: skip
        points = r["scratch_points"]
        front = [p for p in points if p["on_front"]]
        ax.plot([100 * p["flop_share"] for p in front], [p["test_top1"] for p in front], "D--", color="black",
                label="from-scratch front (ResNet-8/14/20 at each size)", ms=4)  # fmt: skip
        ax.plot([100 * p["flop_share"] for p in points], [p["test_top1"] for p in points], "D", color="black",
                ms=3, alpha=0.35)  # fmt: skip
        for b in r["budgets"]:
            ax.axvline(100 * b["budget"], ls=":", color="gray", lw=0.8)
        ax.set(xlabel="FLOPs (% of ResNet-20 at 32 px)", ylabel="test top-1 (%)", title=f"seed {r['seed']}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    ax = axes[0][-1]
    shares = [100 * b["budget"] for b in records[0]["budgets"]]
    for label, color in colors.items():
        values = [[_top1(r, i, label) for r in records] for i in range(len(shares))]
        means = [statistics.mean(v) if None not in v else float("nan") for v in values]
        stds = [statistics.stdev(v) if None not in v and len(v) > 1 else 0.0 for v in values]
        ax.errorbar(shares, means, yerr=stds, fmt="o-", color=color, capsize=3,
                    label=f"{label} pick" if label != SCRATCH_LABEL else "from-scratch pick")  # fmt: skip
    ax.set(xlabel="budget (FLOPs, % of ResNet-20)", ylabel="test top-1 (%)",
           title=f"picks, mean ± std over {len(records)} seed{'s' * (len(records) > 1)}")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--front",
        choices=("fair", "32px"),
        default="fair",
        help="fair (issue 41): ST++ against every training alone, from the network records (scoring what --study has "
        "finished first); 32px: issue 30's search of the payoff plan's four runs per seed",
    )
    parser.add_argument(
        "--study", type=Path, default=None, help="--out of the full-network study's payoff (or payoff_fair) plan"
    )
    parser.add_argument(
        "--st-settings",
        default=f"{PAYOFF_ST_SETTING},stpp_l2_kl_cosine_up",
        help="--front fair: the ST++ settings whose picks are reported",
    )
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument(
        "--data-sizes",
        default="",
        help="comma-separated fair reports' folders (e.g. docs/measurements/subnet_payoff,"
        "docs/measurements/subnet_payoff/full): write ST++ against the fair front at each data size side by side "
        "(by_data_size.md, by_data_size.png in --report-dir) from their fair/results.json, nothing else",
    )
    parser.add_argument(
        "--st-setting", default=PAYOFF_ST_SETTING, help="the study setting whose ResNet-20 gives the ST++ sub-networks"
    )
    parser.add_argument(
        "--budgets", default=BUDGETS, help="FLOPs budgets: shares of the ResNet-20 at 32 px, or ResNet-8 / ResNet-14"
    )
    parser.add_argument("--report-dir", type=Path, default=REPO / "docs" / "measurements" / "subnet_payoff")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder with CIFAR-10 train/test.parquet")
    parser.add_argument("--input-sizes", default="13,19,26,32", help="input sizes searched (ST++ trains on 13..32)")
    parser.add_argument(
        "--holdout-samples", type=int, default=2000, help="held-out training images the search scores on"
    )
    parser.add_argument(
        "--search-recalibrate-bn", type=int, default=2000, help="training images for each candidate's BatchNorm"
    )
    parser.add_argument("--recalibrate-bn", type=int, default=1024, help="images for each export's BatchNorm")
    parser.add_argument("--test-samples", type=int, default=0, help="test images (0: all 10,000)")
    parser.add_argument("--redo", action="store_true", help="search and score seeds done before again")
    parser.add_argument(
        "--finetune-epochs", default="", help="fine-tune ST++'s picks for each of these epochs (e.g. 5,10); '': none"
    )
    parser.add_argument(
        "--finetune-budgets",
        default="shortest",
        help="budgets (as --budgets names them) whose ST++ pick is fine-tuned; 'shortest': the two where ST++ leads "
        "the from-scratch pick least in the mean; 'behind': every budget where it does not meet issue 41's bar (a "
        "lead of +0.5 in the mean, ahead on every seed)",
    )
    parser.add_argument(
        "--finetune-seeds",
        default="",
        help="--front fair: the seeds whose picks are fine-tuned (a lever is screened on seed 1 first); '': --seeds",
    )
    args = parser.parse_args(argv)
    if args.front == "32px" and args.study is None:
        parser.error("--front 32px needs --study")
    if args.finetune_seeds:
        if not args.finetune_epochs:
            parser.error("--finetune-seeds chooses the seeds to fine-tune: give --finetune-epochs too (e.g. 5,10)")
        if args.front != "fair":
            parser.error("--finetune-seeds is for --front fair; --front 32px fine-tunes every seed it reports")
        outside = set(args.finetune_seeds.split(",")) - set(args.seeds.split(","))
        if outside:
            parser.error(f"--finetune-seeds {','.join(sorted(outside))}: not among --seeds {args.seeds}")
    args.study = args.study.expanduser().resolve() if args.study is not None else None
    args.report_dir = args.report_dir.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    """Score every seed whose runs have finished and write the report."""
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one loading and one writing bar per export otherwise
    if args.data_sizes:
        return by_data_size_report(args)
    if args.front == "fair":
        return fair_report(args)
    records = []
    for seed in (int(s) for s in args.seeds.split(",")):
        record = payoff_for_seed(seed, args)
        if record is None:
            print(f"seed {seed}: not all of its runs have finished; skipped", flush=True)
            continue
        print(f"seed {seed}: done in {record['seconds']} s", flush=True)
        records.append(record)
    if not records:
        print("no seed has all four runs finished yet", file=sys.stderr)
        return 1
    add_finetuning(records, args)
    args.report_dir.mkdir(parents=True, exist_ok=True)
    (args.report_dir / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    text = report_markdown(records, args)
    (args.report_dir / "results.md").write_text(text)
    plot(records, args.report_dir / "payoff.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
