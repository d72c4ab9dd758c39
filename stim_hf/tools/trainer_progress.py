"""The Trainer's progress as whole lines where stderr is a log, not a terminal.

``Trainer``'s ``ProgressCallback`` draws a tqdm bar: in a log file (``nohup``, a batch job, a pipe)
its carriage returns pile a fine-tuning's 200 updates onto one endless line. ``stim-hf train`` and
``stim-hf finetune`` swap it there for :class:`LineProgressCallback`: a line every few seconds with
the steps done, the rate and the time left, and the logged metrics on lines of their own. On a
terminal, in a notebook, or with ``disable_tqdm`` the Trainer's own display stays.
"""

from __future__ import annotations

import sys
from typing import Any

from transformers import Trainer
from transformers.trainer_callback import ProgressCallback

from stim_hf.tools.progress import LINE_EVERY_S, LineProgress, shows_bars


class LineProgressCallback(ProgressCallback):
    """``ProgressCallback`` with :class:`~stim_hf.tools.progress.LineProgress` for the training bar and no
    evaluation bar (an evaluation's metrics are logged when it ends)."""

    def __init__(self, every_s: float = LINE_EVERY_S, max_str_len: int = 100) -> None:
        super().__init__(max_str_len=max_str_len)
        self.every_s = every_s

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            # A resumed run counts from its checkpoint's step.
            self.training_bar = LineProgress(
                state.max_steps, "training", "step", self.every_s, sys.stderr, initial=state.global_step
            )
        self.current_step = state.global_step

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs: Any) -> None:
        pass


def use_line_progress_in_logs(trainer: Trainer, every_s: float = LINE_EVERY_S) -> bool:
    """Replace ``trainer``'s tqdm progress bar with :class:`LineProgressCallback` when stderr is not a terminal (nor a
    notebook) and the bar is on; True if it did."""
    if trainer.args.disable_tqdm or shows_bars(sys.stderr):
        return False
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LineProgressCallback(every_s))
    return True
