"""Reproduction study on CIFAR-10 (issue 7): common training (CT), ST and ST++, same everything else.

  # CPU study of docs/results.md (2 cores, ~30 min)
  python bench/reproduce_cifar10.py --depth 20 --train-samples 10000 --epochs 2 --eval-samples 2000 \\
      --seeds 1,2 --methods ct,st,stpp --recalibrate-bn 500 --out outputs/reproduce_cifar10_cpu
  # GPU study (still open): ResNet-56, 2 seeds, 6 training processes sharing one GPU, 8 min of training
  python bench/reproduce_cifar10.py --depth 56 --methods ct,st,stpp --seeds 1,2 \\
      --epochs auto --time-budget-min 8 --parallel 6 --device cuda

Every (method, seed) run is a ``scripts/train.py`` subprocess on the CIFAR-10 recipes
(``configs/cifar10_resnet56_{ct,st,stpp}.yaml``) with the same overrides (depth, training subset,
epochs, batch, learning rate, seed): the command line is
:func:`bench.loafing_cifar10.train_command`'s, so both benchmarks train the same way. The data are
the parquet files of ``<repo>/../shared/data/cifar10`` (``--data-dir`` to take them from elsewhere). Up to ``--parallel`` runs train at once (for
a GPU that one ResNet-56 does not fill). ``--time-budget-min`` bounds the training part of the
study (probe and runs; the evaluation comes after it) in two simple ways:

- it is a launch budget: no new run is started once that many minutes have passed since the study
  began (runs already started finish). Runs are launched seed by seed (all methods of seed 1
  first), so a cut study stays balanced;
- with ``--epochs auto`` the first wave of runs (``--parallel`` of them, at once) is first trained
  for ``--probe-steps`` steps; the slowest one's images/s and start-up overhead give the whole
  number of epochs (at least 1) that lets every wave finish within the budget left. Short probes
  overstate per-image cost (start-up, first steps), so the estimate errs towards fewer epochs.

After training, every finished run is evaluated by the same loafing analysis
(:func:`stim_hf.tools.loafing.analyze_checkpoints`): the full network and the same ``--num-subnets``
fixed sub-networks (prefix rule, seed ``--subnet-seed``, full input size) on ``--eval-samples``
test images, with the full network's BatchNorm statistics and with BatchNorm re-estimated per
network on ``--recalibrate-bn`` training images. ``--out`` (default ``outputs/reproduce_cifar10``)
receives

- ``<method>_seed<k>/``: the runs (model, ``*_results.json``, ``train.log``, TensorBoard events);
- ``analysis/loafing.{json,csv,png}``: the analysis of all runs (the loafing plot);
- ``results.json`` and ``results.md``: per-run and per-method (mean over seeds) table of full-network
  top-1, mean sub-network top-1 (both BatchNorm settings), loafing gap, wall time and images/s.

``--analyze-only`` redoes the analysis and the tables from the runs already in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from loafing_cifar10 import DATA_DIR, train_command  # noqa: E402  (sets the offline / OpenMP environment)

METHOD_LABELS = {"ct": "CT", "st": "ST", "stpp": "ST++"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings of the study."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=56, help="CIFAR ResNet depth (6n+2)")
    parser.add_argument(
        "--epochs", default="15", help="epochs per run, or 'auto': as many as fit --time-budget-min (probe runs)"
    )
    parser.add_argument("--train-samples", type=int, default=50_000, help="training images (seeded subset)")
    parser.add_argument("--eval-samples", type=int, default=10_000, help="test images of the evaluation")
    parser.add_argument("--seeds", default="1,2", help="comma-separated training seeds")
    parser.add_argument("--methods", default="ct,st,stpp", help="comma-separated, from ct, st, stpp")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument(
        "--time-budget-min", type=float, default=None, help="launch budget: start no new run after this many minutes"
    )
    parser.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu' or 'cuda'")
    parser.add_argument("--parallel", type=int, default=1, help="training subprocesses at once")
    parser.add_argument("--num-subnets", type=int, default=8, help="fixed sub-networks of the evaluation")
    parser.add_argument("--subnet-seed", type=int, default=42, help="seed of the fixed sub-networks' draw")
    parser.add_argument("--recalibrate-bn", type=int, default=1000, help="BatchNorm re-estimation images (0: off)")
    parser.add_argument("--data-dir", default=str(DATA_DIR), help="folder with CIFAR-10 train.parquet / test.parquet")
    parser.add_argument("--out", default=str(REPO / "outputs" / "reproduce_cifar10"))
    parser.add_argument("--analyze-only", action="store_true", help="evaluate the runs already in --out")
    parser.add_argument("--probe-steps", type=int, default=40, help="steps of each probe run of --epochs auto")
    args = parser.parse_args(argv)
    args.max_steps = None
    args.data_dir = str(Path(args.data_dir).resolve())
    if args.epochs == "auto":
        if args.time_budget_min is None or args.analyze_only:
            parser.error("--epochs auto needs --time-budget-min and training (give --analyze-only the epochs used)")
    else:
        args.epochs = float(args.epochs)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.method_list if m not in METHOD_LABELS]
    if unknown or not args.method_list or not args.seed_list:
        parser.error(f"--methods takes {', '.join(METHOD_LABELS)}; --seeds at least one integer (got {unknown})")
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    return args


def resolve_device(name: str) -> str:
    """'cpu' or 'cuda' ('auto': cuda when torch sees a GPU)."""
    if name != "auto":
        return "cuda" if name.startswith("cuda") else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def set_flag(command: list[str], flag: str, value: str) -> list[str]:
    """``command`` with ``flag``'s value replaced (or the flag appended when absent)."""
    command = list(command)
    if flag in command:
        command[command.index(flag) + 1] = value
    else:
        command += [flag, value]
    return command


