"""Framework overhead: ST++ through StimulativeTrainer against a plain PyTorch loop doing the same arithmetic.

  python bench/performance/framework_overhead.py                      # CIFAR ResNet-20, batch 64, K=1, CPU
  python bench/performance/framework_overhead.py --depth 56 --num-subnets 6
  python bench/performance/framework_overhead.py --depth 56 --batch 128 --warmup 30 --steps 100   # on a GPU (bf16, channels_last)
  python bench/performance/framework_overhead.py --workers 2            # the trainer's batches from 2 loader processes
  python bench/performance/framework_overhead.py --depth 56 --batch 1 --image-size 8 --threads 1 --warmup 30 --steps 300 --paired
                                                            # host-bound CPU stand-in, steps interleaved

With ``--paired`` the two loops are interleaved step by step (one plain step after each trainer
step) and compared by their median step times: machine noise then hits both alike, step for
step, instead of whole runs apart.

With ``--clock cpu`` steps are timed by this process's CPU time instead of the wall clock: on a
shared machine other jobs then barely move the figures (with ``--threads 1``, one compute
thread; loader worker processes are not counted).

Same model, same in-memory data in the same order, same sub-networks and input sizes (drawn from
the trainer's own sampler), same SGD (torch's fused kernel in both unless --fused-optimizer false). Both run ``--warmup`` steps first (on a CPU each new input
size costs a one-off kernel creation), then ``--steps`` timed steps. On a GPU both use bf16 autocast
and channels_last, and the plain loop copies each batch to the GPU as the Trainer does; then the
trainer runs once more with torch's sync debug mode to count the host-device synchronisations of
its steady steps (0 expected: each one stalls the GPU). Target (issue 6): trainer throughput >=
0.9 x the plain loop's. Prints both and the ratio; writes JSON with --json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import TrainerCallback

from stim_hf import StimulativeTrainer, StimulativeTrainingArguments
from stim_hf.method import find_residual_stages, resize_for_subnet, use_subnet
from stim_hf.method.batchnorm import batchnorm_layers, frozen_running_stats
from stim_hf.method.losses import distillation_loss
from stim_hf.models import CifarResNetConfig, CifarResNetForImageClassification


class InMemory(Dataset):
    """Pre-made tensors: no decoding, no augmentation."""

    def __init__(self, n: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class StepTimer(TrainerCallback):
    """Times the trainer's steps after ``warmup`` as the plain loop is timed: GPU work waited for at both ends only.

    Given the trainer's ``pace`` (stim_hf.training.pace.TrainingPace), it also notes its clocks when the timing starts.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, None, None
        self.pace, self.pace_at_start = None, None

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step == self.warmup:
            synchronize()
            self.start = clock()
            if self.pace is not None:
                self.pace_at_start = (self.pace.data_wait_s, self.pace.step_s)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        # Only after the last step: a synchronisation after every step would stall the trainer's
        # GPU queue each step, a cost the plain loop does not pay.
        if state.global_step >= state.max_steps:
            synchronize()
            self.end = clock()


CUDA = torch.cuda.is_available()
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def synchronize() -> None:
    """Wait for queued GPU work (no-op on a CPU), so that wall time is the work's time."""
    if CUDA:
        torch.cuda.synchronize()


def make_args(a: argparse.Namespace) -> StimulativeTrainingArguments:
    return StimulativeTrainingArguments(
        output_dir="/tmp/bench_overhead", stim_method="stpp", num_subnets=a.num_subnets,
        per_device_train_batch_size=a.batch, max_steps=a.warmup + a.steps, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to="none", save_strategy="no",
        logging_steps=10**6, disable_tqdm=True, use_cpu=not CUDA, bf16=CUDA, channels_last=CUDA,
        dataloader_num_workers=a.workers, num_eval_subnets=0, train_sampling_strategy="sequential", seed=0,
        # Only where the option exists, so that this script also times older commits (docs/benchmarks.md).
        **({"fused_optimizer": a.fused_optimizer} if hasattr(StimulativeTrainingArguments, "fused_optimizer") else {}),
    )  # fmt: skip


def model_for(a: argparse.Namespace):
    torch.manual_seed(0)
    return CifarResNetForImageClassification(CifarResNetConfig(depth=a.depth, num_labels=10))


