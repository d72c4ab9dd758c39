"""The fair front (issue 41): per seed and budget, ST++'s pick against the pick of every network trained alone, from
the committed network records; the fine-tuned picks attached."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from payoff.finetuning import finetune_budgets, finetune_seed
from payoff.network_records import network_records
from payoff.study import SCRATCH, SCRATCH_LABEL

# The from-scratch fronts compared, by the trainings they take: the fair front (every training alone), without the
# dedicated-size trainings, and the 32-px trainings only (the front of issue 30's figures).
FRONTS = {
    SCRATCH_LABEL: lambda size: True,
    "from scratch, 32 px and random sizes": lambda size: size in (32, "random"),
    "from scratch, 32 px only": lambda size: size == 32,
}


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