def run_command(args: argparse.Namespace, method: str, seed: int, output_dir: Path, device: str) -> list[str]:
    """The ``scripts/train.py`` command of one run: :func:`loafing_cifar10.train_command` plus device settings."""
    settings = argparse.Namespace(
        depth=args.depth,
        train_samples=args.train_samples,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        num_subnets=args.num_subnets,
        seed=seed,
    )
    command = train_command(settings, method, output_dir)
    command = set_flag(command, "--train_file", str(Path(args.data_dir) / "train.parquet"))
    command = set_flag(command, "--validation_file", str(Path(args.data_dir) / "test.parquet"))
    # The analysis evaluates the fixed sub-networks; the job's own end-of-training evaluation stays small.
    command = set_flag(command, "--subnet_monitor_count", "0")
    command = set_flag(command, "--max_eval_samples", str(min(args.eval_samples, 1000)))
    if device == "cuda":
        workers = max(1, (os.cpu_count() or 2) // args.parallel - 1)
        command = set_flag(command, "--use_cpu", "false")
        command = set_flag(command, "--dataloader_num_workers", str(workers))
    if args.max_steps is not None:
        command = set_flag(command, "--max_steps", str(args.max_steps))
    return command


def run_name(method: str, seed: int) -> str:
    """Directory name of one run."""
    return f"{method}_seed{seed}"


def study_plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    """The (method, seed) runs in launch order: seed by seed, every method of a seed in turn."""
    return [(method, seed) for seed in args.seed_list for method in args.method_list]


def pick_epochs(args: argparse.Namespace, out: Path, device: str, elapsed_s: float) -> dict[str, Any]:
    """``--epochs auto``: the epochs per run that fit what is left of the time budget.

    Runs the first wave of the study (its first ``--parallel`` runs, at once, so under the same
    sharing of the device) for ``--probe-steps`` steps each, takes the slowest run's images/s and
    its start-up + evaluation overhead (wall time minus training time), and returns the whole
    epochs (at least 1) that let every wave of the study finish within the budget left.
    """
    plan = study_plan(args)
    waves = -(-len(plan) // args.parallel)
    probe = argparse.Namespace(**vars(args))
    probe.max_steps, probe.epochs, probe.time_budget_min = args.probe_steps, 1.0, None
    start = time.perf_counter()
    records = train_all(probe, out / "probe", device, plan[: args.parallel])
    probe_s = time.perf_counter() - start
    failed = [name for name, record in records.items() if record["status"] != "ok"]
    if failed:
        sys.exit(f"probe runs failed: {', '.join(failed)} (see {out / 'probe'}/*/train.log)")
    measured = [dict(read_run(out / "probe" / name), wall_s=record["wall_s"]) for name, record in records.items()]
    images_per_s = min(m["images_per_s"] for m in measured)
    overhead_s = max(m["wall_s"] - m["train_runtime_s"] for m in measured)
    left_s = 60 * args.time_budget_min - elapsed_s - probe_s
    per_run_s = left_s / waves - overhead_s
    epochs = max(1, int(per_run_s * images_per_s / args.train_samples))
    print(
        f"[probe] slowest {images_per_s:.0f} images/s, overhead {overhead_s:.0f} s, {waves} wave(s), "
        f"{left_s / 60:.1f} min left: {epochs} epoch(s) per run",
        flush=True,
    )
    return {"epochs": epochs, "images_per_s": images_per_s, "overhead_s": overhead_s, "probe_s": probe_s}


def train_all(
    args: argparse.Namespace, out: Path, device: str, plan: list[tuple[str, int]], started: float | None = None
) -> dict[str, dict[str, Any]]:
    """Run ``plan`` (``--parallel`` runs at once); return per-run records.

    No run is launched once ``--time-budget-min`` minutes have passed since ``started`` (a
    ``time.perf_counter()`` value; default: now).
    """
    plan = list(plan)
    env = dict(os.environ)
    if device == "cpu" and args.parallel > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.parallel))
    start = time.perf_counter() if started is None else started
    running: list[tuple[str, subprocess.Popen, float, list[str], Any]] = []
    records: dict[str, dict[str, Any]] = {}
    while plan or running:
        budget_spent = args.time_budget_min is not None and time.perf_counter() - start > 60 * args.time_budget_min
        while plan and len(running) < args.parallel and not budget_spent:
            method, seed = plan.pop(0)
            name = run_name(method, seed)
            run_dir = out / name
            run_dir.mkdir(parents=True, exist_ok=True)
            command = run_command(args, method, seed, run_dir, device)
            print(f"[{name}] {shlex.join(command)}", flush=True)
            log = (run_dir / "train.log").open("w")
            process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((name, process, time.perf_counter(), command, log))
        if budget_spent and plan:
            for method, seed in plan:
                print(f"[{run_name(method, seed)}] not launched: time budget spent", flush=True)
                records[run_name(method, seed)] = {"status": "not launched (time budget)"}
            plan = []
        time.sleep(1.0)
        for item in list(running):
            name, process, launched, command, log = item
            if process.poll() is None:
                continue
            running.remove(item)
            log.close()
            wall = time.perf_counter() - launched
            status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode}, see train.log)"
            records[name] = {"status": status, "wall_s": wall, "command": shlex.join(command)}
            print(f"[{name}] {status} after {wall / 60:.1f} min", flush=True)
    return records


