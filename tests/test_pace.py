"""TrainingPace's arithmetic on a fake clock: data wait, step time, interval time less evaluations."""

import pytest

import stim_hf.training.pace as pace_module
from stim_hf.training.pace import TrainingPace


@pytest.fixture
def clock(monkeypatch):
    """A clock that reads what the test sets."""

    class Clock:
        now = 0.0

    monkeypatch.setattr(pace_module, "perf_counter", lambda: Clock.now)
    return Clock


def step(pace, clock, fetch_s: float, rest_s: float, samples: int) -> None:
    pace.start_fetch()
    clock.now += fetch_s
    pace.end_fetch(samples)
    clock.now += rest_s
    pace.end_step()


def test_an_interval_is_its_steps_without_the_evaluations_in_it(clock):
    pace = TrainingPace()
    clock.now = 100.0
    step(pace, clock, fetch_s=1.0, rest_s=3.0, samples=8)
    started = clock.now
    clock.now += 50.0  # an evaluation between two steps
    pace.exclude_since(started)
    step(pace, clock, fetch_s=0.0, rest_s=4.0, samples=8)
    clock.now += 2.0  # the loss read before the log waits for the device: part of the interval
    fraction, samples, seconds = pace.take_interval()
    assert fraction == pytest.approx(1.0 / 8.0)
    assert samples == 16
    assert seconds == pytest.approx(10.0)


def test_the_next_interval_starts_at_the_next_fetch(clock):
    pace = TrainingPace()
    step(pace, clock, fetch_s=0.5, rest_s=1.5, samples=4)
    started = clock.now
    pace.take_interval()
    clock.now += 30.0  # the rest of that log's call: evaluation, checkpoint
    pace.exclude_since(started)  # nothing open: nothing to leave out
    clock.now += 5.0
    step(pace, clock, fetch_s=0.0, rest_s=2.0, samples=4)
    fraction, samples, seconds = pace.take_interval()
    assert (fraction, samples, seconds) == (0.0, 4, pytest.approx(2.0))


def test_an_empty_interval_reads_zero(clock):
    assert TrainingPace().take_interval() == (0.0, 0, 0.0)
