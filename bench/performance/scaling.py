"""Scaling of the step time with K (sub-networks per step) and with depth: is it linear in the FLOPs?

  python bench/performance/scaling.py                                    # CIFAR ResNet-20/56/110, CT + ST++ K=1,2,4,6, batch 64
  python bench/performance/scaling.py --json bench/out/scaling_cpu.json  # the same, and write JSON
  python bench/performance/scaling.py --depths 20 --ks 1,2 --batch 8 --steps 2 --warmup 1   # smoke test of the script

For every depth in ``--depths`` it measures CT and ST++ with each K in ``--ks``, each configuration
built fresh, with ``measure`` of bench/performance/step_cost.py: ``--warmup`` + ``--steps`` optimizer steps on
one synthetic batch that lives on the device, through ``StimulativeTrainer.training_step`` plus the
optimizer step (bf16 autocast and channels_last on CUDA, synchronised around every timed step). Per
configuration it reports the median step time and the forward FLOPs per image that the step actually
computes: the full network plus the sub-networks drawn during the timed steps, each at its input size
(torch's FlopCounterMode), in GFLOPs and relative to the same depth's CT, next to the step time
relative to CT. Then it fits ``step_time = a + b * FLOPs`` (FLOPs per step, i.e. per image times the
batch) by least squares over all configurations of all depths together and prints a, b, R^2, and
each configuration's predicted time and relative residual.

ST++ draws input sizes between floor(0.43 * S) and S (13..32 px at 32 px). On a CPU oneDNN creates its
kernels once per new input shape, and keeps them for the whole process; all depths have the same
convolution shapes at a given input size. So before the grid an untimed ST++ run with the largest K
at the first depth (``--warmup`` + ``--steps`` steps, skipped with --no-prime) runs most input sizes
once, and the column ``cold`` counts the timed steps that still run an input size that no earlier
step of the process ran (those steps are slower). Keep it at 0, or well below half of --steps (the
median then ignores those steps), by raising --warmup. Timings are only meaningful on an otherwise
idle machine; --threads sets torch's intra-op threads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import torch


def load_step_cost() -> ModuleType:
    """Import bench/performance/step_cost.py (next to this file) as a module, for its ``measure``."""
    path = Path(__file__).resolve().with_name("step_cost.py")
    spec = importlib.util.spec_from_file_location("step_cost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def configurations(ks: list[int]) -> list[tuple[str, int, dict]]:
    """The (name, K, StimulativeTrainingArguments overrides) measured at every depth: CT, then ST++ per K."""
    return [("CT", 0, {"stim_method": "ct"})] + [
        (f"ST++ K={k}", k, {"stim_method": "stpp", "num_subnets": k}) for k in ks
    ]


def input_sizes_per_step(depth: int, k: int, args: argparse.Namespace) -> list[set[int]]:
    """The input sides each of the warm-up + timed steps of ST++ with ``k`` sub-networks runs.

    Drawn by the sampler of a trainer configured as ``measure`` configures it (same seed), so they
    are the sizes the measured run draws; the full network's side ``--image-size`` is in every step.
    """
    from stim_hf import StimulativeTrainer, StimulativeTrainingArguments
    from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification

    model = CifarResNetForImageClassification(CifarResNetConfig(depth=depth, num_labels=10))
    training_args = StimulativeTrainingArguments(
        output_dir="/tmp/bench_scaling", per_device_train_batch_size=args.batch, report_to="none",
        save_strategy="no", disable_tqdm=True, use_cpu=True, num_eval_subnets=0, seed=0, stim_method="stpp",
        num_subnets=k,
    )  # fmt: skip
    sampler = StimulativeTrainer(model=model, args=training_args).subnet_sampler
    sizes = []
    for step in range(args.warmup + args.steps):
        drawn = (sampler.sample(step, 0, index, image_size=args.image_size).input_size for index in range(k))
        sizes.append({args.image_size} | {size or args.image_size for size in drawn})
    return sizes


def cold_steps(sizes: list[set[int]], warmup: int, seen: set[int]) -> int:
    """How many timed steps (after ``warmup``) run an input size not in ``seen`` nor run by an earlier step.

    ``seen`` holds the sizes earlier configurations of the process ran; this run's sizes are added to it.
    """
    cold = 0
    for step, step_sizes in enumerate(sizes):
        if step >= warmup and not step_sizes <= seen:
            cold += 1
        seen |= step_sizes
    return cold


def linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``y = a + b * x``; returns (a, b, R^2)."""
    design = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - (a + b * x)
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / total if total > 0 else float("nan")
    return float(a), float(b), r2


