"""Telling a collapsed run while it trains: a full network that has learned to predict (nearly) nothing.

A large KL weight introduced too abruptly can drive the full network and its sub-networks to the
trivial agreement of a near-constant predictor (issue 17's pilot: ST++ with lambda = 10 from step 0,
the cross-entropy flat at ln 10 after 20 steps, the KL near 0, 10.6 % top-1 on 10 classes, and the
run exited with code 0). :class:`CollapseMonitorCallback`, added by the trainer, watches three signs
after the first epoch (the first epoch is left alone: every run starts at ln C, and a healthy run
can still evaluate at chance after one epoch), each sign only once it persists:

- the training cross-entropy stays at about ln C (at least ``CE_SHARE_OF_LN_C`` of it) for
  ``CE_PATIENCE_LOGS`` training logs in a row spanning at least ``CE_PATIENCE_EPOCHS``;
- ``EVAL_PATIENCE`` evaluations in a row are at chance (top-1 at most 1/C + ``CHANCE_MARGIN``) or
  nearly one class (``top1_prediction_share`` of :func:`stim_hf.training.metrics.build_compute_metrics` at
  least ``CONSTANT_PREDICTION_SHARE``, with 3 or more classes).

The first time one does, it logs a warning naming the step, the sign, lambda and its schedule, and the remedies, and
records it in ``state.log_history`` (``{"collapse": message, "step": ..., "epoch": ...}``, saved
with ``trainer_state.json``). ``on_collapse: stop`` raises :class:`TrainingCollapseError` instead,
so the job exits non-zero; ``ignore`` turns the check off.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from stim_hf.errors import StimError

logger = logging.getLogger(__name__)

COLLAPSE_ACTIONS = ("warn", "stop", "ignore")
"""What ``on_collapse`` may ask for when a run collapses."""

GRACE_EPOCHS = 1.0
"""No verdict before this many epochs: every run starts with its cross-entropy at ln C."""
CE_SHARE_OF_LN_C = 0.95
"""A training cross-entropy at or above this share of ln C has learned (almost) nothing."""
CE_PATIENCE_LOGS = 3
"""Training logs in a row at about ln C before the run is called collapsed..."""
CE_PATIENCE_EPOCHS = 0.5
"""...and the epochs those logs must span."""
EVAL_PATIENCE = 2
"""Evaluations in a row at chance or nearly one class before the run is called collapsed."""
CHANCE_MARGIN = 0.01
"""An evaluation accuracy within this of 1/C is at chance."""
CONSTANT_PREDICTION_SHARE = 0.9
"""Predictions this concentrated on one class make a near-constant predictor (with 3 or more classes)."""


class TrainingCollapseError(StimError, RuntimeError):
    """The full network collapsed to a (near-)constant predictor (``on_collapse: stop``)."""


class CollapseMonitorCallback(TrainerCallback):
    """Warns (or stops, or says nothing) when training has collapsed; see the module docstring.

    ``action`` is ``on_collapse``. The number of classes C is the trained model's ``config.num_labels``,
    read when training begins (a model without one is not checked).
    """

    def __init__(self, action: str = "warn") -> None:
        if action not in COLLAPSE_ACTIONS:
            raise ValueError(f"action={action!r} is not one of {COLLAPSE_ACTIONS}")
        self.action = action
        self.num_classes = 0
        self._ce_streak: list[tuple[float, float]] = []  # (epoch, cross-entropy) of the logs at about ln C
        self._eval_streak: list[str] = []  # the signs of the evaluations in a row at chance or constant
        self.reports: list[str] = []

    @property
    def ln_c(self) -> float:
        """ln C: the cross-entropy of a uniform guess over the C classes."""
        return math.log(self.num_classes) if self.num_classes > 1 else 0.0

    @property
    def active(self) -> bool:
        """Whether the check runs at all (two or more classes, ``on_collapse`` not 'ignore')."""
        return self.action != "ignore" and self.num_classes > 1

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Take C from the model being trained."""
        num_labels = getattr(getattr(kwargs.get("model"), "config", None), "num_labels", None)
        self.num_classes = int(num_labels) if isinstance(num_labels, int) else 0
        self._ce_streak, self._eval_streak = [], []

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Follow the training cross-entropy (``ce_loss``, else ``loss``) after the grace epochs."""
        if not self.active or self.reports or not logs or "eval_loss" in logs:
            return
        ce = logs.get("ce_loss", logs.get("loss"))
        if ce is None or (state.epoch or 0.0) < GRACE_EPOCHS:
            return
        if not math.isfinite(ce) or ce < CE_SHARE_OF_LN_C * self.ln_c:
            self._ce_streak = []
            return
        self._ce_streak.append((state.epoch, float(ce)))
        span = self._ce_streak[-1][0] - self._ce_streak[0][0]
        if len(self._ce_streak) >= CE_PATIENCE_LOGS and span >= CE_PATIENCE_EPOCHS:
            kl = logs.get("kl_loss")
            kl_text = f" while the KL term reads {kl:.3g}" if kl is not None else ""
            self._report(
                args,
                state,
                f"the training cross-entropy has stayed at about ln {self.num_classes} = {self.ln_c:.3f} for "
                f"{len(self._ce_streak)} logs in a row ({span:.2f} epochs, last {self._ce_streak[-1][1]:.3f}){kl_text}: "
                "the full network predicts (nearly) the same for every image",
            )
            self._ce_streak = []

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Check an evaluation's accuracy against chance and its predictions against a constant."""
        if not self.active or self.reports or not metrics or (state.epoch or 0.0) < GRACE_EPOCHS:
            return
        accuracy = _metric(metrics, "accuracy")
        share = _metric(metrics, "top1_prediction_share")
        chance = 1.0 / self.num_classes
        if accuracy is not None and accuracy <= chance + CHANCE_MARGIN:
            sign = f"top-1 {100 * accuracy:.2f}%, chance for {self.num_classes} classes"
        elif share is not None and self.num_classes >= 3 and share >= CONSTANT_PREDICTION_SHARE:
            sign = f"{100 * share:.1f}% of the images predicted as one class"
        else:
            self._eval_streak = []
            return
        self._eval_streak.append(sign)
        if len(self._eval_streak) == EVAL_PATIENCE:
            self._report(
                args,
                state,
                f"{EVAL_PATIENCE} evaluations in a row are at chance or a near-constant predictor "
                f"({'; '.join(self._eval_streak)})",
            )

    def _report(self, args: TrainingArguments, state: TrainerState, sign: str) -> None:
        message = (
            f"training has collapsed at step {state.global_step} (epoch {state.epoch or 0.0:.2f}): {sign}. "
            f"{_remedy(args)}"
        )
        self.reports.append(message)
        state.log_history.append({"collapse": message, "epoch": state.epoch, "step": state.global_step})
        if self.action == "stop":
            raise TrainingCollapseError(message + " (on_collapse=stop; 'warn' only reports it)")
        logger.warning("%s (on_collapse=warn; set on_collapse: stop to end such runs)", message)


