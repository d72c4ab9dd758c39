"""The payoff of ST++ for deployment: one training's searched sub-networks against networks trained alone (issue 30).

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


def data_arguments(args: argparse.Namespace, with_test: bool):
    """CIFAR-10 as the recipes load it; the test split only where a figure is meant to be a test figure."""
    from stim_hf.data.image_datasets import DataArguments

    return DataArguments(
        train_file=str(args.data_dir / "train.parquet"),
        validation_file=str(args.data_dir / "test.parquet") if with_test else None,
        max_eval_samples=args.test_samples or None,
        image_size=32,
        augmentation="cifar",
    )


_TEST_SPLIT: dict[str, Any] = {}


def test_batches(args: argparse.Namespace) -> tuple[list[Any], Any]:
    """The test split with the evaluation transforms at the trained size, decoded once per process: (image batches,
    labels). Every export here takes it as ``pipeline()`` would: a CIFAR ResNet at a smaller input resizes it
    itself (``resize_input_to``), so one decoding serves every input size."""
    if "batches" not in _TEST_SPLIT:
        import torch

        from stim_hf.data.image_datasets import load_image_datasets
        from stim_hf.data.transforms import with_image_transforms

        data = data_arguments(args, with_test=True)
        split = with_image_transforms(load_image_datasets(data, seed=42)["validation"], data, train=False)
        images = torch.stack([row["pixel_values"] for row in split])
        labels = torch.tensor(split.with_format(None)[data.label_column_name])
        _TEST_SPLIT["batches"], _TEST_SPLIT["labels"] = list(images.split(500)), labels
    return _TEST_SPLIT["batches"], _TEST_SPLIT["labels"]


def test_top1(checkpoint: Path, depths, input_size: int, args: argparse.Namespace) -> float:
    """Top-1 (%) on the test split of a sub-network, exported with re-estimated BatchNorm statistics (what the export's
    own ``--evaluate`` measures, on images decoded once)."""
    import torch

    from stim_hf.tools.export import export_subnet

    with tempfile.TemporaryDirectory() as out:
        model = export_subnet(
            str(checkpoint),
            list(depths),
            Path(out) / "export",
            recalibrate_bn=args.recalibrate_bn,
            data_args=data_arguments(args, with_test=True),
            seed=42,
            input_size=input_size,
        )
        info = json.loads((Path(out) / "export" / "export_info.json").read_text())
    if info["input_resized_by"] == "image processor":
        raise SystemExit(f"{checkpoint}: its export resizes in the image processor; score it with --evaluate instead")
    batches, labels = test_batches(args)
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


def search(folders: dict[str, Path], sample_space: str, out: Path, heldout: Path, args: argparse.Namespace):
    """One exhaustive search, without a budget, over ``folders`` (label -> checkpoint); writes ``pareto.*``.

    Candidates are scored on the ``heldout`` images (unseen training-split images, :func:`heldout_file`) with
    BatchNorm re-estimated on training images."""
    from stim_hf.tools.search import SearchArguments, search_subnets

    data = dataclasses.replace(
        data_arguments(args, with_test=False), validation_file=str(heldout), max_eval_samples=None
    )
    return search_subnets(
        [str(folder) for folder in folders.values()],
        data,
        SearchArguments(
            sampling="prefix",
            sample_space=sample_space,
            input_sizes=args.input_sizes,
            labels=list(folders),
            score_split="validation",
            holdout_samples=args.holdout_samples,
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
    that network was trained on (``train``: its study result), and score it on the test split before and after."""
    from stim_hf.tools.export import export_subnet
    from stim_hf.tools.finetune import finetune_export
    from stim_hf.tools.finetune_config import FinetuneArguments

    # The training run's seeded subset: the same seed picks it again.
    data = dataclasses.replace(data_arguments(args, with_test=True), max_train_samples=train["train_samples"])
    with tempfile.TemporaryDirectory() as out:
        export = Path(out) / "export"
        export_subnet(
            str(checkpoint),
            list(pick["depths"]),
            export,
            recalibrate_bn=args.recalibrate_bn,
            data_args=data_arguments(args, with_test=True),
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
    """The budgets to fine-tune at: ``--finetune-budgets``, or the two where ST++ leads the from-scratch pick least."""
    names = [b["budget_name"] for b in records[0]["budgets"]]
    if args.finetune_budgets != "shortest":
        wanted = args.finetune_budgets.split(",")
        unknown = [name for name in wanted if name not in names]
        if unknown:
            raise SystemExit(f"--finetune-budgets {','.join(unknown)}: not among --budgets {','.join(names)}")
        return wanted
    leads = {}
    for i, name in enumerate(names):
        pairs = [(_top1(r, i, "ST++"), _top1(r, i, SCRATCH_LABEL)) for r in records]
        diffs = [a - b for a, b in pairs if a is not None and b is not None]
        leads[name] = statistics.mean(diffs) if diffs else float("inf")
    return sorted(names, key=lambda name: leads[name])[:2]


def add_finetuning(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Attach each seed's fine-tuned ST++ picks (kept per seed in ``finetune.json``) to its budgets; with
    ``--finetune-epochs``, first fine-tune the picks at the chosen budgets that have not been fine-tuned yet."""
    epochs = [int(e) for e in args.finetune_epochs.split(",") if e.strip()]
    budgets = finetune_budgets(records, args) if epochs else []
    if epochs:
        print(f"fine-tuning ST++'s picks at budgets {', '.join(budgets)} for {epochs} epochs", flush=True)
    for r in records:
        path = args.report_dir / f"seed{r['seed']}" / "finetune.json"
        done: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        folder = args.study / f"{r['st_setting']}_seed{r['seed']}"
        picks = [(b, b["picks"]["ST++"]) for b in r["budgets"] if b["picks"]["ST++"] is not None]
        for budget, pick in picks:
            for n in epochs if budget["budget_name"] in budgets else []:
                key = f"{_shape_key(pick)} {n} epochs"
                if key in done:
                    continue
                train = finished(folder)
                if train is None:
                    raise SystemExit(f"{folder}: no finished run to fine-tune from; give the study's --study")
                done[key] = entry = finetune_pick(folder, pick, n, train, args)
                print(
                    f"  seed {r['seed']}, {key}: test top-1 {entry['test_top1_before']} -> "
                    f"{entry['test_top1_after']} ({entry['minutes']} min)",
                    flush=True,
                )
                path.write_text(json.dumps(done, indent=1, sort_keys=True) + "\n")
        for budget, pick in picks:  # a pick fine-tuned at one budget is the same network at every budget it wins
            prefix = _shape_key(pick) + " "
            finetuned = {k[len(prefix) :].split()[0]: v for k, v in done.items() if k.startswith(prefix)}
            if finetuned:
                budget["finetuned"] = finetuned


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
    parser.add_argument("--study", type=Path, required=True, help="--out of the full-network study's payoff plan")
    parser.add_argument("--seeds", default="1,2,3")
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
        "the from-scratch pick least in the mean",
    )
    args = parser.parse_args(argv)
    args.study = args.study.expanduser().resolve()
    args.report_dir = args.report_dir.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    """Score every seed whose runs have finished and write the report."""
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one loading and one writing bar per export otherwise
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
