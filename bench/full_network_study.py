"""Does ST++ improve the full network? CT against ST++ over lambda, its introduction and seeds (issue 17).

  # 1. pilot: where is a large lambda stable? (ResNet-20, 5k images, 4 epochs, seed 1)
  python bench/full_network_study.py --plan pilot --out ~/stim_hf_study/pilot --parallel 2
  # 2. the CPU study (ResNet-20, 5k images, 100 epochs, 3 seeds); resumable, run it again to go on
  python bench/full_network_study.py --plan cpu --out ~/stim_hf_study/cpu --parallel 2
  # 3. the same study at paper scale on a GPU (ResNet-56, all of CIFAR-10, 200 epochs)
  python bench/full_network_study.py --plan gpu --out outputs/full_network_study_gpu --parallel 4 --device cuda
  # the checkpoints of bench/subnet_payoff.py: ST++ (lambda 5) and CT ResNet-20, ResNet-14 and ResNet-8 from scratch
  python bench/full_network_study.py --plan payoff --out ~/stim_hf_study/payoff --parallel 2
  # the recipe (then lambda 5) against CT on all 50,000 CIFAR-10 training images (ResNet-20, 50 epochs, 3 seeds),
  # then lambda 1 and 2 on seed 1 (the screen of docs/results.md, 2b), then the lambda its rule picks, if any, on
  # seeds 2 and 3 (it picked lambda 2, and the recipes took it)
  python bench/full_network_study.py --plan full --out ~/stim_hf_study/full --parallel 2
  # tables and plot from whatever has finished
  python bench/full_network_study.py --plan cpu --out ~/stim_hf_study/cpu --report-only

Each run is a ``scripts/train.py`` subprocess on the CIFAR-10 recipes (``configs/cifar10_resnet56_
{ct,stpp}.yaml``) with the plan's overrides: depth, a seeded training subset, epochs, batch 128,
SGD nesterov lr 0.1 cosine without warm-up (unless the setting or the plan asks for one: ``gpu`` has
the ResNet-56 recipes' one epoch), no clipping, and the setting's lambda, KL and how lambda is
introduced. Runs train with ``--threads`` intra-op threads each (fixed: results are deterministic
for a build and a thread count) and ``--parallel`` at once, in the plan's order: seed by seed, so a
study cut short stays balanced.

Sessions end; the study goes on. A run saves an (atomic) checkpoint every epoch; started again,
the runner resumes every unfinished run with the trainer's exact resume (``--resume_from_checkpoint``:
bit-for-bit the run an uninterrupted one would have been) and skips finished ones, so a study spread
over several sessions gives the numbers of one run straight through. ``--launch-until 14:00`` launches no run after
that time (one that would not finish before the session ends: it would restart from its last checkpoint, or from
zero on a new machine); runs already going finish and are analysed. A finished run keeps
``result.json`` in its folder, and the aggregate ``results.json`` in ``--report-dir`` counts as
finished too, so a new machine with the committed results does not train them again.

After training, each run is evaluated by the loafing analysis (:func:`stim_hf.tools.loafing.analyze_checkpoints`)
on the whole test split: the full network's top-1, and ``--num-subnets`` fixed sub-networks (prefix rule,
seed 42, full size) with their BatchNorm statistics re-estimated on ``--recalibrate-bn`` training images
and with the full network's. During training the run evaluates ``--curve-samples`` test images every
``--curve-every`` epochs (the learning curves). A run whose full network collapses is flagged while
it trains (``on_collapse``, stim_hf/training/collapse.py) and marked ``collapsed`` in the results.

``--report-dir`` (default ``docs/measurements/full_network_study/<plan>``) receives ``results.json``
(one entry per finished run: method, kl_coef, kl_loss, intro, seed, epochs, train_samples, depth,
full_top1, subnet_top1_recalibrated, subnet_top1_inherited, collapsed, ...), ``results.md`` (mean ±
std per setting, paired differences seed by seed against CT and between the ST settings, with the
paired t statistic, and a plan's screen read by its written rule: the setting the rule picks joins the plan
at the follow-up seeds, and the same call trains it) and ``learning_curves.png``; at the
default place, ``docs/measurements/full_network_study/results.json`` then lists the finished runs of
every plan, each with its ``plan``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data" / "cifar10"
MEASUREMENTS = REPO / "docs" / "measurements" / "full_network_study"
BATCH_SIZE = 128


@dataclass(frozen=True)
class Setting:
    """One training setting of the study: a method, lambda, KL and how lambda is introduced."""

    method: str  # "ct" or "stpp"
    kl_coef: float = 0.0
    kl_loss: str = "kl_direction"
    intro: str = "step0"  # step0 | start<E> (stim_start_epoch E) | cosine_up | warmup<R> (lr warm-up, R of the run)
    # The full network's input: "batch" (32 px), "random" (full_input_scale RANDOM_INPUT_SCALE: the sizes ST++ draws
    # for its sub-networks, 13..32) or "px<S>" (the images at S px: --image_size S, as a user training for S does).
    input: str = "batch"
    lever: str = ""  # ST++ only: one of LEVERS (a BigNAS lever for the smallest sub-networks), "" for none

    @property
    def name(self) -> str:
        """A short name, e.g. ``ct``, ``ct_random``, ``ct_px13``, ``stpp_l5_kl-_cosine_up`` or
        ``stpp_l2_kl_cosine_up_sandwich``."""
        if self.method == "ct":
            return "ct" if self.input == "batch" else f"ct_{self.input}"
        kl = "kl-" if self.kl_loss == "kl_direction" else "kl"
        return f"stpp_l{self.kl_coef:g}_{kl}_{self.intro}" + (f"_{self.lever}" if self.lever else "")

    @property
    def image_size(self) -> int:
        """The side the run's images are loaded at (and its analysis evaluates at)."""
        return int(self.input.removeprefix("px")) if self.input.startswith("px") else 32

    def input_overrides(self) -> list[str]:
        """The training command-line overrides of the full network's input."""
        if self.input == "random":
            return ["--full_input_scale", f"{RANDOM_INPUT_SCALE:g}"]
        if self.input.startswith("px"):
            return ["--image_size", str(self.image_size)]
        if self.input != "batch":
            raise ValueError(f"unknown input {self.input!r}")
        return []

    def overrides(self) -> list[str]:
        """The training command-line overrides of this setting (beyond the recipe). Lambda, the KL and
        how lambda comes in are always given, so that the study keeps meaning the same runs when the
        recipes' own values change."""
        if self.lever and (self.method == "ct" or self.lever not in LEVERS):
            raise ValueError(f"{self.name}: the lever {self.lever!r} is none of ST++'s ({', '.join(LEVERS)})")
        if self.method == "ct":
            return self.input_overrides()
        if self.input != "batch":
            raise ValueError(f"{self.name}: only CT takes another input ({self.input!r})")
        if self.intro not in ("step0", "cosine_up") and not self.intro.startswith(("start", "warmup")):
            raise ValueError(f"unknown intro {self.intro!r}")
        schedule = "cosine_up" if self.intro == "cosine_up" else "constant"
        start = self.intro.removeprefix("start") if self.intro.startswith("start") else "0"
        return [
            "--kl_coef", f"{self.kl_coef:g}", "--kl_loss", self.kl_loss,
            "--kl_coef_schedule", schedule, "--stim_start_epoch", start,
            *LEVERS.get(self.lever, []),
        ]  # fmt: skip

    @property
    def warmup(self) -> str:
        """The learning-rate warm-up (``warmup_steps``: a share of the run below 1), "0" without one."""
        return self.intro.removeprefix("warmup") if self.intro.startswith("warmup") else "0"


