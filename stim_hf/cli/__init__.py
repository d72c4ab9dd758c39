"""The ``stim-hf`` command line: dispatch (:mod:`~stim_hf.cli.dispatch`) and the training job (:mod:`~stim_hf.cli.train`)."""

from stim_hf.cli.dispatch import USAGE, end_progress_bars, main, run_guarded

__all__ = ["USAGE", "end_progress_bars", "main", "run_guarded"]