def read_run(run_dir: Path) -> dict[str, Any]:
    """Training metrics of a finished run (from the Trainer's ``all_results.json``)."""
    results = json.loads((run_dir / "all_results.json").read_text())
    return {
        "train_runtime_s": results.get("train_runtime"),
        "images_per_s": results.get("train_samples_per_second"),
        "train_loss": results.get("train_loss"),
        "job_eval_accuracy": results.get("eval_accuracy"),
    }


def analyse(args: argparse.Namespace, out: Path, names: list[str], device: str) -> tuple[dict[str, Any], float]:
    """Loafing analysis of the finished runs (same sub-networks, same test images); returns report, wall time."""
    from stim_hf.data.image_datasets import DataArguments
    from stim_hf.tools.loafing import LoafingArguments, analyze_checkpoints, write_report

    data_args = DataArguments(
        train_file=str(Path(args.data_dir) / "train.parquet"),
        validation_file=str(Path(args.data_dir) / "test.parquet"),
        max_eval_samples=args.eval_samples,
        image_size=32,
        augmentation="cifar",
    )
    loafing_args = LoafingArguments(
        num_subnets=args.num_subnets,
        seed=args.subnet_seed,
        sampling="prefix",
        recalibrate_bn=args.recalibrate_bn,
        output_dir=str(out / "analysis"),
        batch_size=500,
        device=device,
    )
    start = time.perf_counter()
    labels = [label_of(name) for name in names]
    report = analyze_checkpoints([str(out / n) for n in names], data_args, loafing_args, labels=labels)
    wall = time.perf_counter() - start
    title = f"CIFAR-10, ResNet-{args.depth}, {args.train_samples} images x {args.epochs:g} epochs"
    write_report(report, loafing_args.output_dir, title=title)
    return report, wall