@dataclass(frozen=True)
class Run:
    """One training run: a setting at a seed, with the plan's scale."""

    setting: Setting
    seed: int
    depth: int
    epochs: int
    train_samples: int | None  # None: the whole training split
    depth_in_name: bool = False  # plans that train one setting at several depths name each run's depth
    lr_warmup: str = "0"  # the plan's learning-rate warm-up (warmup_steps, a share of the run), unless the setting's
    heldout: int = 0  # images of the training split held out of every run of the plan (fixed_split), 0: none

    @property
    def warmup(self) -> str:
        """The run's ``warmup_steps``: its setting's (``warmup<R>``), else the plan's."""
        return self.setting.warmup if self.setting.warmup != "0" else self.lr_warmup

    @property
    def num_train_images(self) -> int:
        """The images one epoch trains on: the seeded subset, or all of CIFAR-10's training split."""
        return self.train_samples or 50_000 - self.heldout

    @property
    def setting_label(self) -> str:
        """The setting as the report groups it: ``ct``, or ``ct_r14`` for a run of a plan's other depths."""
        return f"{self.setting.name}_r{self.depth}" if self.depth_in_name else self.setting.name

    @property
    def name(self) -> str:
        """The run's folder name."""
        return f"{self.setting_label}_seed{self.seed}"

    def key(self) -> tuple:
        """What makes two runs the same run (for results carried over from an earlier session)."""
        s = self.setting
        return (s.method, s.kl_coef, s.kl_loss, s.intro, self.seed, self.depth, self.epochs, self.train_samples,
                self.lr_warmup, s.input, self.heldout, s.lever)  # fmt: skip


