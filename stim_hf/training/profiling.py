"""``profile_steps``: record a window of training steps with torch.profiler, to see where a step's time goes.

The window's trace (``profile/rank{r}_steps{a}-{b}.pt.trace.json`` in the output directory) opens in
Perfetto (ui.perfetto.dev), ``chrome://tracing`` or TensorBoard's profiler plugin; next to it a text
summary lists the phases stim_hf labels in each step (waiting for batches, the full network's
forward, the sub-network forwards, the optimizer step) and the costliest operators. Only the
window is recorded: the other steps run without the profiler and without the labels.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import TrainerCallback

from stim_hf.errors import ConfigError

logger = logging.getLogger(__name__)

PROFILE_DIR_NAME = "profile"
# The labelled phases of a step, in step order; torch labels the optimizer step itself.
PHASES = ("stim_hf/wait_for_batches", "stim_hf/training_step", "stim_hf/full_forward", "stim_hf/subnet_forward")
_WINDOW = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_profile_steps(value: Any) -> tuple[int, int] | None:
    """``"20-25"`` -> (20, 25), ``"20"`` -> (20, 20), None or ``""`` -> None: optimizer steps, counted from 1.

    Raises ConfigError naming the accepted forms for anything else.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = f"{value[0]}-{value[1]}"
    match = _WINDOW.match(str(value)) if not isinstance(value, bool) else None
    first = int(match.group(1)) if match else 0
    last = int(match.group(2) or first) if match else 0
    if not match or first < 1 or last < first:
        raise ConfigError(
            f"profile_steps={value!r} is not a window of optimizer steps; write 'FIRST-LAST' (e.g. '20-25', "
            "steps counted from 1, FIRST <= LAST) or one step ('20'); leave it unset to profile nothing"
        )
    return first, last


def phase(active: bool, name: str) -> AbstractContextManager:
    """A profiler label for ``name`` while a window is recorded; nothing (no cost) otherwise."""
    return record_function(name) if active else nullcontext()


@contextmanager
def left_out_of_window(trainer: Any, name: str) -> Iterator[None]:
    """Label ``name`` (an evaluation, a checkpoint) and leave its wall time out of the window's time per step.

    Adds the time to ``trainer.profiled_time_left_out_s`` while a window is recorded; nothing otherwise.
    """
    if not trainer.profiling:
        yield
        return
    started = time.perf_counter()
    try:
        with record_function(name):
            yield
    finally:
        trainer.profiled_time_left_out_s += time.perf_counter() - started


