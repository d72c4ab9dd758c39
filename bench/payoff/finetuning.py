"""The first lever (issues 30, 41): which budgets' ST++ picks to fine-tune, a seed's fine-tuned picks kept per run, and
their table."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from payoff.scoring import finetune_pick
from payoff.study import SCRATCH_LABEL, finished
from payoff.tables import bar_verdict, budget_text, mean_std, paired_top1, pick_top1


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
        diffs[name] = [a - b for a, b in paired_top1(records, i, "ST++", SCRATCH_LABEL)]
    if args.finetune_budgets == "behind":
        return [name for name in names if diffs[name] and bar_verdict(diffs[name]) != "lead"]
    lead = {name: statistics.mean(d) if d else float("inf") for name, d in diffs.items()}
    return sorted(names, key=lambda name: lead[name])[:2]


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
            key = f"{shape_key(pick)} {n} epochs"
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
        prefix = shape_key(pick) + " "
        finetuned = {k[len(prefix) :].split()[0]: v for k, v in done.items() if k.startswith(prefix)}
        if finetuned:
            budget["finetuned"] = dict(sorted(finetuned.items(), key=lambda item: int(item[0])))


def shape_key(pick: dict[str, Any]) -> str:
    """A pick's sub-network and input size, ``3,2,3 @32``: the key of its fine-tuned entries."""
    return f"{','.join(map(str, pick['depths']))} @{pick['input_size']}"


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
            scratch = [pick_top1(r, i, SCRATCH_LABEL) for r, _ in runs]
            ahead = [a - b for a, b in zip(after, scratch, strict=True)]
            minutes = statistics.mean(f["minutes"] for _, f in runs)
            train = statistics.mean(f["train_minutes"] for _, f in runs)
            lines.append(
                f"| {budget_text(budget)} | {n} | {', '.join(str(r['seed']) for r, _ in runs)} | {mean_std(before)} "
                f"| {mean_std(after)} | {mean_std([a - b for a, b in zip(after, before, strict=True)])} "
                f"| {mean_std(scratch)} | {mean_std(ahead)} | {sum(d > 0 for d in ahead)} of {len(ahead)} "
                f"| {minutes:.1f} ({train:.1f}) |"
            )
    return lines if len(lines) > 2 else []