WALL_CLOCK_EVERY_S = 30
# The BigNAS levers for the smallest sub-networks (docs/training.md), as a setting names them: their training overrides.
# The size bias at 0.5 doubles the chance of a stage's smallest choice among 4; the floor at 5 % of the learning rate is
# where BigNAS's schedule ends.
LEVERS: dict[str, list[str]] = {
    "sandwich": ["--sandwich", "true"],
    "bias0.5": ["--subnet_size_bias", "0.5"],
    "zerogamma": ["--zero_init_residual", "true"],
    "floor0.05": ["--lr_floor", "0.05"],
}
# full_input_scale of the random-size trainings: floor(0.43 * 32) = 13, the ST++ recipes' min_input_scale.
RANDOM_INPUT_SCALE = 0.43
CT = Setting("ct")
CT_RANDOM = Setting("ct", input="random")
# CT against ST++ at lambda 1 (the recipes' value before this study, from step 0) and at 5 and 10, which collapse from step 0
# in the pilot and are brought in with cosine_up.
LAMBDA_SETTINGS = [
    CT,
    Setting("stpp", 1),
    Setting("stpp", 5, intro="cosine_up"),
    Setting("stpp", 10, intro="cosine_up"),
]
# Plain KL (ST's loss) against KL- at the same lambda and introduction: the 5k study's pick, the CIFAR ST++ recipes'
# setting until the full plan's screen ("the recipe" of the full plan's first tier and of the payoff plan).
PLAIN_KL_SETTING = Setting("stpp", 5, kl_loss="kl", intro="cosine_up")
# The recipe at a smaller lambda: the full plan's screen (its full network fell below CT's at full data).
SMALLER_LAMBDA_SETTINGS = [Setting("stpp", lam, kl_loss="kl", intro="cosine_up") for lam in (1, 2)]
# The screen's pick, which the CIFAR ST++ recipes took (docs/results.md 2b): their setting since.
RECIPE_SETTING = SMALLER_LAMBDA_SETTINGS[1]
PLANS: dict[str, dict[str, Any]] = {
    # Stability first, at the issue's pilot scale: lambda 10 (collapsed from step 0 in the issue's pilot)
    # under each way of introducing it, and lambda 5.
    "pilot": {
        "depth": 20,
        "epochs": 4,
        "train_samples": 5000,
        "seeds": [1],
        "settings": [
            Setting("stpp", 10, intro="step0"),
            Setting("stpp", 10, intro="start1"),
            Setting("stpp", 10, intro="cosine_up"),
            Setting("stpp", 10, intro="warmup0.2"),
            Setting("stpp", 5, intro="step0"),
            Setting("stpp", 5, intro="cosine_up"),
            CT,
            Setting("stpp", 1),
        ],
    },
    # The CPU study, seed by seed; then plain KL against KL- at lambda 5, and plain KL at lambda 2 (the recipes'
    # since the full plan's screen picked it at 50k; docs/results.md 2b: does one lambda serve both sizes?).
    "cpu": {
        "depth": 20,
        "epochs": 100,
        "train_samples": 5000,
        "seeds": [1, 2, 3],
        "settings": LAMBDA_SETTINGS,
        "then": [PLAIN_KL_SETTING, RECIPE_SETTING],
    },
    # The from-scratch baseline of bench/subnet_payoff.py: a CIFAR ResNet-14 ([2, 2, 2], the shape of ResNet-20's
    # sub-network that drops one block per stage) trained as the cpu plan's CT. Give it its own --out.
    "r14": {"depth": 14, "epochs": 100, "train_samples": 5000, "seeds": [1, 2, 3], "settings": [CT]},
    # bench/subnet_payoff.py (issue 30): per seed, ST++ (lambda 5) and CT ResNet-20 side by side (their wall times
    # compared), then the from-scratch ResNet-14 and ResNet-8 ([1, 1, 1]) trained as CT. ST++ first and the two short
    # runs last keep two workers busy to the end of each seed.
    "payoff": {
        "depth": 20,
        "epochs": 100,
        "train_samples": 5000,
        "seeds": [1, 2, 3],
        "settings": [PLAIN_KL_SETTING, CT],
        "other_depths": [14, 8],
    },
    # Issue 27: the recipe's ST++ (then lambda 5) against CT on all 50,000 training images (ResNet-20, 50 epochs: a
    # pair takes about 3 hours on 2 cores, two runs at once), seed by seed; the decision rule is in docs/results.md.
    # Its report sets the gain beside the same comparison on 5,000 images (the cpu and payoff plans' records).
    "full": {
        "depth": 20,
        "epochs": 50,
        "train_samples": None,
        "seeds": [1, 2, 3],
        "settings": [PLAIN_KL_SETTING, CT],
        "compare_with": ["cpu", "payoff"],
        # After the three seeds, the screen the decision rule calls for if the gain is gone: the recipe at a smaller
        # lambda (its KL and introduction kept), on seed 1 only; its CT is the first tier's.
        "then": SMALLER_LAMBDA_SETTINGS,
        "then_seeds": [1],
        # The screen's rule, written before it ran (docs/results.md 2b): a screened lambda goes on to follow_seeds if
        # its full network beats the recipe's by full_gain points and its sub-networks beat CT's by subnet_over_ct;
        # of several, the highest full network, and within tie points of it the best sub-networks. The recipes take
        # it if on every seed it then beats the recipe (mean gain at least full_gain) with sub-networks that still
        # beat CT's by subnet_over_ct.
        "screen": {"full_gain": 0.5, "subnet_over_ct": 30.0, "tie": 0.2, "follow_seeds": [2, 3]},
    },
    # Issue 41: the fair from-scratch front of bench/subnet_payoff.py at 5k (its payoff plan's scale and subsets), for
    # the payoff plan's records (lambda 5) and today's recipe (lambda 2). Tiers in order of what the front needs most:
    # the ResNet-8 at 13 px (the 10 % budget, where the published lead was largest; minutes a run), then ResNet-20,
    # -14 and -8 trained at the random sizes ST++ draws for its sub-networks, seed by seed; then the rest of the
    # dedicated-size check (each network at a size it would be deployed at, --image_size), one size at a time over the
    # three seeds, cheapest first, so that a study cut short leaves whole comparisons; then the recipe's ST++.
    "payoff_fair": {
        "depth": 20,
        "epochs": 100,
        "train_samples": 5000,
        "seeds": [1, 2, 3],
        "tiers": [
            [(Setting("ct", input="px13"), 8)],
            [(CT_RANDOM, 20), (CT_RANDOM, 14), (CT_RANDOM, 8)],
            *[
                [(Setting("ct", input=f"px{size}"), depth)]
                for depth, size in ((8, 19), (14, 19), (8, 26), (20, 19), (14, 26), (20, 26))
            ],
            [(RECIPE_SETTING, 20)],
        ],
    },
    # Issue 41 at full data: ST++'s family against every network trained alone, on 45,000 training images (a fixed,
    # class-balanced split; the other 5,000 are the search's held-out images), issue 27's schedule (50 epochs). Seed by
    # seed: the recipe's ST++ (lambda 2) beside CT's ResNet-20, the ResNet-14 and -8 at 32 px, then the three at the
    # random sizes ST++ draws; then lambda 5 on seed 1 (its family beside lambda 2's; seeds 2-3 only if its front
    # beats lambda 2's by 0.5 points at 3 or more budgets). Dedicated-size trainings join where the 5k check calls
    # for them (docs/search.md). The issue's estimate was about 4.5 h of wall time a seed; measured here (2026-12-07,
    # two runs at once, one thread each), 45,000 images x 50 epochs take about 6.1 h for the ST++ ResNet-20 (~103
    # images/s), 3.3 h for the ResNet-14 (~190) and 2.6 h for the ResNet-8 (~240): about 11 h of wall time a seed,
    # the CT ResNet-20 and the random-size runs estimated from their 5k paces.
    "payoff_full": {
        "depth": 20,
        "epochs": 50,
        "train_samples": None,
        "heldout": 5000,
        "seeds": [1, 2, 3],
        "by_seed": True,
        "tiers": [
            [(RECIPE_SETTING, 20), (CT, 20), (CT, 14), (CT, 8)],
            [(CT_RANDOM, 20), (CT_RANDOM, 14), (CT_RANDOM, 8)],
        ],
        "then_runs": [(PLAIN_KL_SETTING, 20)],
        "then_seeds": [1],
    },
    # Issue 41's BigNAS levers, where the recipe's ST++ (lambda 2) falls short of the fair front at 5k (25 % of the
    # FLOPs; fine-tuning its pick did not close the gap): each lever on the recipe, seed 1 first (the screen), at the
    # payoff_fair plan's scale and subsets, so that its records join the committed fair front's. The rule that takes a
    # lever on to seeds 2 and 3 is written in docs/search.md.
    "payoff_levers": {
        "depth": 20,
        "epochs": 100,
        "train_samples": 5000,
        "seeds": [1],
        "settings": [replace(RECIPE_SETTING, lever=lever) for lever in LEVERS],
    },
    # A few seconds of training: the test suite's and a resume check's plan.
    "smoke": {"depth": 14, "epochs": 6, "train_samples": 256, "seeds": [1], "settings": [Setting("stpp", 1)]},
    # Paper scale on a GPU: ResNet-56, all 50k images, 200 epochs, the ResNet-56 recipes' one-epoch learning-rate
    # warm-up (0.005 of 200 epochs; the start check at full data, docs/results.md). First today's recipe (lambda 2)
    # against CT, seed by seed, so that a device budget cut after any seed still measures it; then the recipe's lambda
    # before (5) and the screen's other lambda (1), and the cpu plan's lambda grid (KL-), seed by seed.
    "gpu": {
        "depth": 56,
        "epochs": 200,
        "train_samples": None,
        "warmup": "0.005",
        "seeds": [1, 2, 3],
        "settings": [RECIPE_SETTING, CT],
        "then": [PLAIN_KL_SETTING, SMALLER_LAMBDA_SETTINGS[0], *LAMBDA_SETTINGS[1:]],
    },
}


def plan_runs(plan: str, results: Iterable[dict[str, Any]] = ()) -> list[Run]:
    """The runs of ``plan`` in launch order: every setting of seed 1, then of seed 2, ..., then the same
    for the plan's second tier of settings (``then``, at its own ``then_seeds`` if it names them), and, once
    ``results`` hold the screen the plan names (``screen``), the setting its rule picks at the follow-up seeds."""
    spec = PLANS[plan]
    runs = []
    scale = {"epochs": spec["epochs"], "train_samples": spec["train_samples"], "lr_warmup": spec.get("warmup", "0")}
    if "tiers" in spec:  # (setting, depth) pairs, a tier over the seeds (by_seed: the seeds over the tiers)
        scale["heldout"] = spec.get("heldout", 0)
        pairs = [(tier, seed) for tier in spec["tiers"] for seed in spec["seeds"]]
        then = [(spec["then_runs"], seed) for seed in spec.get("then_seeds", [])]
        if spec.get("by_seed"):  # the second tier's runs of a seed right after the seed's first tiers
            pairs = [(t, s) for seed in spec["seeds"] for t, s in [(tier, seed) for tier in spec["tiers"]] + [
                (runs, s) for runs, s in then if s == seed]]  # fmt: skip
        else:
            pairs += then
        for tier, seed in pairs:  # a depth not the plan's is named
            runs += [Run(s, seed, depth, **scale, depth_in_name=depth != spec["depth"]) for s, depth in tier]
        return runs
    tiers = ((spec["settings"], spec["seeds"]), (spec.get("then", []), spec.get("then_seeds", spec["seeds"])))
    for tier, seeds in tiers:
        for seed in seeds:
            runs += [Run(setting, seed, spec["depth"], **scale) for setting in tier]
            if tier is spec["settings"]:  # CT at the plan's other depths, after the first tier's runs of the seed
                runs += [Run(CT, seed, depth, **scale, depth_in_name=True) for depth in spec.get("other_depths", [])]
    picked = screen_state(_by_setting(results), plan)["pick"] if "screen" in spec else None
    if picked is not None:
        runs += [Run(picked, seed, spec["depth"], **scale) for seed in spec["screen"]["follow_seeds"]]
    return runs