def run_trainer(a: argparse.Namespace, data: InMemory) -> float:
    timer = StepTimer(a.warmup)
    trainer = StimulativeTrainer(model=model_for(a), args=make_args(a), train_dataset=data, callbacks=[timer])
    trainer.train()
    return a.steps * a.batch / (timer.end - timer.start)


class SyncCounter(TrainerCallback):
    """Counts the synchronising CUDA calls of the steps after ``warmup`` (torch's sync debug mode)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.caught, self._stopped = warmup, None, False
        self._catcher = warnings.catch_warnings(record=True)

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step == self.warmup:
            self.caught = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        # The last step ends the count: the Trainer's own end-of-training reads are not steps.
        if self.caught is not None and state.global_step >= state.max_steps:
            self.stop()

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.stop()

    def stop(self) -> None:
        if self.caught is not None and not self._stopped:
            self._stopped = True
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(None, None, None)

    def syncs(self) -> list[str]:
        """Where each synchronising call came from (the Python line that made it)."""
        return [
            f"{os.path.basename(w.filename)}:{w.lineno}" for w in self.caught or [] if "synchroniz" in str(w.message)
        ]


def count_trainer_syncs(a: argparse.Namespace, data: InMemory) -> list[str]:
    """The synchronising calls of the trainer's timed steps (on a GPU)."""
    counter = SyncCounter(a.warmup)
    trainer = StimulativeTrainer(model=model_for(a), args=make_args(a), train_dataset=data, callbacks=[counter])
    trainer.train()
    return counter.syncs()


class PlainLoop:
    """The plain PyTorch loop: the trainer's arithmetic for one step at a time, nothing else."""

    def __init__(self, a: argparse.Namespace, data: InMemory) -> None:
        self.a, self.data = a, data
        self.device = torch.device("cuda" if CUDA else "cpu")
        model = model_for(a).to(self.device).train()
        self.model = model.to(memory_format=torch.channels_last) if CUDA else model
        self.stages = find_residual_stages(self.model)
        self.layers = batchnorm_layers(self.model)  # listed once, as the trainer does
        # The trainer's sampler, so both loops see the same sub-networks and sizes.
        self.sampler = StimulativeTrainer(model=model_for(a), args=make_args(a)).subnet_sampler
        fused = a.fused_optimizer or None  # as the trainer's
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, fused=fused)
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if CUDA else contextlib.nullcontext

    def step(self, step: int) -> None:
        """Optimizer step ``step`` on the batch the trainer sees at that step."""
        a, data = self.a, self.data
        lo = (step * a.batch) % len(data)
        x = data.x[lo : lo + a.batch].to(self.device, non_blocking=True)
        y = data.y[lo : lo + a.batch].to(self.device, non_blocking=True)
        if CUDA:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            logits = self.model(pixel_values=x).logits
            loss = F.cross_entropy(logits.float(), y)
            for k in range(a.num_subnets):
                subnet = self.sampler.sample(step, 0, k, image_size=x.shape[-2])
                with use_subnet(self.stages, subnet), frozen_running_stats(self.layers):
                    student = self.model(pixel_values=resize_for_subnet(x, subnet)).logits
                loss = loss + distillation_loss("kl_direction", logits.detach(), student)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def run_plain(a: argparse.Namespace, data: InMemory) -> float:
    loop = PlainLoop(a, data)
    start = None
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            synchronize()
            start = clock()
        loop.step(step)
    synchronize()
    return a.steps * a.batch / (clock() - start)


class PairedTimer(TrainerCallback):
    """After each trainer step, one plain-loop step: both timed step by step, side by side.

    The trainer's step is the time from the end of the previous plain step to this step's
    ``on_step_end``: a whole turn of the Trainer's loop (logging check, batch fetch, forward,
    backward, optimizer step, callbacks). On a GPU each time is read after a synchronisation, so
    every step is timed to completion on both sides (neither overlaps the next step's host work).
    """

    def __init__(self, a: argparse.Namespace, plain: PlainLoop) -> None:
        self.a, self.plain = a, plain
        self.resumed: float | None = None
        self.trainer_s: list[float] = []
        self.plain_s: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        synchronize()
        ended = clock()
        if self.resumed is not None and state.global_step > self.a.warmup:
            self.trainer_s.append(ended - self.resumed)
        started = clock()
        self.plain.step(state.global_step - 1)
        synchronize()
        if state.global_step > self.a.warmup:
            self.plain_s.append(clock() - started)
        self.resumed = clock()


