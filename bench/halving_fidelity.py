"""Does successive halving find the exhaustive search's pick? Halving rules replayed on one score table.

  python bench/halving_fidelity.py CKPT --config configs/cifar10_resnet56_stpp.yaml --budget flops=0.5 \\
      --input-sizes 32 --table table.json.gz --json fidelity.json

1. **The table** (``--table``, written once and read back on later calls): every candidate of the
   search space scored on the images each round of ``stim-hf search``'s successive halving uses
   (the first 1/keep^(R-1), ..., 1/keep, and all of the held-out and the re-estimation images, as
   ``_successive_halving`` takes them), with which images each got right, through the search's own
   model loading, images and tree walk. The last column is the exhaustive search.
2. **The replay**: ``_successive_halving`` itself, with each rule's settings, its scoring answered
   from the table, so a rule costs no model pass. Per rule: the pick under the budget, how many
   points of held-out accuracy it is behind the exhaustive pick, whether it is that pick, how many
   candidates each round scored, and the cost as a share of the exhaustive search's (candidates x
   image share, the tree walk's sharing set aside).

3. **Resampled replays** (``--resample K``): the same rules on K seeded uniform draws of the held-out
   images, each round scoring the first share of the draw, read from the all-image column (so
   BatchNorm is re-estimated on all the re-estimation images, which leaves out that noise of the
   early rounds; the table's own columns include it), under each FLOPs
   share of ``--resample-budgets``. Per rule: the mean and the largest number of points behind the
   exhaustive pick, how often more than 0.5, and the mean cost share.

Every other ``stim-hf search`` argument (data, seed, image counts, budget) passes through. The
halving settings given are the first rule; ``--rules`` adds more as ``keep:margin`` pairs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from stim_hf.analysis.scoring import score_subnets
from stim_hf.tools.search import SearchImages, parse_search_args, prepare_model
from stim_hf.tools.search.results import Candidate, pick_candidate
from stim_hf.tools.search.run import _successive_halving, _within, halving_image_shares


def build_table(checkpoint: str, item, data_args, args, shares: list[float]) -> dict:
    """Score every candidate of ``item`` (the loaded ``checkpoint``) on the images of each share; the table
    the replay reads."""
    images = SearchImages(data_args, args, torch.device("cpu"))
    subnets = item.space.enumerate()
    columns, timing = [], []
    for share in shares:
        counts = (math.ceil(share * images.num_scored), math.ceil(share * images.num_recalibration))
        seconds: dict[str, float] = {}
        scores: dict = {}
        for size in sorted({s.input_size for s in subnets}):
            group = [s for s in subnets if s.input_size == size]
            batches = images.at(size).head(*counts)
            results = score_subnets(
                item.model, item.stages, group, batches, "tree", item.forward_kwargs(size), None, seconds
            )
            scores.update(zip(group, results, strict=True))
        columns.append(
            {
                "share": share,
                "images": counts,
                "accuracy": [scores[s].accuracy for s in subnets],
                "loss": [scores[s].loss for s in subnets],
                "hits": [np.packbits(scores[s].hits.numpy()).tobytes().hex() for s in subnets],
            }
        )
        timing.append(seconds)
        print(f"share {share:.4f} ({counts[0]} + {counts[1]} images): {sum(seconds.values()):.0f} s", flush=True)
    return {
        "checkpoint": checkpoint,
        "space": [{"kept": [list(k) for k in s.kept], "input_size": s.input_size} for s in subnets],
        "flops": [item.costs.flops(s) for s in subnets],
        "params": [item.costs.parameters(s) for s in subnets],
        "full_flops": item.costs.full_flops,
        "columns": columns,
        "timing_s": timing,
    }


def replay(table: dict, subnets: list, args, item_budget) -> dict:
    """Run ``_successive_halving`` with ``args``' rule, its scoring read from ``table``."""
    index = {s: i for i, s in enumerate(subnets)}
    by_share = {round(c["share"], 9): c for c in table["columns"]}
    candidates: dict = {}

    def make(subnet) -> Candidate:
        if subnet not in candidates:
            i = index[subnet]
            candidates[subnet] = Candidate(subnet, table["flops"][i], table["params"][i])
        return candidates[subnet]

    def score(group, share: float = 1.0) -> None:
        column = by_share.get(round(share, 9))
        if column is None:
            sys.exit(f"the table has no column for image share {share}; build it with these halving settings")
        for subnet in group:
            i, candidate = index[subnet], make(subnet)
            candidate.accuracy, candidate.loss = column["accuracy"][i], column["loss"][i]
            candidate.scored_images = column["images"][0]
            candidate.hits = torch.from_numpy(column["hits"][i])

    rounds = _successive_halving(subnets, score, make, args)
    final = [c for c in candidates.values() if c.scored_images == table["columns"][-1]["images"][0]]
    pick = pick_candidate([c for c in final if item_budget(c)], args.pick_margin)
    cost = sum(r["candidates"] * r["image_share"] for r in rounds) / len(subnets)
    return {"pick": pick, "rounds": [r["candidates"] for r in rounds], "cost_share": cost}


