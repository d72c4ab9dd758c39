"""Where a training step's host time goes: cProfile of StimulativeTrainer.train() against the plain loop.

  python bench/profile_step.py                       # CIFAR ResNet-56, batch 128, ST++ K=1 (GPU if there is one)
  python bench/profile_step.py --depth 20 --steps 20 # quicker, on a CPU

Runs bench/framework_overhead.py's two loops (same model, data, sub-networks and sizes) under
cProfile and prints, for each, the functions with the most own time and the most cumulative time.
On a GPU the step of a CIFAR ResNet is bound by the host's kernel launches, so host time is step time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import framework_overhead as fo  # noqa: E402


def profile(label: str, function, top: int) -> str:  # noqa: ANN001
    """Run ``function`` under cProfile; the top functions by own and by cumulative time, as text."""
    profiler = cProfile.Profile()
    profiler.enable()
    rate = function()
    profiler.disable()
    out = io.StringIO()
    out.write(f"\n##### {label}: {rate:.1f} images/s under the profiler\n")
    for key in ("tottime", "cumulative"):
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key).print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--num-subnets", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--workers", type=int, default=0, help="the trainer's dataloader_num_workers")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default=None, help="write the full report here")
    a = parser.parse_args()
    data = fo.InMemory((a.warmup + a.steps) * a.batch, 32)
    fo.run_plain(a, data)  # warm every kernel and input size once
    report = profile("plain loop", lambda: fo.run_plain(a, data), a.top)
    report += profile("StimulativeTrainer", lambda: fo.run_trainer(a, data), a.top)
    print(report)
    if a.out:
        with open(a.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
