"""Where a training step's host time goes: cProfile of StimulativeTrainer.train() against the plain loop.

  python bench/performance/profile_step.py                       # CIFAR ResNet-56, batch 128, ST++ K=1 (GPU if there is one)
  python bench/performance/profile_step.py --depth 20 --steps 20 # quicker, on a CPU
  python bench/performance/profile_step.py --steps 20 --torch-profiler bench/out/trace  # torch.profiler (traces: ~1 MB/step)

Runs bench/performance/framework_overhead.py's two loops (same model, data, sub-networks and sizes) under
cProfile and prints, for each, the functions with the most own time and the most cumulative time.
On a GPU the step of a CIFAR ResNet is bound by the host's kernel launches, so host time is step time.

With ``--torch-profiler DIR`` both loops run under torch.profiler instead (CPU and, on a GPU, CUDA
activity): it prints the operators with the most self time on the host and on the device, and
writes a Chrome trace per loop into DIR (open it in chrome://tracing or Perfetto). Where cProfile
charges a host-device synchronisation to whichever call waits, the trace shows it as a
``cudaStreamSynchronize`` / ``cudaMemcpy`` / ``cudaEventSynchronize`` with the GPU's timeline beside it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

import torch

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


def torch_profile(label: str, function, top: int, trace_dir: str) -> str:  # noqa: ANN001
    """Run ``function`` under torch.profiler; its top operators by host (and device) self time, as text."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler_context

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if fo.CUDA else [])
    with profiler_context(activities=activities) as profiler:
        rate = function()
    os.makedirs(trace_dir, exist_ok=True)
    trace = os.path.join(trace_dir, f"{label.replace(' ', '_')}.json")
    profiler.export_chrome_trace(trace)
    out = io.StringIO()
    out.write(f"\n##### {label}: {rate:.1f} images/s under torch.profiler (trace: {trace})\n")
    averages = profiler.key_averages()
    for key in ["self_cpu_time_total"] + (["self_cuda_time_total"] if fo.CUDA else []):
        out.write(f"\nby {key}:\n{averages.table(sort_by=key, row_limit=top)}\n")
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32, help="input side in px (small: a host-bound stand-in)")
    parser.add_argument("--num-subnets", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--workers", type=int, default=0, help="the trainer's dataloader_num_workers")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--fused-optimizer", default=True, type=lambda v: v.lower() in ("1", "true", "yes"),
        help="true (default) / false: torch's fused SGD kernel, in both loops",
    )  # fmt: skip
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default=None, help="write the full report here")
    parser.add_argument("--torch-profiler", default=None, metavar="DIR", help="torch.profiler, traces into DIR")
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    data = fo.InMemory((a.warmup + a.steps) * a.batch, a.image_size)
    fo.run_plain(a, data)  # warm every kernel and input size once
    if a.torch_profiler:
        report = torch_profile("plain loop", lambda: fo.run_plain(a, data), a.top, a.torch_profiler)
        report += torch_profile("StimulativeTrainer", lambda: fo.run_trainer(a, data), a.top, a.torch_profiler)
    else:
        report = profile("plain loop", lambda: fo.run_plain(a, data), a.top)
        report += profile("StimulativeTrainer", lambda: fo.run_trainer(a, data), a.top)
    print(report)
    if a.out:
        with open(a.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