def unpack_hits(table: dict) -> dict:
    """``table`` with each column's hits as a (candidates x images) bool array (hex strings on disk)."""
    columns = []
    for column in table["columns"]:
        count = column["images"][0]
        rows = [np.unpackbits(np.frombuffer(bytes.fromhex(h), dtype=np.uint8))[:count] for h in column["hits"]]
        columns.append({**column, "hits": np.array(rows, dtype=bool)})
    return {**table, "columns": columns}


def resampled_replays(table: dict, subnets: list, args, rules, draws: int, budgets: list[float]) -> list[dict]:
    """Each rule on ``draws`` uniform draws of the held-out images, under each FLOPs share of ``budgets``."""
    hits = table["columns"][-1]["hits"]
    images = hits.shape[1]
    outcomes = []
    for keep, margin in rules:
        rounds = args.halving_rounds
        shares = halving_image_shares(rounds, keep)
        behind, costs = [], []
        for draw in range(draws):
            order = np.random.default_rng([draw, 17]).permutation(images)
            columns = []
            for share in shares:
                first = hits[:, order[: math.ceil(share * images)]]
                columns.append({"share": share, "images": [first.shape[1], 0], "accuracy": first.mean(axis=1).tolist(),
                                "loss": (1.0 - first.mean(axis=1)).tolist(),  # a tie-break only: no per-image loss
                                "hits": first})  # fmt: skip
            drawn = {**table, "columns": columns}
            rule = replace(args, halving_keep=keep, halving_margin=margin)
            for budget in budgets:
                within = lambda c, budget=budget: c.flops <= budget * table["full_flops"]  # noqa: E731
                exhaustive = replay(drawn, subnets, replace(rule, halving_rounds=1), within)["pick"]
                outcome = replay(drawn, subnets, rule, within)
                behind.append(100 * (exhaustive.accuracy - outcome["pick"].accuracy))
                costs.append(outcome["cost_share"])
        outcomes.append(
            {"keep": keep, "margin": margin, "draws": draws, "budgets": budgets,
             "behind_mean": float(np.mean(behind)), "behind_max": float(np.max(behind)),
             "over_half_point": float(np.mean(np.array(behind) > 0.5)), "cost_share_mean": float(np.mean(costs))}
        )  # fmt: skip
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--table", required=True, help="Score table (.json.gz): read if it exists, else built.")
    parser.add_argument("--rules", default="", help="More halving rules to replay, e.g. '0.25:0,0.25:2'.")
    parser.add_argument("--resample", type=int, default=0, help="Uniform draws of the held-out images to replay on.")
    parser.add_argument(
        "--resample-budgets", default="0.3,0.4,0.5,0.6,0.7", help="FLOPs shares of the resampled replays."
    )
    parser.add_argument("--json", default=None, help="Write the figures to this file.")
    own, rest = parser.parse_known_args()
    args, data_args, checkpoints = parse_search_args(rest)
    if len(checkpoints) != 1:
        sys.exit("give one checkpoint")
    shares = halving_image_shares(args.halving_rounds, args.halving_keep)
    device = torch.device("cpu")
    item = prepare_model(checkpoints[0], "checkpoint", data_args, args, device)
    path = Path(own.table)
    if path.exists():
        table = json.loads(gzip.decompress(path.read_bytes()))
    else:
        start = time.perf_counter()
        table = build_table(checkpoints[0], item, data_args, args, shares)
        table["build_s"] = time.perf_counter() - start
        path.write_bytes(gzip.compress(json.dumps(table).encode()))
    table = unpack_hits(table)
    subnets = item.space.enumerate()
    if [[list(k) for k in s.kept] for s in subnets] != [s["kept"] for s in table["space"]]:
        sys.exit(f"{path} was built for another search space; give a new --table")
    if any(limit.key not in ("flops", "params") for limit in args.budget_limits):
        sys.exit("the replay knows FLOPs and parameters only; give a flops= or params= budget")

    def within(candidate: Candidate) -> bool:
        return _within(item, candidate, args, device)

    exhaustive = replay(table, subnets, replace(args, halving_rounds=1), within)["pick"]
    print(
        f"{len(subnets)} candidates, {table['columns'][-1]['images'][0]} held-out + "
        f"{table['columns'][-1]['images'][1]} re-estimation images; exhaustive pick: "
        f"{','.join(map(str, exhaustive.depths))} @{exhaustive.input_size} px, {100 * exhaustive.accuracy:.2f}%"
    )
    rules = [(args.halving_keep, args.halving_margin)]
    rules += [tuple(float(x) for x in rule.split(":")) for rule in own.rules.split(",") if rule]
    figures = {"checkpoint": checkpoints[0], "budget": args.budget, "exhaustive": exhaustive.record(1, 1), "rules": []}
    print("keep  margin  scored per round        cost    pick                  behind (points)")
    for keep, margin in rules:
        if halving_image_shares(args.halving_rounds, keep) != shares:
            print(f"{keep:<5} {margin:<7} skipped: its image shares are not the table's")
            continue
        outcome = replay(table, subnets, replace(args, halving_keep=keep, halving_margin=margin), within)
        pick = outcome["pick"]
        behind = 100 * (exhaustive.accuracy - pick.accuracy)
        name = f"{','.join(map(str, pick.depths))} @{pick.input_size} {100 * pick.accuracy:.2f}%"
        rounds = " > ".join(map(str, outcome["rounds"]))
        print(f"{keep:<5} {margin:<7} {rounds:<22} {outcome['cost_share']:.3f}   {name:<21} {behind:.2f}")
        figures["rules"].append(
            {"keep": keep, "margin": margin, "rounds": outcome["rounds"], "cost_share": outcome["cost_share"],
             "pick": pick.record(1, 1), "behind_points": behind, "same_pick": pick.subnet == exhaustive.subnet}
        )  # fmt: skip
    if own.resample:
        budgets = [float(b) for b in own.resample_budgets.split(",")]
        print(f"resampled: {own.resample} uniform draws of the held-out images x FLOPs budgets {budgets}")
        print("keep  margin  behind: mean   max    > 0.5    cost")
        figures["resampled"] = resampled_replays(table, subnets, args, rules, own.resample, budgets)
        for r in figures["resampled"]:
            print(f"{r['keep']:<5} {r['margin']:<7} {r['behind_mean']:>11.2f} {r['behind_max']:>6.2f} "
                  f"{100 * r['over_half_point']:>6.0f}%   {r['cost_share_mean']:.3f}")  # fmt: skip
    figures["table_timing_s"] = table["timing_s"]
    if own.json:
        Path(own.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
