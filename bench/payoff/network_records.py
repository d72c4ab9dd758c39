"""Network records (issue 41): each training of the study scored once, as soon as it has trained, and kept (committed)
as ``networks/seed*/RUN.json``; issue 30's seeds enter from their ``seed*/payoff.json``."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from payoff.scoring import heldout_file, search, test_top1
from payoff.study import PAYOFF_ST_SETTING, cost_fields, finished

NETWORK_NAMES = {20: "ResNet-20", 14: "ResNet-14", 8: "ResNet-8"}


def trained_at(result: dict[str, Any]) -> int | str:
    """The size a run trained its full network at: 32, S (``--image_size S``) or ``"random"`` (``full_input_scale``)."""
    source = result.get("input", "batch")
    if source == "random":
        return "random"
    return int(source.removeprefix("px")) if source.startswith("px") else 32


def network_label(result: dict[str, Any]) -> str:
    """``ResNet-8``, or ``ST++ (lambda 2)`` for a stimulatively trained ResNet-20 (``ST++ (lambda 2, sandwich)`` with a
    lever)."""
    if result["method"] != "ct":
        lever = f", {result['lever']}" if result.get("lever") else ""  # a BigNAS lever (issue 41's screen)
        return f"ST++ (λ {result['kl_coef']:g}{lever})"
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
