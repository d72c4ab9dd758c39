"""Speed of ``stim-hf search``: successive halving and the shared tree walk against the naive way.

  python bench/search_speed.py CKPT --config configs/cifar10_resnet56_stpp.yaml --budget flops=0.5 \\
      --input-sizes 32 --naive-sample 24 --json out.json

1. The search as ``stim-hf search`` runs it with these arguments (by default successive halving
   over the shared tree walk, latency of the front and the pick), timed end to end and split into
   loading (model, images), BatchNorm re-estimation, scoring and latency.
2. The exhaustive search: the same with ``--halving-rounds 1`` (every candidate on all the
   images, along the shared tree walk), timed the same way; whether the two picks are the same,
   and how many points of held-out accuracy the first one's pick is behind.
3. ``--naive-sample`` candidates drawn uniformly (seeded) scored the naive way, each on its own,
   timed per candidate and split into re-estimation and scoring; whether they get the accuracies
   and losses the exhaustive tree walk gave them; and the naive cost of all candidates
   extrapolated from their mean (the sample is uniform over the space, so its mean is the
   space's). The sharing speed-up is that extrapolation over the exhaustive tree walk's time.

Every other ``stim-hf search`` argument (data, seed, image counts, batch size) passes through;
``--skip-exhaustive`` leaves out 2 and compares 3 against the search's fully scored candidates.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import replace

import numpy as np

from stim_hf.analysis.scoring import score_subnets
from stim_hf.tools.search import SearchImages, parse_search_args, prepare_model, search_subnets


def timed_search(checkpoint: str, data_args, args) -> tuple[tuple[float, float], object]:
    """Run one search; its wall time, the CPU time of this process (all threads) and the result."""
    start, cpu = time.perf_counter(), time.process_time()
    result = search_subnets([checkpoint], data_args, args)
    return (time.perf_counter() - start, time.process_time() - cpu), result


def describe(name: str, times: tuple[float, float], result) -> dict:
    """Print and return one search's figures."""
    seconds, cpu = times
    searched = result.checkpoints[0]
    timing = {"load": result.settings["timing_s"]["load"], **searched.timing}
    full = [c for c in searched.candidates if c.scored_images == result.settings["num_scored_images"]]
    pick = searched.pick
    print(
        f"{name}: {seconds:.1f} s end to end, {cpu:.1f} s CPU time of all threads (load {timing['load']:.1f} s, re-estimation "
        f"{timing['recalibration']:.1f} s, scoring {timing['scoring']:.1f} s, latency {timing['latency']:.1f} s); "
        f"{len(searched.candidates)} candidates scored, {len(full)} on all images"
    )
    if pick is not None:
        print(
            f"  pick: depths={','.join(map(str, pick.depths))} at {pick.input_size} px, {100 * pick.accuracy:.2f}% "
            f"held-out, {100 * pick.flops / searched.full_flops:.1f}% of the FLOPs"
        )
    return {
        "wall_s": seconds,
        "cpu_s": cpu,
        "timing_s": timing,
        "scored": len(searched.candidates),
        "fully_scored": len(full),
        "pick": None if pick is None else pick.record(searched.full_flops, searched.full_params),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--naive-sample", type=int, default=24, help="Candidates scored the naive way.")
    parser.add_argument("--skip-exhaustive", action="store_true", help="Do not run the exhaustive search.")
    parser.add_argument("--json", default=None, help="Write the figures to this file.")
    own, rest = parser.parse_known_args()
    args, data_args, checkpoints = parse_search_args(rest)
    args.output_dir, args.export, args.progress = None, None, False
    if len(checkpoints) != 1:
        sys.exit("give one checkpoint")
    checkpoint = checkpoints[0]

    load_before = os.getloadavg()
    seconds, result = timed_search(checkpoint, data_args, args)
    settings = result.settings
    print(
        f"{result.checkpoints[0].space_size} candidates, {settings['num_scored_images']} held-out images, "
        f"{settings['num_recalibration_images']} re-estimation images, {settings['torch_threads']} threads, "
        f"halving {args.halving_rounds} rounds keeping {args.halving_keep}"
    )
    figures = {"checkpoint": checkpoint, "settings": {k: settings[k] for k in ("budget", "seed", "torch_threads")}}
    figures["search"] = describe("search", seconds, result)
    reference = result
    if not own.skip_exhaustive and args.halving_rounds > 1:
        seconds, reference = timed_search(checkpoint, data_args, replace(args, halving_rounds=1))
        figures["exhaustive"] = describe("exhaustive", seconds, reference)
        ours, best = result.checkpoints[0].pick, reference.checkpoints[0].pick
        if ours is not None and best is not None:
            same = ours.subnet == best.subnet
            behind = 100 * (best.accuracy - ours.accuracy)
            figures["pick_behind_exhaustive_points"] = behind
            print(f"search pick {'is' if same else 'is not'} the exhaustive pick; {behind:.2f} points behind it")

    # The naive way, on a uniform sample of the fully scored candidates, with the same images.
    searched = reference.checkpoints[0]
    scored = [c for c in searched.candidates if c.scored_images == settings["num_scored_images"]]
    item = prepare_model(checkpoint, "naive", data_args, args, __import__("torch").device(settings["device"]))
    images = SearchImages(data_args, args, item.model.device)
    chosen = np.random.default_rng(0).choice(len(scored), size=min(own.naive_sample, len(scored)), replace=False)
    naive_timing: dict[str, float] = {}
    naive_cpu = time.process_time()
    same = 0
    for index in sorted(chosen.tolist()):
        candidate = scored[index]
        size = candidate.input_size
        (score,) = score_subnets(
            item.model, item.stages, [candidate.subnet], images.at(size), "naive", item.forward_kwargs(size),
            timings=naive_timing,
        )  # fmt: skip
        same += score.accuracy == candidate.accuracy and abs(score.loss - candidate.loss) <= 1e-6 * abs(score.loss)
    naive_cpu = time.process_time() - naive_cpu
    per_naive = {k: v / len(chosen) for k, v in naive_timing.items()}
    walk = searched.timing["recalibration"] + searched.timing["scoring"]
    per_tree = {k: searched.timing[k] / len(scored) for k in ("recalibration", "scoring")}
    naive_all = sum(per_naive.values()) * len(scored)
    figures.update(
        {
            "tree_per_candidate_s": per_tree,
            "naive_per_candidate_s": per_naive,
            "naive_sample": len(chosen),
            "naive_sample_same_scores": same,
            "naive_all_extrapolated_s": naive_all,
            "sharing_speedup": naive_all / walk,
            "naive_sample_cpu_s": naive_cpu,
            "load_average_before_after": [load_before, os.getloadavg()],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )
    print("per candidate, all images   re-estimation   scoring    total")
    for name, per in (("tree walk", per_tree), (f"naive ({len(chosen)} drawn)", per_naive)):
        total = per.get("recalibration", 0.0) + per.get("scoring", 0.0)
        print(
            f"  {name:<24} {per.get('recalibration', 0.0):>10.3f} s {per.get('scoring', 0.0):>8.3f} s {total:>7.3f} s"
        )
    print(
        f"naive, all {len(scored)} (extrapolated): {naive_all:.0f} s, tree walk {walk:.0f} s: sharing speed-up "
        f"{figures['sharing_speedup']:.1f}x; naive sample scored as in the tree walk: {same}/{len(chosen)}"
    )
    print(f"peak resident memory: {figures['peak_rss_mb']:.0f} MB; naive sample: {naive_cpu:.0f} s CPU time")
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {os.getloadavg()}")
    if own.json:
        with open(own.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
