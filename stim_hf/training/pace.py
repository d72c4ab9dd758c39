"""Training pace between two logs: images per second, and the share of step time spent waiting for data.

The trainer logs both with every training loss (``samples_per_second`` and ``data_wait_fraction``,
``train/...`` in TensorBoard), so a user sees what stimulative training costs and whether the
data pipeline keeps up while the run goes, not only in ``train_runtime`` at its end.
"""

from __future__ import annotations

from time import perf_counter

from transformers import TrainerCallback


class TrainingPace:
    """Two clocks over a logging interval.

    - **Step time** (host): each optimizer step from the moment its batches are asked for to its
      end; the part spent fetching is the data wait. ``data_wait_fraction`` is their ratio.
    - **Interval time** (wall): from the first fetch after a log to the next log, less the
      evaluations and checkpoints in between. The interval ends inside the Trainer's log, after its
      loss read has waited for the device, so queued GPU work counts in the interval it belongs to.
      ``samples_per_second`` is the images fetched in the interval over this time.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything: a new ``train()`` call starts a new interval."""
        self.data_wait_s = self.step_s = self.paused_s = 0.0
        self.samples = 0
        self.fetch_started: float | None = None
        self.interval_started: float | None = None

    def start_fetch(self) -> None:
        """A step asks for its batches: its step time starts, and an interval if none is open."""
        self.fetch_started = perf_counter()
        if self.interval_started is None:
            self.interval_started, self.paused_s = self.fetch_started, 0.0

    def end_fetch(self, samples: int) -> None:
        """The step's batches (``samples`` images) arrived."""
        self.data_wait_s += perf_counter() - self.fetch_started
        self.samples += samples

    def end_step(self) -> None:
        """The optimizer step ended."""
        if self.fetch_started is not None:
            self.step_s += perf_counter() - self.fetch_started
            self.fetch_started = None

    def exclude_since(self, started: float) -> None:
        """Leave the time since ``started`` (an evaluation, a checkpoint) out of the open interval."""
        if self.interval_started is not None:
            self.paused_s += perf_counter() - max(started, self.interval_started)

    def take_interval(self) -> tuple[float, int, float]:
        """``(data_wait_fraction, samples, seconds)`` of the interval ending now; the next starts at the next fetch."""
        fraction = min(self.data_wait_s / self.step_s, 1.0) if self.step_s > 0 else 0.0
        seconds = 0.0
        if self.interval_started is not None:
            seconds = perf_counter() - self.interval_started - self.paused_s
        samples = self.samples
        self.data_wait_s = self.step_s = self.paused_s = 0.0
        self.samples = 0
        self.interval_started = None
        return fraction, samples, seconds


class PaceCallback(TrainerCallback):
    """Ends each optimizer step on the trainer's :class:`TrainingPace`."""

    def __init__(self, pace: TrainingPace) -> None:
        self.pace = pace

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, D102
        self.pace.end_step()