def run_grid(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Measure every (depth, configuration), each built fresh; one row per configuration."""
    step_cost = load_step_cost()

    def measure_args(depth: int) -> argparse.Namespace:
        return argparse.Namespace(
            model=f"cifar_resnet{depth}", tiny=False, fp32=args.fp32, batch=args.batch,
            image_size=args.image_size, steps=args.steps, warmup=args.warmup,
        )  # fmt: skip

    def sizes_of(depth: int, k: int) -> list[set[int]]:
        if k:
            return input_sizes_per_step(depth, k, args)
        return [{args.image_size}] * (args.warmup + args.steps)

    seen: set[int] = set()  # input sizes some step of this process has run
    if args.prime:
        depth, k = args.depths[0], max(args.ks)
        print(f"  priming: untimed ST++ K={k} at depth {depth}", flush=True)
        step_cost.measure("prime", {"stim_method": "stpp", "num_subnets": k}, measure_args(depth), device)
        cold_steps(sizes_of(depth, k), 0, seen)
    rows = []
    for depth in args.depths:
        for name, k, overrides in configurations(args.ks):
            result = step_cost.measure(name, overrides, measure_args(depth), device)
            cold = cold_steps(sizes_of(depth, k), args.warmup, seen)
            total = result["full_gflops_per_image"] * result["flop_ratio_to_ct"]
            rows.append(
                {
                    "depth": depth, "config": name, "num_subnets": k, "step_s": result["step_s"],
                    "images_per_s": result["images_per_s"], "peak_mb": result["peak_mb"],
                    "full_gflops_per_image": result["full_gflops_per_image"], "gflops_per_image": total,
                    "gflops_per_step": total * args.batch, "flop_ratio_to_ct": result["flop_ratio_to_ct"],
                    "cold_steps": cold,
                }
            )  # fmt: skip
            print(f"  depth {depth:>3} {name:<10} {1000 * result['step_s']:>9.1f} ms/step", flush=True)
    for row in rows:
        ct = next(r for r in rows if r["depth"] == row["depth"] and r["num_subnets"] == 0)
        row["time_ratio_to_ct"] = row["step_s"] / ct["step_s"]
    return rows


def fit_rows(rows: list[dict]) -> dict | None:
    """Fit step time against FLOPs per step over all rows; add predictions and residuals to the rows."""
    x = np.array([r["gflops_per_step"] for r in rows])
    y = np.array([r["step_s"] for r in rows])
    if len(rows) < 3 or np.ptp(x) == 0:
        return None  # two points always fit exactly: nothing to show
    a, b, r2 = linear_fit(x, y)
    for row in rows:
        row["predicted_s"] = a + b * row["gflops_per_step"]
        row["relative_residual"] = row["step_s"] / row["predicted_s"] - 1
    return {"a_s": a, "b_s_per_gflop": b, "r2": r2, "points": len(rows)}


def print_report(rows: list[dict], fit: dict | None, args: argparse.Namespace, device_name: str, cuda: bool) -> None:
    """The table, one block per depth, then the fit."""
    precision = "fp32" if args.fp32 or not cuda else "bf16 autocast, channels_last"
    print(
        f"\nCIFAR ResNet, batch {args.batch}, {args.image_size} px, {device_name}, {precision}, "
        f"{torch.get_num_threads()} threads, median of {args.steps} steps after {args.warmup} warm-up"
    )
    header = (
        f"{'depth':>5}  {'config':<10}{'step ms':>10}{'GFLOP/img':>11}{'FLOPs/CT':>10}{'time/CT':>9}"
        f"{'pred ms':>10}{'resid':>8}{'cold':>6}"
    )
    print(header + (f"{'peak MB':>9}" if cuda else ""))
    for depth in args.depths:
        for r in (r for r in rows if r["depth"] == depth):
            predicted = f"{1000 * r['predicted_s']:>10.1f}{100 * r['relative_residual']:>7.1f}%" if fit else " " * 18
            line = (
                f"{depth:>5}  {r['config']:<10}{1000 * r['step_s']:>10.1f}{r['gflops_per_image']:>11.4f}"
                f"{r['flop_ratio_to_ct']:>10.2f}{r['time_ratio_to_ct']:>9.2f}{predicted}{r['cold_steps']:>6}"
            )
            print(line + (f"{r['peak_mb']:>9.0f}" if cuda else ""))
    print("FLOPs: forward, full network + drawn sub-networks at their input sizes; resid = measured / predicted - 1")
    print("cold: timed steps that run an input size no earlier step of the process ran")
    if fit is None:
        print("fit: needs at least 3 configurations with different FLOPs")
        return
    print(
        f"fit over all {fit['points']} configurations: step_time = a + b * GFLOPs_per_step, "
        f"a = {1000 * fit['a_s']:.2f} ms, b = {1000 * fit['b_s_per_gflop']:.3f} ms/GFLOP "
        f"(1/b = {1 / fit['b_s_per_gflop']:.1f} forward GFLOP/s), R^2 = {fit['r2']:.4f}"
    )
    if any(2 * r["cold_steps"] >= args.steps for r in rows):
        print("warning: a configuration has cold steps in half or more of its timed steps; raise --warmup")


def int_list(text: str) -> list[int]:
    """Parse ``1,2,4`` into [1, 2, 4]."""
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    """Parse the arguments, run the grid, print the table and the fit, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int_list, default=[20, 56, 110], help="CIFAR ResNet depths (6n+2)")
    parser.add_argument("--ks", type=int_list, default=[1, 2, 4, 6], help="ST++ sub-networks per step")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=12, help="untimed steps first (kernel creation per size)")
    parser.add_argument("--no-prime", dest="prime", action="store_false", help="no untimed ST++ run first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on the GPU")
    parser.add_argument("--json", default=None, help="write the rows and the fit to this path")
    args = parser.parse_args()
    if not args.depths or any(d < 8 or (d - 2) % 6 for d in args.depths):
        parser.error(f"--depths {args.depths}: CIFAR ResNet depths are 6n+2 with n >= 1 (20, 56, 110)")
    if any(k < 1 for k in args.ks):
        parser.error(f"--ks {args.ks}: K must be >= 1 (CT is always measured)")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    rows = run_grid(args, device)
    fit = fit_rows(rows)
    print_report(rows, fit, args, device_name, cuda)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "args": vars(args), "fit": fit, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