def run_paired(a: argparse.Namespace, data: InMemory) -> tuple[list[float], list[float]]:
    """Trainer and plain steps interleaved one by one: (trainer step times, plain step times) after the warm-up."""
    timer = PairedTimer(a, PlainLoop(a, data))
    trainer = StimulativeTrainer(model=model_for(a), args=make_args(a), train_dataset=data, callbacks=[timer])
    trainer.train()
    return timer.trainer_s, timer.plain_s


def report_paired(a: argparse.Namespace, data: InMemory, device: str) -> dict:
    """Print the paired comparison: medians per step, the gap and the ratio of throughputs."""
    trainer_s, plain_s = run_paired(a, data)
    median = statistics.median
    gaps = [t - p for t, p in zip(trainer_s, plain_s, strict=True)]
    result = {
        "trainer_step_ms": median(trainer_s) * 1e3,
        "plain_step_ms": median(plain_s) * 1e3,
        "gap_ms": median(gaps) * 1e3,
        "ratio": median(plain_s) / median(trainer_s),
        "pairs": len(gaps),
    }
    print(f"ResNet-{a.depth}, batch {a.batch}, {a.image_size} px, ST++ K={a.num_subnets}, {device}, {a.clock} clock")
    print(f"paired steps: {result['pairs']} (one plain step after each trainer step), medians per step:")
    print(f"plain PyTorch loop : {result['plain_step_ms']:8.2f} ms")
    print(f"StimulativeTrainer : {result['trainer_step_ms']:8.2f} ms  (gap {result['gap_ms']:.2f} ms per step)")
    print(f"ratio trainer / plain: {result['ratio']:.3f}  (target >= 0.9)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32, help="input side in px (small: a host-bound stand-in)")
    parser.add_argument("--num-subnets", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="alternate plain/trainer runs this many times")
    parser.add_argument("--workers", type=int, default=0, help="the trainer's dataloader_num_workers")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--fused-optimizer", default=True, type=lambda v: v.lower() in ("1", "true", "yes"),
        help="true (default) / false: torch's fused SGD kernel, in both loops",
    )  # fmt: skip
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="time steps by wall or CPU time")
    parser.add_argument(
        "--paired", action="store_true",
        help="interleave the loops step by step and compare median step times (steadier on a shared machine)",
    )  # fmt: skip
    parser.add_argument("--json", default=None)
    a = parser.parse_args()
    global clock
    clock = CLOCKS[a.clock]
    if a.threads:
        torch.set_num_threads(a.threads)
    data = InMemory((a.warmup + a.steps) * a.batch, a.image_size)
    device = torch.cuda.get_device_name() if CUDA else f"CPU ({os.cpu_count()} cores)"
    if a.paired:
        result = report_paired(a, data, device)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"device": device, "args": vars(a), "paired": result}, f, indent=2)
        return
    plain, ours = [], []
    for _ in range(a.repeats):  # alternate, so machine noise hits both alike
        plain.append(run_plain(a, data))
        ours.append(run_trainer(a, data))
    best_plain, best_ours = max(plain), max(ours)
    print(f"ResNet-{a.depth}, batch {a.batch}, {a.image_size} px, ST++ K={a.num_subnets}, {device}, {a.clock} clock")
    print(f"plain PyTorch loop : {best_plain:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in plain)})")
    print(f"StimulativeTrainer : {best_ours:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in ours)})")
    print(f"ratio trainer / plain: {best_ours / best_plain:.3f}  (target >= 0.9)")
    syncs = None
    if CUDA:
        syncs = count_trainer_syncs(a, data)
        print(f"host-device synchronisations in {a.steps} trainer steps: {len(syncs)}")
        for place in sorted(set(syncs)):
            print(f"  {syncs.count(place)} x sync at {place}")
    if a.json:
        result = {"device": device, "args": vars(a), "plain": plain, "trainer": ours, "ratio": best_ours / best_plain}
        with open(a.json, "w") as f:
            json.dump(result | {"trainer_syncs": syncs}, f, indent=2)


if __name__ == "__main__":
    main()
