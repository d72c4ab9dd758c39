"""Loafing of common training vs ST++ on CIFAR-10 (issue 4): same short budget, same sub-networks.

  python bench/loafing_cifar10.py                  # ResNet-20, 10k images, 3 epochs each: ~15 min on 2 CPU cores
  python bench/loafing_cifar10.py --train-samples 1000 --epochs 1 --eval-samples 500 --no-docs   # smoke run

Trains a CIFAR ResNet-20 with common training (CT) and with ST++ through ``scripts/train.py``
subprocesses (the CIFAR-10 recipes with ResNet-20 / short-budget overrides, the CIFAR-10 parquet
files of ``../shared/data/cifar10``), then runs the loafing analysis
(:func:`stim_hf.tools.loafing.analyze_checkpoints`) on both checkpoints: the full network and the same
fixed sub-networks, on the test split, with and without BatchNorm statistics re-estimated per
sub-network. Writes

- ``outputs/bench_loafing_cifar10/{ct,stpp}/``: the two runs (model, results, TensorBoard events);
- ``outputs/bench_loafing_cifar10/analysis/loafing.{json,csv,png}``: the analysis;
- ``docs/img/loafing_cifar10.png`` and the measured tables in ``docs/loafing.md`` (between the
  ``BEGIN/END bench/loafing_cifar10.py`` markers), unless ``--no-docs``.
"""

from __future__ import annotations

import os

