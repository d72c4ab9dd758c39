"""Step time and peak memory of the two backward strategies (issue 5), side by side in one run.

  python bench/backward_strategy.py                       # CIFAR ResNet-56, batch 128, CPU
  python bench/backward_strategy.py --depth 20 --steps 4  # quicker

Each configuration runs in its own subprocess so that its peak memory is its own: CPU peak RSS
growth during training (ru_maxrss minus the RSS before training), or the CUDA peak allocation on
a GPU. Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = [
    ("CT", "ct", 0, "summed"),
    ("ST++ K=1 summed", "stpp", 1, "summed"),
    ("ST++ K=1 sequential", "stpp", 1, "sequential"),
    ("ST++ K=6 summed", "stpp", 6, "summed"),
    ("ST++ K=6 sequential", "stpp", 6, "sequential"),
]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(args: argparse.Namespace) -> dict:
    """Train ``args.steps`` steps of one configuration; return time per step and peak memory."""
    import torch
    from torch.utils.data import Dataset
    from transformers import TrainerCallback

    from stim_hf import StimulativeTrainer, StimulativeTrainingArguments
    from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification

    class Synthetic(Dataset):
        def __len__(self):
            return 10_000

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": i % 10}

    class StepTimer(TrainerCallback):
        """Each step's time; on a GPU the queued work is waited for at both ends (every configuration alike)."""

        def __init__(self):
            self.times = []

        def on_step_begin(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=args.depth, num_labels=10))
    cuda = torch.cuda.is_available()
    training_args = StimulativeTrainingArguments(
        output_dir="/tmp/bench_backward", stim_method=args.method, num_subnets=args.num_subnets,
        backward_strategy=args.strategy, per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=0.1, optim="sgd", report_to="none", save_strategy="no", logging_steps=10**6,
        disable_tqdm=True, use_cpu=not cuda, bf16=cuda, dataloader_num_workers=0, num_eval_subnets=0, seed=0,
    )  # fmt: skip
    timer = StepTimer()
    trainer = StimulativeTrainer(model=model, args=training_args, train_dataset=Synthetic(), callbacks=[timer])
    before = rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    )
    steady = timer.times[1:] or timer.times
    return {"step_s": sorted(steady)[len(steady) // 2], "peak_mb": peak, "device": "cuda" if cuda else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", default="bench/out/backward_strategy.json")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "K", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.method, args.num_subnets, args.strategy = args.one[0], int(args.one[1]), args.one[2]
        print(json.dumps(run_one(args)))
        return
    rows = []
    for name, method, k, strategy in CONFIGS:
        cmd = [sys.executable, __file__, "--depth", str(args.depth), "--batch", str(args.batch),
               "--steps", str(args.steps), "--one", method, str(k), strategy]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append({"config": name, **json.loads(out)})
        print(f"{name:<22} step {rows[-1]['step_s'] * 1000:8.1f} ms   peak {rows[-1]['peak_mb']:8.1f} MB", flush=True)
    ct = rows[0]
    print(f"\nResNet-{args.depth}, batch {args.batch}, {rows[0]['device']}; ratios to CT:")
    for row in rows:
        print(
            f"{row['config']:<22} time x{row['step_s'] / ct['step_s']:.2f}   memory x{row['peak_mb'] / ct['peak_mb']:.2f}"
        )
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"depth": args.depth, "batch": args.batch, "steps": args.steps, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