def steps_per_epoch(run: Run) -> int:
    """Optimizer steps per epoch (batch ``BATCH_SIZE``, last batch kept)."""
    return math.ceil(run.num_train_images / BATCH_SIZE)


def train_command(run: Run, output_dir: Path, args: argparse.Namespace) -> list[str]:
    """The ``scripts/train.py`` command line of ``run``."""
    recipe = REPO / "configs" / f"cifar10_resnet56_{'ct' if run.setting.method == 'ct' else 'stpp'}.yaml"
    curve_steps = args.curve_every * steps_per_epoch(run)
    command = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        str(recipe),
        "--model_config",
        json.dumps({"depth": run.depth}),
        "--train_file",
        str(args.data_dir / "train.parquet"),
        "--validation_file",
        str(args.data_dir / "test.parquet"),
        "--max_eval_samples",
        str(args.curve_samples),
        "--num_train_epochs",
        str(run.epochs),
        "--per_device_train_batch_size",
        str(BATCH_SIZE),
        "--learning_rate",
        "0.1",
        "--warmup_steps",
        run.warmup,
        "--eval_strategy",
        "steps",
        "--eval_steps",
        str(curve_steps),
        "--save_strategy",
        "steps",
        "--save_steps",
        str(steps_per_epoch(run)),
        "--save_total_limit",
        "1",
        "--subnet_monitor_count",
        "0",
        "--num_eval_subnets",
        "0",
        "--logging_steps",
        str(steps_per_epoch(run)),
        "--dataloader_num_workers",
        "0",
        "--disable_tqdm",
        "true",
        "--report_to",
        "tensorboard",
        "--seed",
        str(run.seed),
        "--output_dir",
        str(output_dir),
        *run.setting.overrides(),
    ]
    if run.train_samples:
        command += ["--max_train_samples", str(run.train_samples)]
    if run.heldout:
        command[command.index("--train_file") + 1] = str(fixed_split(args.data_dir, args.out, run.heldout)[0])
    if args.device == "cpu":
        command += ["--use_cpu", "true"]
    if any(output_dir.glob("checkpoint-*")):
        command += ["--resume_from_checkpoint", "true"]
    return command


def split_names(heldout: int) -> dict[str, str]:
    """The file names of :func:`fixed_split`'s two parts (as a run's record names them)."""
    return {"train_file": f"split_train_without_{heldout}.parquet", "heldout_file": f"split_heldout_{heldout}.parquet"}


_SPLIT_LOCK = threading.Lock()