class StepProfilerCallback(TrainerCallback):
    """Records optimizer steps ``first``..``last`` of a trainer with torch.profiler and writes trace and summary.

    Sets ``trainer.profiling`` while recording, which switches on stim_hf's phase labels. A run
    that ends inside the window writes what it recorded.
    """

    def __init__(self, trainer: Any, first: int, last: int) -> None:
        self.trainer, self.first, self.last = trainer, first, last
        self.profiler: profile | None = None

    # Started at the end of the step before the window, so that the first step's wait for its batches
    # (fetched before the Trainer's on_step_begin) is recorded too; at the run's start or on resume
    # from inside the window's first step, at on_train_begin / on_step_begin.
    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, D102
        self._maybe_start(args, state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, D102
        self._maybe_start(args, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, D102
        if self.profiler is not None and state.global_step >= self.last:
            self._finish(args, state.global_step)
        else:
            self._maybe_start(args, state.global_step)

    def _maybe_start(self, args: Any, completed_steps: int) -> None:
        if self.profiler is not None or completed_steps + 1 != self.first:
            return
        activities = [ProfilerActivity.CPU]
        if args.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        elif not torch.cuda.is_available():
            # A CUDA build of torch on a machine without a GPU: kineto would log a misleading
            # "ERROR ... gpuGetDeviceCount failed" when the window ends. The user's own level wins.
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        self.profiler = profile(activities=activities)
        self.profiler.__enter__()
        self.trainer.profiling = True
        self._started = time.perf_counter()
        self._left_out_at_start = self.trainer.profiled_time_left_out_s

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, D102
        if self.profiler is not None:
            self._finish(args, state.global_step)

    def _finish(self, args: Any, last_step: int) -> None:
        profiler, self.profiler = self.profiler, None
        self.trainer.profiling = False
        if args.device.type == "cuda":
            torch.cuda.synchronize()  # the window's queued GPU work belongs to its wall time
        left_out_s = self.trainer.profiled_time_left_out_s - self._left_out_at_start
        wall_s = time.perf_counter() - self._started - left_out_s
        profiler.__exit__(None, None, None)
        directory = os.path.join(args.output_dir, PROFILE_DIR_NAME)
        os.makedirs(directory, exist_ok=True)
        stem = os.path.join(directory, f"rank{args.process_index}_steps{self.first}-{last_step}")
        profiler.export_chrome_trace(f"{stem}.pt.trace.json")
        with open(f"{stem}.txt", "w", encoding="utf-8") as handle:
            handle.write(summarize(profiler, self.first, last_step, wall_s, left_out_s))
        logger.info("profiled steps %d-%d: %s.pt.trace.json and %s.txt", self.first, last_step, stem, stem)


def summarize(profiler: profile, first: int, last: int, wall_s: float, left_out_s: float = 0.0) -> str:
    """The window's phases (stim_hf's labels, the backward they imply, the optimizer step), then the costliest operators.

    ``wall_s`` is the window's wall time without the ``left_out_s`` of its evaluations and checkpoints.
    """
    events = profiler.key_averages()
    on_device = any(event.device_time_total > 0 for event in events)
    sort_by = "self_device_time_total" if on_device else "self_cpu_time_total"
    steps = last - first + 1
    by_key = {event.key: event for event in events}

    def row(label: str, event: Any) -> tuple[str, int, float, float]:
        return label, event.count, event.cpu_time_total, event.device_time_total

    rows = [row(name, by_key[name]) for name in PHASES[:2] if name in by_key]
    forwards = [by_key[name] for name in PHASES[2:] if name in by_key]
    rows += [row(f"  {event.key}", event) for event in forwards]
    if "stim_hf/training_step" in by_key:
        step = by_key["stim_hf/training_step"]
        rest_host = step.cpu_time_total - sum(event.cpu_time_total for event in forwards)
        rest_device = step.device_time_total - sum(event.device_time_total for event in forwards)
        rows.append(("  backward and the rest", step.count, rest_host, rest_device))
    rows += [row(event.key, event) for event in events if event.key.startswith("Optimizer.step#")]
    left_out = ""
    if left_out_s > 0:
        left_out = f"; the window's evaluations and checkpoints, {left_out_s * 1e3:.1f} ms, left out"
    lines = [
        f"steps {first}-{last}: {steps} optimizer steps, {wall_s * 1e3 / steps:.2f} ms per step (wall clock, "
        f"under the profiler{left_out})",
        "",
        f"{'phase':<34}{'calls':>7}{'host ms/step':>14}" + (f"{'device ms/step':>16}" if on_device else ""),
    ]
    for name, count, host_us, device_us in rows:
        line = f"{name:<34}{count:>7}{host_us / 1e3 / steps:>14.2f}"
        lines.append(line + (f"{device_us / 1e3 / steps:>16.2f}" if on_device else ""))
    lines += [
        "",
        "stim_hf/training_step is one micro-batch's forwards and backward (the indented rows); host times include "
        "the time spent inside nested phases. Evaluations and checkpoints in the window are labelled "
        "stim_hf/evaluate and stim_hf/save_checkpoint; their operators are in the table below.",
        "",
        f"operators by {sort_by.replace('_', ' ')}:",
        events.table(sort_by=sort_by, row_limit=25),
    ]
    return "\n".join(lines)