def label_of(name: str) -> str:
    """'stpp_seed1' -> 'ST++ seed 1'."""
    method, seed = name.rsplit("_seed", 1)
    return f"{METHOD_LABELS[method]} seed {seed}"


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(records: dict[str, dict[str, Any]], report: dict[str, Any] | None) -> dict[str, Any]:
    """Per-run rows (training + analysis) and per-method means over the seeds."""
    by_label = {c["label"]: c["summary"] for c in report["checkpoints"]} if report else {}
    recalibrated = bool(report and report["settings"].get("recalibrate_bn"))
    runs = []
    for name, record in records.items():
        if record.get("status") != "ok":
            continue
        method, seed = name.rsplit("_seed", 1)
        summary = by_label.get(label_of(name), {})
        runs.append(
            {
                "run": name,
                "method": METHOD_LABELS[method],
                "seed": int(seed),
                # This study's columns: the papers' measure (the full network's BatchNorm statistics,
                # the report's "_inherited_bn") and, beside it, re-estimated per sub-network.
                "full_accuracy": summary.get("full_accuracy"),
                "subnet_accuracy_mean": summary.get("subnet_accuracy_mean_inherited_bn"),
                "subnet_accuracy_mean_bn_recalibrated": summary.get("subnet_accuracy_mean") if recalibrated else None,
                "loafing_gap": summary.get("loafing_gap_inherited_bn"),
                "loafing_gap_bn_recalibrated": summary.get("loafing_gap") if recalibrated else None,
                "wall_s": record.get("wall_s"),
                **{k: record.get(k) for k in ("train_runtime_s", "images_per_s", "train_loss")},
            }
        )
    keys = [k for k in (runs[0] if runs else {}) if k not in ("run", "method", "seed")]
    methods = []
    for label in METHOD_LABELS.values():
        rows = [r for r in runs if r["method"] == label]
        if rows:
            methods.append(
                {"method": label, "seeds": [r["seed"] for r in rows], **{k: _mean([r[k] for r in rows]) for k in keys}}
            )
    return {"runs": runs, "methods": methods}


COLUMNS = (
    ("full_accuracy", "full top-1 %", 100, 2),
    ("subnet_accuracy_mean", "sub-net mean %", 100, 2),
    ("subnet_accuracy_mean_bn_recalibrated", "sub-net mean %, BN re-est.", 100, 2),
    ("loafing_gap", "loafing gap", 1, 3),
    ("loafing_gap_bn_recalibrated", "loafing gap, BN re-est.", 1, 3),
    ("wall_s", "wall min", 1 / 60, 1),
    ("images_per_s", "images/s", 1, 0),
)