def _metric(metrics: dict[str, Any], name: str) -> float | None:
    """``metrics``' value for ``name`` under the evaluation's prefix (``eval_``, ``test_``..., from its ``_runtime``)."""
    prefix = next((key.removesuffix("_runtime") for key in metrics if key.endswith("_runtime")), "eval")
    value = metrics.get(f"{prefix}_{name}", metrics.get(name))
    return float(value) if isinstance(value, (int, float)) else None


def _remedy(args: TrainingArguments) -> str:
    """The settings that lead to a collapse, and what to change, for the run's arguments."""
    lr = getattr(args, "learning_rate", None)
    if getattr(args, "uses_subnets", False):
        start = f", from epoch {args.stim_start_epoch:g}" if args.stim_start_epoch else ""
        # Ordered by what the pilot of docs/results.md measured: cosine_up kept lambda 5 and 10 training;
        # one epoch of common training first and a 20 % learning-rate warm-up did not.
        return (
            f"Settings: kl_coef={args.kl_coef:g} (kl_coef_schedule={args.kl_coef_schedule}{start}, "
            f"kl_loss={args.kl_loss}), learning_rate={lr:g}. Remedies: bring lambda in with kl_coef_schedule: "
            "cosine_up (it kept lambda 5 and 10 training where they collapsed from step 0, docs/results.md), or a "
            "smaller kl_coef; a few epochs of common training first (stim_start_epoch) or a learning-rate warm-up "
            "did not prevent it there"
        )
    return (
        f"Settings: common training (no sub-network passes), learning_rate={lr:g}. Remedies: a lower learning_rate, "
        "a learning-rate warm-up (warmup_steps: 0.1), or gradient clipping (max_grad_norm: 1.0)"
    )
