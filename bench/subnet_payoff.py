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
import json
import os
import sys
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_name, "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the payoff/ modules beside this script
from payoff.by_data_size import by_data_size_report  # noqa: E402
from payoff.fair_report import fair_report  # noqa: E402
from payoff.front_32px import add_finetuning, payoff_for_seed, plot, report_markdown  # noqa: E402
from payoff.study import BUDGETS, DATA_DIR, PAYOFF_ST_SETTING, REPO  # noqa: E402


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
    parser.add_argument(
        "--lever-settings",
        default="",
        help="--front fair: ST++ settings that add a BigNAS lever to one of --st-settings (e.g. "
        "stpp_l2_kl_cosine_up_sandwich), each screened against the setting it changes (fair/levers.json)",
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
