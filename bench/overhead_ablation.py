"""What the trainer's remaining per-step overhead is made of: the paired stand-in with trainer parts switched off.

  python bench/overhead_ablation.py                                   # each part alone, then all, then none
  python bench/overhead_ablation.py --parts gradnorm guard            # chosen parts, one process each
  python bench/overhead_ablation.py --parts gradnorm,guard,lomo       # several parts off in one process

Each entry runs in its own process: ``bench/framework_overhead.py``'s paired comparison (one
plain-loop step after each trainer step; CIFAR ResNet-56, batch 1, 8 px, one thread, ST++ K = 1:
a step that is nearly all per-operator host work, like a CIFAR ResNet's on a GPU) with the named
parts of the trainer monkeypatched away, and prints the median per-step gap and the ratio. A
measurement tool, not a configuration: the patched trainer is not a correct trainer.

Parts: ``gradnorm`` (the gradient norm the Trainer logs, computed every step), ``guard`` (the
non-finite loss guard), ``lomo`` (accelerate's optimizer wrapper asks ``is_lomo_available()``
twice per step; cached here), ``pace`` (the step clocks behind ``data_wait_fraction`` and
``samples_per_second``), ``record`` (the logging accumulators), ``flops`` (the FLOP count).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import framework_overhead  # noqa: E402  (the paired loops)

PARTS = ("gradnorm", "guard", "lomo", "pace", "record", "flops")


def switch_off(parts: list[str]) -> None:
    """Monkeypatch the named parts of StimulativeTrainer (and accelerate) away, in this process."""
    from stim_hf import StimulativeTrainer

    if "gradnorm" in parts:
        StimulativeTrainer._get_grad_norm = lambda self, model, grad_norm=None: None
    if "guard" in parts:
        StimulativeTrainer.note_loss_terms = lambda self, *args, **kwargs: None
    if "lomo" in parts:
        import accelerate.optimizer

        accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)
    if "pace" in parts:
        import stim_hf.training.trainer

        class NoClocks(stim_hf.training.trainer.TrainingPace):
            def start_fetch(self) -> None: ...
            def end_fetch(self, samples: int) -> None: ...
            def end_step(self) -> None: ...

        stim_hf.training.trainer.TrainingPace = NoClocks
    if "record" in parts:
        StimulativeTrainer._record = lambda self, *args, **kwargs: None
    if "flops" in parts:
        StimulativeTrainer.floating_point_ops = lambda self, inputs: 0


def run_one(parts: list[str], steps: int) -> str:
    """The paired comparison with ``parts`` switched off, as one line."""
    switch_off(parts)
    torch.set_num_threads(1)
    a = argparse.Namespace(
        depth=56, batch=1, image_size=8, num_subnets=1, warmup=30, steps=steps, workers=0, fused_optimizer=True,
    )  # fmt: skip
    data = framework_overhead.InMemory((a.warmup + a.steps) * a.batch, a.image_size)
    trainer_s, plain_s = framework_overhead.run_paired(a, data)
    gap = statistics.median(t - p for t, p in zip(trainer_s, plain_s, strict=True))
    ratio = statistics.median(plain_s) / statistics.median(trainer_s)
    return f"{','.join(parts) or 'none':<44} gap {gap * 1e3:.2f} ms  ratio {ratio:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts", nargs="*", default=None,
        help=f"entries to run, each a comma-separated set of {', '.join(PARTS)} or 'none' (default: each part, all, "
        "then none before and after)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # an entry, inside its own process
    a = parser.parse_args()
    if a.one is not None:
        print(run_one([p for p in a.one.split(",") if p and p != "none"], a.steps), flush=True)
        return
    entries = a.parts or ["none", *PARTS, ",".join(PARTS), "none"]
    for entry in entries:
        unknown = {p for p in entry.split(",") if p and p != "none"} - set(PARTS)
        if unknown:
            parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    for entry in entries:  # a process each: patches do not leak from one entry into the next
        out = subprocess.run(
            [sys.executable, __file__, "--one", entry, "--steps", str(a.steps)], capture_output=True, text=True
        )
        lines = [line for line in out.stdout.splitlines() if " gap " in line]
        print(lines[-1] if lines and out.returncode == 0 else f"{entry}: failed\n{out.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