# OpenMP threads that busy-wait are dramatically slower on a CPU shared with other jobs; this must
# be set before torch is imported (here and in the training subprocesses).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from stim_hf.training.config import METHOD_PRESETS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data" / "cifar10"
DOC = REPO / "docs" / "loafing.md"
DOC_IMAGE = REPO / "docs" / "img" / "loafing_cifar10.png"
BEGIN, END = "<!-- BEGIN bench/loafing_cifar10.py -->", "<!-- END bench/loafing_cifar10.py -->"
RUNS = (("CT", "ct"), ("ST++", "stpp"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth (6n+2)")
    parser.add_argument("--train-samples", type=int, default=10_000, help="training images (seeded subset)")
    parser.add_argument("--epochs", type=float, default=3, help="epochs per run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--eval-samples", type=int, default=4000, help="test images of the analysis (seeded subset)")
    parser.add_argument("--num-subnets", type=int, default=8)
    parser.add_argument("--recalibrate-bn", type=int, default=1000, help="0: no BatchNorm re-estimation column")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output-root", default=str(REPO / "outputs" / "bench_loafing_cifar10"))
    parser.add_argument("--skip-training", action="store_true", help="analyse the runs already in --output-root")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/loafing.md and docs/img/")
    return parser.parse_args(argv)


def train_command(args: argparse.Namespace, method: str, output_dir: Path) -> list[str]:
    """The ``scripts/train.py`` command line of one run (the CIFAR-10 recipe plus short-budget overrides)."""
    return [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        str(REPO / "configs" / f"cifar10_resnet56_{method}.yaml"),
        "--model_config",
        json.dumps({"depth": args.depth}),
        "--train_file",
        str(DATA_DIR / "train.parquet"),
        "--validation_file",
        str(DATA_DIR / "test.parquet"),
        "--max_train_samples",
        str(args.train_samples),
        "--max_eval_samples",
        "1000",
        "--num_train_epochs",
        str(args.epochs),
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--learning_rate",
        str(args.learning_rate),
        "--warmup_steps",
        "20",
        "--output_dir",
        str(output_dir),
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--num_eval_subnets",
        "0",
        "--subnet_monitor_count",
        str(args.num_subnets),
        "--logging_steps",
        "20",
        "--use_cpu",
        "true",
        "--dataloader_num_workers",
        "0",
        "--disable_tqdm",
        "true",
        "--seed",
        str(args.seed),
        # lambda and KL as these short-budget figures (README, docs/loafing.md, the 2-epoch study of
        # docs/measurements/reproduce_cifar10/) were measured: 1 from step 0 and each method's own KL (ST plain,
        # ST++ KL-), the recipes' values before the 100-epoch study of docs/results.md set them.
        *(
            ["--kl_coef", "1", "--kl_coef_schedule", "constant", "--kl_loss", METHOD_PRESETS[method]["kl_loss"]]
            if method != "ct"
            else []
        ),
    ]


def train(args: argparse.Namespace, root: Path) -> dict[str, dict]:
    """Run both trainings one after the other; return each run's wall time and final metrics."""
    runs = {}
    for label, method in RUNS:
        output_dir = root / method
        shutil.rmtree(output_dir, ignore_errors=True)
        command = train_command(args, method, output_dir)
        print(f"[{label}] {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True)
        wall = time.perf_counter() - start
        results = json.loads((output_dir / "all_results.json").read_text())
        runs[label] = {"wall_s": wall, "results": results, "command": command}
        print(f"[{label}] done in {wall / 60:.1f} min: eval_accuracy {results.get('eval_accuracy')}", flush=True)
    return runs


def analyse(args: argparse.Namespace, root: Path) -> tuple[dict, dict, float]:
    """Run the loafing analysis on both runs; return the report, the written paths and the wall time."""
    from stim_hf.data.image_datasets import DataArguments
    from stim_hf.tools.loafing import LoafingArguments, analyze_checkpoints, write_report

    data_args = DataArguments(
        train_file=str(DATA_DIR / "train.parquet"),
        validation_file=str(DATA_DIR / "test.parquet"),
        max_eval_samples=args.eval_samples,
        image_size=32,
        augmentation="cifar",
    )
    loafing_args = LoafingArguments(
        num_subnets=args.num_subnets,
        seed=args.seed,
        sampling="prefix",
        recalibrate_bn=args.recalibrate_bn,
        output_dir=str(root / "analysis"),
        batch_size=500,
    )
    start = time.perf_counter()
    report = analyze_checkpoints([str(root / m) for _, m in RUNS], data_args, loafing_args, labels=[x for x, _ in RUNS])
    wall = time.perf_counter() - start
    title = (
        f"CIFAR-10, ResNet-{args.depth}, {args.train_samples // 1000}k images x {args.epochs:g} epochs: "
        f"{len(report['networks']) - 1} fixed sub-networks"
    )
    paths = write_report(report, loafing_args.output_dir, title=title)
    return report, paths, wall


def markdown(args: argparse.Namespace, report: dict, runs: dict[str, dict], analysis_s: float) -> str:
    """The measured block for docs/loafing.md: settings, command, summary and per-network tables."""
    from stim_hf.tools.loafing import format_network_table, format_summary_table

    lines = [
        BEGIN,
        "",
        f"Measured by `python bench/loafing_cifar10.py` ({time.strftime('%Y-%m-%d')}, CPU, 2 shared cores): "
        f"CIFAR ResNet-{args.depth}, {args.train_samples} training images (seeded subset of CIFAR-10 train), "
        f"{args.epochs:g} epochs, batch {args.batch_size}, SGD nesterov lr {args.learning_rate} cosine, wd 5e-4, "
        "no gradient clipping, the `configs/cifar10_resnet56_{ct,stpp}.yaml` recipes otherwise (ST++: one sub-network per step, "
        "prefix sampling over the full space, KL-, inputs 14..32 px, `bn_policy: main_only`). Analysis: "
        f"{report['settings']['num_eval_images']} CIFAR-10 test images (seeded subset), the full network and "
        f"{len(report['networks']) - 1} fixed sub-networks (seed {args.seed}), accuracies in %"
        + (
            f"; sub-networks scored with BatchNorm statistics re-estimated for each on {args.recalibrate_bn} "
            "training images, \"inherited BN\": with the full network's statistics (the papers' measure)."
            if args.recalibrate_bn
            else "; every network with the full network's BatchNorm statistics."
        ),
        "",
        format_summary_table(report),
        "",
        format_network_table(report),
        "",
    ]
    if runs:
        times = ", ".join(f"{label} {run['wall_s'] / 60:.1f} min" for label, run in runs.items())
        lines += [f"Wall time: training {times}; analysis {analysis_s / 60:.1f} min.", ""]
    lines += ["![loafing plot](img/loafing_cifar10.png)", "", END]
    return "\n".join(lines)


def update_doc(block: str) -> None:
    """Replace the measured block of docs/loafing.md (or append it when the markers are missing)."""
    text = DOC.read_text() if DOC.exists() else "# Loafing analysis\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> None:
    """Train (unless --skip-training), analyse, print the tables and update the docs."""
    args = parse_args(argv)
    if not (DATA_DIR / "train.parquet").is_file():
        sys.exit(f"CIFAR-10 parquet files not found in {DATA_DIR}")
    root = Path(args.output_root)
    root.mkdir(parents=True, exist_ok=True)
    runs = {} if args.skip_training else train(args, root)
    report, paths, analysis_s = analyse(args, root)
    block = markdown(args, report, runs, analysis_s)
    print(block, flush=True)
    (root / "bench.json").write_text(
        json.dumps({"args": vars(args), "runs": runs, "analysis_s": analysis_s, "report": report}, indent=2) + "\n"
    )
    if not args.no_docs:
        DOC_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths["png"], DOC_IMAGE)
        update_doc(block)
        print(f"updated {DOC} and {DOC_IMAGE}", flush=True)


if __name__ == "__main__":
    main()