def fixed_split(data_dir: Path, out: Path, heldout: int) -> tuple[Path, Path]:
    """CIFAR-10's training split in two fixed parts, written once into the study folder ``out``: ``heldout`` images,
    as many of every class, that no run of the plan trains on (the search picks on them), and the rest, which every
    run trains on. The same for every seed and network: rows drawn per class with a fixed seed (0), in row order."""
    import numpy as np
    from datasets import load_dataset

    names = split_names(heldout)
    train_path, heldout_path = out / names["train_file"], out / names["heldout_file"]
    with _SPLIT_LOCK:  # two workers may ask at once
        if train_path.is_file() and heldout_path.is_file():
            return train_path, heldout_path
        raw = load_dataset("parquet", data_files=str(data_dir / "train.parquet"), split="train")
        labels = np.array(raw["label"])
        classes = np.unique(labels)
        if heldout % len(classes):
            raise SystemExit(
                f"a held-out split of {heldout} images cannot hold as many of each of {len(classes)} classes"
            )
        rng = np.random.default_rng(0)
        held = np.sort(np.concatenate([
            rng.choice(np.flatnonzero(labels == c), heldout // len(classes), replace=False) for c in classes
        ]))  # fmt: skip
        kept = np.setdiff1d(np.arange(len(raw)), held)
        out.mkdir(parents=True, exist_ok=True)
        for path, rows in ((heldout_path, held), (train_path, kept)):
            partial = path.with_suffix(".partial")
            raw.select(rows.tolist()).to_parquet(str(partial))
            partial.replace(path)
    return train_path, heldout_path


def _environment(threads: int) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    return env


def check_environment(args: argparse.Namespace) -> None:
    """Exit naming the fix when the runs' interpreter cannot import stim_hf (every run would fail at once)."""
    probe = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--help"],  # the runs' own entry point and sys.path
        cwd=REPO,
        env=_environment(args.threads),
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        sys.exit(
            f"the training runs cannot import stim_hf with {sys.executable} ({last}); install this checkout "
            f"(pip install -e {REPO}) and run the study again: nothing was started"
        )


def train_and_analyze(run: Run, args: argparse.Namespace) -> dict[str, Any] | None:
    """Train ``run`` (resuming it if it has a checkpoint), analyse it, and write its ``result.json``."""
    output_dir = args.out / run.name
    result_path = output_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    trained = (output_dir / "all_results.json").exists()
    if not trained and args.launch_until is not None and datetime.datetime.now() > args.launch_until:
        print(f"[{run.name}] not launched: past --launch-until {args.launch_until:%Y-%m-%d %H:%M}; the same command "
              "without it trains or resumes it", flush=True)  # fmt: skip
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    if not trained:
        command = train_command(run, output_dir, args)
        print(f"[{run.name}] {shlex.join(command)}", flush=True)
        code = train_keeping_wall_time(command, output_dir, args.threads)
        if code != 0:
            print(f"[{run.name}] training exited with {code}; see {output_dir / 'train.log'}", flush=True)
            return None
    command = [sys.executable, __file__, "--analyze-run", str(output_dir), "--data-dir", str(args.data_dir)]
    command += ["--num-subnets", str(args.num_subnets), "--recalibrate-bn", str(args.recalibrate_bn)]
    command += ["--device", args.device, "--test-samples", str(args.test_samples)]
    command += ["--image-size", str(run.setting.image_size)]
    print(f"[{run.name}] analysing", flush=True)
    with open(output_dir / "analysis.log", "w") as log:
        code = subprocess.run(command, cwd=REPO, env=_environment(args.threads), stdout=log, stderr=log).returncode
    if code != 0:
        print(f"[{run.name}] analysis exited with {code}; see {output_dir / 'analysis.log'}", flush=True)
        return None
    result = {
        **run_fields(run),
        **json.loads((output_dir / "analysis.json").read_text()),
        **training_record(output_dir),
    }
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[{run.name}] full {result['full_top1']}%, sub-networks {result['subnet_top1_recalibrated']}%", flush=True)
    return result


def train_keeping_wall_time(command: list[str], output_dir: Path, threads: int) -> int:
    """Run the training ``command`` (output to ``train.log``) and return its exit code.

    ``wall_seconds.txt`` holds one line per session that trained the run; this session's line is
    rewritten (atomically) every ``WALL_CLOCK_EVERY_S`` seconds while it trains, so a session that ends
    with the run killed still counts, to within that interval.
    """
    wall_file = output_dir / "wall_seconds.txt"
    earlier = wall_file.read_text().split() if wall_file.exists() else []
    started = time.perf_counter()
    with open(output_dir / "train.log", "a") as log:
        process = subprocess.Popen(command, cwd=REPO, env=_environment(threads), stdout=log, stderr=log)
        while True:
            try:
                code = process.wait(timeout=WALL_CLOCK_EVERY_S)
            except subprocess.TimeoutExpired:
                code = None
            partial = wall_file.with_name(wall_file.name + ".partial")
            partial.write_text("\n".join([*earlier, f"{time.perf_counter() - started:.1f}"]) + "\n")
            os.replace(partial, wall_file)
            if code is not None:
                return code


def run_fields(run: Run) -> dict[str, Any]:
    """The identifying fields of ``run`` as results.json holds them."""
    return {
        "name": run.name,
        "setting": run.setting_label,
        **asdict(run.setting),
        "seed": run.seed,
        "epochs": run.epochs,
        "train_samples": run.train_samples,
        "depth": run.depth,
        "lr_warmup": run.lr_warmup,
        **({"heldout": run.heldout, **split_names(run.heldout)} if run.heldout else {}),
    }


def training_record(output_dir: Path) -> dict[str, Any]:
    """The learning curve, the collapse verdict, the wall time and the pace of a finished run."""
    state = json.loads((output_dir / "trainer_state.json").read_text())
    history = state["log_history"]
    curve = [(e["epoch"], e["eval_accuracy"]) for e in history if "eval_accuracy" in e]
    ce = [(e["epoch"], e["ce_loss"]) for e in history if "ce_loss" in e]
    collapse = [e["collapse"] for e in history if "collapse" in e]
    wall_file = output_dir / "wall_seconds.txt"
    walls = [float(x) for x in wall_file.read_text().split()] if wall_file.exists() else []
    speeds = [e["samples_per_second"] for e in history if "samples_per_second" in e]
    return {
        **training_minutes(output_dir, state),
        "collapsed": bool(collapse),
        "collapse_message": collapse[0] if collapse else None,
        "curve_eval_top1": [[round(epoch, 3), round(100 * acc, 2)] for epoch, acc in curve],
        "curve_train_ce": [[round(epoch, 3), round(value, 4)] for epoch, value in ce],
        "wall_minutes": round(sum(walls) / 60, 1),  # sessions before the heartbeat lost a killed session's time
        "sessions": len(walls),
        "images_per_second": round(statistics.median(speeds), 1) if speeds else None,
    }


def training_minutes(output_dir: Path, state: dict[str, Any]) -> dict[str, float]:
    """Training time from the logged pace (``samples_per_second`` over each logging interval): every
    session counts, killed ones too; evaluation and checkpoint writing are left out."""
    train_samples = json.loads((output_dir / "train_results.json").read_text())["train_samples"]
    images_per_step = train_samples * state["num_train_epochs"] / state["max_steps"]
    seconds, previous_step = 0.0, 0
    for entry in state["log_history"]:
        if entry.get("samples_per_second"):
            seconds += (entry["step"] - previous_step) * images_per_step / entry["samples_per_second"]
            previous_step = entry["step"]
    return {"train_minutes": round(seconds / 60, 1)}


def analyze_run(output_dir: Path, args: argparse.Namespace) -> None:
    """The loafing analysis of one finished run on the whole test split; writes ``analysis.json``."""
    from stim_hf.data.image_datasets import DataArguments
    from stim_hf.tools.loafing import LoafingArguments, analyze_checkpoints

    data_args = DataArguments(
        train_file=str(args.data_dir / "train.parquet"),
        validation_file=str(args.data_dir / "test.parquet"),
        max_eval_samples=args.test_samples or None,
        image_size=args.image_size,
        augmentation="cifar",
    )
    loafing_args = LoafingArguments(
        num_subnets=args.num_subnets,
        seed=42,
        sampling="prefix",
        recalibrate_bn=args.recalibrate_bn if args.num_subnets else 0,
        output_dir=str(output_dir / "loafing"),
        device=args.device if args.device != "auto" else "auto",
        progress=False,
    )
    report = analyze_checkpoints([str(output_dir)], data_args, loafing_args, labels=[output_dir.name])
    rows = report["checkpoints"][0]["results"]
    kinds = {n["name"]: n["kind"] for n in report["networks"]}
    full = next(r for r in rows if kinds[r["network"]] == "full")
    subnets = [r for r in rows if kinds[r["network"]] == "sampled"]

    def mean_top1(key: str) -> float | None:
        return round(100 * statistics.mean(r[key] for r in subnets), 2) if subnets else None

    summary = {
        "full_top1": round(100 * full["accuracy"], 2),
        # the loafing report's "accuracy" is with re-estimated statistics, "accuracy_inherited_bn" without
        "subnet_top1_recalibrated": mean_top1("accuracy"),
        "subnet_top1_inherited": mean_top1("accuracy_inherited_bn"),
        "num_test_images": report["settings"]["num_eval_images"],
        "num_subnets": len(subnets),
        "recalibration_images": args.recalibrate_bn,
    }
    (output_dir / "analysis.json").write_text(json.dumps(summary, indent=2) + "\n")


# -- report ------------------------------------------------------------------------------------------


def _mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def paired_t(diffs: list[float]) -> str:
    """The paired t statistic of seed-by-seed differences and its two-sided p (one-sample t test against 0)."""
    if len(diffs) < 2 or statistics.stdev(diffs) == 0:
        return "-"
    from scipy.stats import ttest_1samp

    test = ttest_1samp(diffs, 0.0)
    return f"{test.statistic:.2f} (p {test.pvalue:.3f})"


def paired_differences(runs: list[dict[str, Any]], baseline: list[dict[str, Any]], key: str) -> dict[int, float]:
    """``key`` of ``runs`` minus that of ``baseline``, seed by seed, for the seeds both have a value at."""
    base = {r["seed"]: r[key] for r in baseline if r.get(key) is not None}
    return {
        r["seed"]: r[key] - base[r["seed"]]
        for r in sorted(runs, key=lambda r: r["seed"])
        if r.get(key) is not None and r["seed"] in base
    }


def setting_order(names, plan: str) -> list[str]:
    """``names`` in the order the plan first runs them (settings the plan does not know last)."""
    order = [run.setting_label for run in plan_runs(plan)] if plan in PLANS else []
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def setting_comparisons(by_setting: dict[str, list[dict[str, Any]]], plan: str) -> list[str]:
    """Every two ST settings that share at least two seeds: the later setting of the plan minus the
    earlier one, seed by seed (full network and sub-networks), so that one factor at a time (lambda,
    plain KL against KL-) is read off paired rather than against the seed spread."""
    names = setting_order((n for n in by_setting if n != "ct"), plan)
    lines = []
    for i, earlier in enumerate(names):
        for later in names[i + 1 :]:
            full = paired_differences(by_setting[later], by_setting[earlier], "full_top1")
            if len(full) < 2:
                continue
            seeds, diffs = list(full), list(full.values())
            sub = paired_differences(by_setting[later], by_setting[earlier], "subnet_top1_recalibrated")
            sub_diffs = [sub[s] for s in seeds if s in sub]
            lines.append(
                f"| {later} − {earlier} | {', '.join(map(str, seeds))} | {_mean_std(diffs)} | {paired_t(diffs)} "
                f"| {sum(d > 0 for d in diffs)} of {len(diffs)} | {_mean_std(sub_diffs)} |"
            )
    if not lines:
        return []
    return [
        "",
        "Paired between ST settings (same seeds; Δ in points; t: paired t statistic, p two-sided):",
        "",
        "| comparison | seeds | full top-1 Δ | t (p) | seeds with Δ > 0 | sub-net Δ, BN re-est. |",
        "| --- | --- | --- | --- | --- | --- |",
        *lines,
    ]


def _by_setting(results: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_setting.setdefault(r["setting"], []).append(r)
    return by_setting


def _against_recipe_and_ct(
    runs: list[dict[str, Any]], by_setting: dict[str, list[dict[str, Any]]]
) -> tuple[dict, dict]:
    """Seed by seed: the runs' full network minus the recipe's, and their sub-networks (BN re-est.) minus CT's."""
    full = paired_differences(runs, by_setting.get(PLAIN_KL_SETTING.name, []), "full_top1")
    return full, paired_differences(runs, by_setting.get("ct", []), "subnet_top1_recalibrated")


def screen_state(by_setting: dict[str, list[dict[str, Any]]], plan: str) -> dict[str, Any]:
    """The plan's screen (its second tier, on ``then_seeds``) by its rule (the plan's ``screen``): per screened
    setting its full network against the recipe's and its sub-networks (BatchNorm re-estimated) against CT's, seed by
    seed (``rows``), the settings still unfinished (``waiting``) and the one the rule sends on (``pick``, or None)."""
    spec = PLANS[plan]
    rule = spec["screen"]
    seeds = spec.get("then_seeds", spec["seeds"])
    rows, qualified, waiting = [], [], []
    for setting in spec["then"]:
        runs = [r for r in by_setting.get(setting.name, []) if r["seed"] in seeds]
        full, sub = _against_recipe_and_ct(runs, by_setting)
        if set(full) != set(seeds) or set(sub) != set(seeds):
            waiting.append(setting)
            continue
        passes = all(full[s] >= rule["full_gain"] and sub[s] >= rule["subnet_over_ct"] for s in seeds)
        row = {
            "setting": setting, "full_top1": statistics.mean(r["full_top1"] for r in runs), "full": full,
            "sub_top1": statistics.mean(r["subnet_top1_recalibrated"] for r in runs), "sub": sub, "passes": passes,
        }  # fmt: skip
        rows.append(row)
        qualified += [row] if passes else []
    pick = None
    if qualified and not waiting:
        best = max(row["full_top1"] for row in qualified)
        pick = max((row for row in qualified if row["full_top1"] >= best - rule["tie"]), key=lambda r: r["sub_top1"])
        pick = pick["setting"]
    return {"rows": rows, "waiting": waiting, "pick": pick}


def screen_confirmation(by_setting: dict[str, list[dict[str, Any]]], plan: str, picked: Setting) -> str:
    """The rule's last step on the picked setting over the plan's seeds: does it beat the recipe on every seed, by a
    mean of ``full_gain`` or more, with sub-networks ``subnet_over_ct`` above CT's on every seed?"""
    spec = PLANS[plan]
    rule, seeds = spec["screen"], spec["seeds"]
    full, sub = _against_recipe_and_ct(by_setting.get(picked.name, []), by_setting)
    missing = [seed for seed in seeds if seed not in full or seed not in sub]
    if missing:
        return f"Waiting for {picked.name} on seed(s) {', '.join(map(str, missing))}."
    diffs = [full[seed] for seed in seeds]
    wins, subnets_hold = sum(d > 0 for d in diffs), all(sub[seed] >= rule["subnet_over_ct"] for seed in seeds)
    taken = wins == len(seeds) and statistics.mean(diffs) >= rule["full_gain"] and subnets_hold
    verdict = "the recipes take it" if taken else f"the recipe ({PLAIN_KL_SETTING.name}) stays"
    return (
        f"Over seeds {', '.join(map(str, seeds))}, {picked.name} − the recipe: {_mean_std(diffs)} points "
        f"({paired_t(diffs)}), ahead on {wins} of {len(seeds)}; sub-networks at least {rule['subnet_over_ct']:g} above "
        f"CT's on every seed: {'yes' if subnets_hold else 'no'}. By the rule, {verdict}."
    )


def screen_reading(by_setting: dict[str, list[dict[str, Any]]], plan: str) -> list[str]:
    """The plan's screen as report lines (:func:`screen_state`): each screened setting, whether it qualifies, which
    setting goes on (or that none does, or which runs the rule still waits for), and its reading over all seeds."""
    if "screen" not in PLANS.get(plan, {}):
        return []
    rule, state = PLANS[plan]["screen"], screen_state(by_setting, plan)
    if state["waiting"]:
        verdict = [f"Waiting for {', '.join(setting.name for setting in state['waiting'])}."]
    elif state["pick"] is not None:
        seeds = ", ".join(map(str, rule["follow_seeds"]))
        verdict = [
            f"By the rule, {state['pick'].name} goes on to seeds {seeds}.",
            "",
            screen_confirmation(by_setting, plan, state["pick"]),
        ]
    else:
        verdict = [f"No screened setting qualifies: by the rule the recipe ({PLAIN_KL_SETTING.name}) stays."]
    lines = [
        "",
        f"The screen (the plan's second tier) by its rule: full network at least {rule['full_gain']:g} points above "
        f"the recipe's ({PLAIN_KL_SETTING.name}) and sub-networks (BN re-est.) at least {rule['subnet_over_ct']:g} "
        f"above CT's, on the same seeds; of several, the highest full network (within {rule['tie']:g}, the better "
        "sub-networks).",
        "",
    ]
    if state["rows"]:
        lines += ["| setting | seeds | full top-1 | Δ vs recipe | sub-nets, BN re-est. | Δ vs CT | qualifies |"]
        lines += ["| --- | --- | --- | --- | --- | --- | --- |"]
        for row in state["rows"]:
            lines.append(
                f"| {row['setting'].name} | {', '.join(map(str, row['full']))} | {row['full_top1']:.2f} "
                f"| {_mean_std(list(row['full'].values()))} | {row['sub_top1']:.2f} "
                f"| {_mean_std(list(row['sub'].values()))} | {'yes' if row['passes'] else 'no'} |"
            )
        lines.append("")
    return lines + verdict


def data_size_points(results: list[dict[str, Any]], plan: str) -> list[dict[str, Any]]:
    """Plain KL with ``cosine_up`` (lambda 5, then the screened lambdas) against CT in each plan ``plan`` names
    (``compare_with``, read from their committed ``results.json``) and in ``plan`` itself: for each setting
    measured at two data sizes or more, per plan its scale, its CT and setting runs and the paired differences by
    seed (full network and sub-networks). Plans without a paired seed are left out."""
    by_plan, scale = {}, {}
    for name in [*PLANS[plan]["compare_with"], plan]:
        path = MEASUREMENTS / name / "results.json"
        by_plan[name] = results if name == plan else json.loads(path.read_text()) if path.exists() else []
        run = plan_runs(name)[0]  # the plan's scale: every run of a plan has the same
        scale[name] = {"images": run.num_train_images, "epochs": run.epochs, "steps": run.epochs * steps_per_epoch(run)}
    points = []
    for setting in [PLAIN_KL_SETTING, *SMALLER_LAMBDA_SETTINGS]:
        rows = []
        for name, runs in by_plan.items():
            ct, stpp = [r for r in runs if r["setting"] == "ct"], [r for r in runs if r["setting"] == setting.name]
            full = paired_differences(stpp, ct, "full_top1")
            if full:
                rows.append({
                    "plan": name, "setting": setting.name, "kl_coef": setting.kl_coef, **scale[name], "ct": ct,
                    "setting_runs": stpp, "full": full, "sub": paired_differences(stpp, ct, "subnet_top1_recalibrated"),
                })  # fmt: skip
        if len({row["images"] for row in rows}) > 1:
            points += rows
    return points


def data_size_comparison(results: list[dict[str, Any]], plan: str) -> list[str]:
    """Each setting's gain over CT at each data size it was measured at (:func:`data_size_points`): one row per
    setting and plan, with the plan's data size, epochs and steps."""
    rows = []
    for point in data_size_points(results, plan):
        full, diffs, ct, stpp = point["full"], list(point["full"].values()), point["ct"], point["setting_runs"]
        rows.append(
            f"| {point['setting']} | {point['plan']} | {point['images']:,} | {point['epochs']} | {point['steps']:,} | "
            f"{', '.join(map(str, full))} | {_mean_std([r['full_top1'] for r in ct if r['seed'] in full])} "
            f"| {_mean_std([r['full_top1'] for r in stpp if r['seed'] in full])} | {_mean_std(diffs)} "
            f"| {paired_t(diffs)} | {sum(d > 0 for d in diffs)} of {len(diffs)} | {_mean_std(list(point['sub'].values()))} "
            f"| {_final_train_ce(ct, full)} / {_final_train_ce(stpp, full)} |"
        )
    if not rows:
        return []
    return [
        "",
        f"Plain KL with `cosine_up` at each lambda measured at both sizes ({PLAIN_KL_SETTING.name}: the 5k study's pick; "
        f"{RECIPE_SETTING.name}: the recipes' since the full plan's screen) against CT as the training data grow "
        "(ResNet-20; paired by seed; Δ in points; [data_size.png](data_size.png)):",
        "",
        "| setting | plan | training images | epochs | steps | seeds | CT full top-1 | setting full top-1 | Δ | t (p) "
        "| seeds with Δ > 0 | sub-net Δ, BN re-est. | last-epoch training CE, CT / setting |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "The training CE is the full network's cross-entropy on the augmented training images, averaged over the last "
        "epoch (mean over the seeds): how closely each fits its training data.",
    ]


def plot_data_size(results: list[dict[str, Any]], plan: str, path: Path) -> bool:
    """Each setting's paired gain over CT at each data size (:func:`data_size_points`), each seed a dot and each
    mean a bar: the full network (left) and the sub-networks with BatchNorm re-estimated (right). False if nothing
    to plot."""
    points = data_size_points(results, plan)
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, title in ((axes[0], "full", "full network"), (axes[1], "sub", "sub-networks, BN re-estimated")):
        for i, point in enumerate(points):
            values = list(point[key].values())
            ax.scatter([i] * len(values), values, color=f"C{i}", zorder=3, label=f"{point['setting']}, "
                       f"{point['plan']}: seeds " + ", ".join(map(str, point[key])))  # fmt: skip
            ax.hlines(statistics.mean(values), i - 0.25, i + 0.25, color=f"C{i}", linewidth=2)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(
            range(len(points)),
            [f"λ {p['kl_coef']:g}, {p['plan']}\n{p['images'] // 1000}k, {p['epochs']} ep." for p in points],
        )
        ax.set(ylabel="setting − CT, test top-1 (points)", title=title)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _final_train_ce(runs: list[dict[str, Any]], seeds: Iterable[int]) -> str:
    """The mean over ``seeds`` of each run's last logged training cross-entropy (its last epoch), or "-"."""
    values = [r["curve_train_ce"][-1][1] for r in runs if r["seed"] in seeds and r.get("curve_train_ce")]
    return f"{statistics.mean(values):.3f}" if values else "-"


def report_markdown(results: list[dict[str, Any]], plan: str) -> str:
    """Mean ± std per setting, the paired difference against CT and between ST settings, seed by seed."""
    by_setting = _by_setting(results)
    by_setting = {name: by_setting[name] for name in setting_order(by_setting, plan)}
    lines = [
        f"Plan `{plan}`: {len(results)} finished runs. Accuracies in %, on the whole test split.",
        "",
        "| setting | runs | collapsed | full top-1 | paired Δ vs CT (same seed) | t (p) | seeds better than CT "
        "| sub-net mean, BN re-est. | sub-net mean, BN inherited |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in by_setting.items():
        diffs = list(paired_differences(runs, by_setting.get("ct", []), "full_top1").values()) if name != "ct" else []
        better = f"{sum(d > 0 for d in diffs)} of {len(diffs)}" if diffs else "-"
        lines.append(
            f"| {name} | {len(runs)} | {sum(r['collapsed'] for r in runs)} | {_mean_std([r['full_top1'] for r in runs])} "
            f"| {_mean_std(diffs)} | {paired_t(diffs)} | {better} "
            f"| {_mean_std([r['subnet_top1_recalibrated'] for r in runs])} "
            f"| {_mean_std([r['subnet_top1_inherited'] for r in runs])} |"
        )
    lines += setting_comparisons(by_setting, plan)
    lines += screen_reading(by_setting, plan)
    if PLANS.get(plan, {}).get("compare_with"):
        lines += data_size_comparison(results, plan)
    lines += [
        "",
        "| run | full top-1 | sub-nets BN re-est. | sub-nets inherited | collapsed | train min | wall min | images/s |",
    ]
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(results, key=lambda r: (r["seed"], r["setting"])):
        lines.append(
            f"| {r['name']} | {r['full_top1']:.2f} | {_mean_std([r['subnet_top1_recalibrated']])} | "
            f"{_mean_std([r['subnet_top1_inherited']])} | {'yes' if r['collapsed'] else 'no'} | "
            f"{r.get('train_minutes', '-')} | {r['wall_minutes']} | {r['images_per_second']} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(results: list[dict[str, Any]], path: Path) -> None:
    """Learning curves (test top-1 and training cross-entropy against epoch), one colour per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["setting"] for r in results})
    colours = dict(zip(settings, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3, strict=False))
    figure, (top1, ce) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        label = r["setting"] if r["seed"] == min(x["seed"] for x in results if x["setting"] == r["setting"]) else None
        if r["curve_eval_top1"]:
            epochs, values = zip(*r["curve_eval_top1"], strict=True)
            top1.plot(epochs, values, color=colours[r["setting"]], alpha=0.8, label=label)
        if r["curve_train_ce"]:
            epochs, values = zip(*r["curve_train_ce"], strict=True)
            ce.plot(epochs, values, color=colours[r["setting"]], alpha=0.8, label=label)
    top1.set(xlabel="epoch", ylabel="test top-1 (%, curve subset)", title="full network")
    ce.set(xlabel="epoch", ylabel="training cross-entropy", title="full network", yscale="log")
    top1.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(results: list[dict[str, Any]], report_dir: Path, plan: str) -> None:
    """Write results.json, results.md, learning_curves.png and, for a plan that compares data sizes, data_size.png
    into ``report_dir``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    results = sorted(results, key=lambda r: (r["seed"], r["setting"]))
    (report_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (report_dir / "results.md").write_text(report_markdown(results, plan))
    if results:
        plot_curves(results, report_dir / "learning_curves.png")
    if PLANS.get(plan, {}).get("compare_with"):
        plot_data_size(results, plan, report_dir / "data_size.png")
    print(report_markdown(results, plan), flush=True)


def write_combined_results(measurements: Path) -> None:
    """``results.json`` beside the plans' folders: every finished run of every plan, each with its ``plan``."""
    combined = []
    for path in sorted(measurements.glob("*/results.json")):
        combined += [{"plan": path.parent.name, **r} for r in json.loads(path.read_text())]
    (measurements / "results.json").write_text(json.dumps(combined, indent=2) + "\n")


def carried_results(report_dir: Path) -> dict[tuple, dict[str, Any]]:
    """Finished runs recorded in ``report_dir/results.json`` (e.g. committed by an earlier session)."""
    path = report_dir / "results.json"
    if not path.exists():
        return {}
    carried = {}
    for r in json.loads(path.read_text()):
        key = (
            r["method"],
            r["kl_coef"],
            r["kl_loss"],
            r["intro"],
            r["seed"],
            r["depth"],
            r["epochs"],
            r["train_samples"],
            r.get("lr_warmup", "0"),  # records from before plans had a warm-up of their own
            r.get("input", "batch"),  # records from before the full network's input was a setting
            r.get("heldout", 0),  # records from before plans held images out
            r.get("lever", ""),  # records from before settings took a lever
        )
        carried[key] = r
    return carried


def launch_deadline(text: str) -> datetime.datetime:
    """``--launch-until``: ``HH:MM`` today (local time) or an ISO date and time."""
    try:
        if len(text) <= 5:
            return datetime.datetime.combine(datetime.date.today(), datetime.time.fromisoformat(text))
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HH:MM or YYYY-MM-DDTHH:MM") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings of the study."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", choices=sorted(PLANS), default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "full_network_study", help="run folders")
    parser.add_argument(
        "--report-dir", type=Path, default=None, help="default: docs/measurements/full_network_study/PLAN"
    )
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder with CIFAR-10 train/test.parquet")
    parser.add_argument("--parallel", type=int, default=1, help="training runs at once")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per run (keep it fixed in a study)")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (the trainer's device)")
    parser.add_argument("--curve-every", type=int, default=5, help="epochs between learning-curve evaluations")
    parser.add_argument("--curve-samples", type=int, default=2000, help="test images of the learning-curve evaluations")
    parser.add_argument("--test-samples", type=int, default=0, help="test images of the final analysis (0: all)")
    parser.add_argument("--num-subnets", type=int, default=4, help="fixed sub-networks of the final analysis")
    parser.add_argument("--recalibrate-bn", type=int, default=1000, help="images for the sub-networks' BatchNorm")
    parser.add_argument("--only", default=None, help="comma-separated run names: run just these")
    parser.add_argument("--report-only", action="store_true", help="write the report from the finished runs")
    parser.add_argument(
        "--launch-until",
        type=launch_deadline,
        default=None,
        help="HH:MM (today) or YYYY-MM-DDTHH:MM: launch no training after it (one that would not finish before a "
        "session ends); a run launched before goes on, a trained one is still analysed",
    )
    parser.add_argument("--analyze-run", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, default=32, help=argparse.SUPPRESS)  # the analysed run's
    args = parser.parse_args(argv)
    args.out = args.out.expanduser().resolve()
    args.report_dir = (args.report_dir or MEASUREMENTS / args.plan).resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    """Run (or resume) the plan's runs, then write the report."""
    args = parse_args(argv)
    if args.analyze_run is not None:
        analyze_run(args.analyze_run, args)
        return
    carried = carried_results(args.report_dir)
    results: dict[tuple, dict[str, Any]] = {}
    known: set[tuple] = set()
    lock = threading.Lock()

    def work(run: Run) -> None:
        result = train_and_analyze(run, args)
        if result is not None:
            with lock:
                results[run.key()] = result
                write_report(list(results.values()), args.report_dir, args.plan)

    while True:  # once more when finished runs add runs to the plan (the setting a screen picks)
        plan = plan_runs(args.plan, results.values())
        # The report covers every finished run of the plan, also those an --only call does not train.
        for run in plan:
            path = args.out / run.name / "result.json"
            if run.key() not in results and run.key() in carried:
                results[run.key()] = carried[run.key()]
            elif run.key() not in results and path.exists():
                results[run.key()] = json.loads(path.read_text())
            state = args.out / run.name / "trainer_state.json"
            if run.key() in results and "train_minutes" not in results[run.key()] and state.exists():
                # Records written before train_minutes existed get it from their run's own log.
                results[run.key()] |= training_minutes(state.parent, json.loads(state.read_text()))
        if {run.key() for run in plan} != known:
            known = {run.key() for run in plan}
            continue  # the results just read may add runs
        runs = plan
        if args.only:
            wanted = set(args.only.split(","))
            unknown = wanted - {run.name for run in plan}
            if unknown:
                sys.exit(
                    f"--only {','.join(sorted(unknown))}: not a run of plan {args.plan!r}; its runs are "
                    f"{', '.join(run.name for run in plan)}"
                )
            runs = [run for run in plan if run.name in wanted]
        pending = [run for run in runs if run.key() not in results]
        if args.report_only or not pending:
            break
        check_environment(args)
        print(f"{len(results)} runs finished before, {len(pending)} to train or resume", flush=True)
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            list(pool.map(work, pending))
        if any(run.key() not in results for run in pending):
            break  # a run failed: no follow-up on a partial screen
    write_report(list(results.values()), args.report_dir, args.plan)
    if args.report_dir.parent == MEASUREMENTS:
        write_combined_results(MEASUREMENTS)


if __name__ == "__main__":
    main()