def markdown_table(rows: list[dict[str, Any]], first: tuple[str, str]) -> str:
    """A Markdown table of ``rows`` (first column ``first`` = (key, header), then :data:`COLUMNS`)."""
    header = [first[1]] + [c[1] for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [str(row[first[0]])]
        for key, _, scale, digits in COLUMNS:
            value = row.get(key)
            cells.append("n/a" if value is None else f"{value * scale:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(args: argparse.Namespace, out: Path, results: dict[str, Any], device: str) -> None:
    """Write ``results.json`` and ``results.md`` into ``out``."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = results["table"]
    lines = [
        f"# CIFAR-10 reproduction: {', '.join(METHOD_LABELS[m] for m in args.method_list)}",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Device: {results['machine']}. ResNet-{args.depth}, {args.train_samples} training images, "
        f"{args.epochs:g} epochs, batch {args.batch_size}, lr {args.learning_rate}; evaluation on "
        f"{results['num_eval_images']} test images, {args.num_subnets} fixed sub-networks (prefix rule, seed "
        f"{args.subnet_seed}), BN re-estimation on {args.recalibrate_bn} training images. Wall time: per run, "
        "from launch to exit of its training process; images/s: the Trainer's train_samples_per_second.",
        "",
        "## Mean over seeds",
        "",
        markdown_table(table["methods"], ("method", "method")),
        "",
        "## Per run",
        "",
        markdown_table(table["runs"], ("run", "run")),
        "",
    ]
    skipped = {n: r["status"] for n, r in results["records"].items() if r.get("status") != "ok"}
    if skipped:
        lines += ["Runs without results: " + ", ".join(f"{n} ({s})" for n, s in skipped.items()), ""]
    lines += ["![loafing plot](analysis/loafing.png)", ""]
    (out / "results.md").write_text("\n".join(lines))


def machine_description(device: str, parallel: int) -> str:
    """The machine in words: GPU name or CPU core count, and how many runs shared it."""
    if device == "cuda":
        import torch

        what = torch.cuda.get_device_name(0)
    else:
        what = f"CPU, {os.cpu_count()} cores"
    return f"{what}, {parallel} training process(es) at once"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train (unless --analyze-only), analyse, write results.json / results.md; return the results."""
    args = parse_args(argv)
    if not (Path(args.data_dir) / "train.parquet").is_file():
        sys.exit(f"CIFAR-10 parquet files not found in {args.data_dir}")
    device = resolve_device(args.device)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "records.json"
    study_start = time.perf_counter()
    probe = None
    if args.analyze_only:
        records = json.loads(records_path.read_text()) if records_path.is_file() else {}
        for method in args.method_list:
            for seed in args.seed_list:
                name = run_name(method, seed)
                if (out / name / "all_results.json").is_file():
                    records.setdefault(name, {"status": "ok"})
    else:
        if args.epochs == "auto":
            probe = pick_epochs(args, out, device, time.perf_counter() - study_start)
            args.epochs = float(probe["epochs"])
        records = train_all(args, out, device, study_plan(args), started=study_start)
        records_path.write_text(json.dumps(records, indent=2) + "\n")
    finished = []
    for name, record in records.items():
        if record.get("status") == "ok":
            record.update(read_run(out / name))
            finished.append(name)
    report, analysis_s = analyse(args, out, finished, device) if finished else (None, 0.0)
    results = {
        "command": shlex.join(["python", "bench/reproduce_cifar10.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_description(device, args.parallel),
        "date": time.strftime("%Y-%m-%d"),
        "probe": probe,
        "args": {k: v for k, v in vars(args).items() if k not in ("seed_list", "method_list")},
        "num_eval_images": report["settings"]["num_eval_images"] if report else None,
        "analysis_s": analysis_s,
        "study_s": time.perf_counter() - study_start,
        "records": records,
        "table": summarize(records, report),
    }
    write_results(args, out, results, device)
    print((out / "results.md").read_text(), flush=True)
    return results


if __name__ == "__main__":
    main()
