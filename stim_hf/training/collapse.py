"""Telling a collapsed run while it trains: a full network that has learned to predict (nearly) nothing.

A large KL weight introduced too abruptly can drive the full network and its sub-networks to the
trivial agreement of a near-constant predictor (issue 17's pilot: ST++ with lambda = 10 from step 0,
the cross-entropy flat at ln 10 after 20 steps, the KL near 0, 10.6 % top-1 on 10 classes, and the
run exited with code 0). :class:`CollapseMonitorCallback`, added by the trainer, watches three signs
after a grace period, each sign only once it persists. The grace (every run starts at ln C) ends
with the first epoch or ``GRACE_STEPS`` steps after the learning-rate warm-up, whichever comes
first: a healthy run can still evaluate at chance after a short epoch, and a long epoch can hide a
stall (a ResNet-56 at lr 0.1 on all of CIFAR-10, 391 steps an epoch, sat at chance with 91-94 % of
its predictions on one class from step 100 to about 300 on 1 of 3 seeds, docs/results.md). The signs:

- the training cross-entropy stays at about ln C (at least ``CE_SHARE_OF_LN_C`` of it) for
  ``CE_PATIENCE_LOGS`` training logs in a row spanning at least ``CE_PATIENCE_EPOCHS``;
- ``EVAL_PATIENCE`` evaluations in a row are at chance (top-1 at most 1/C + ``CHANCE_MARGIN``) or
  nearly one class (``top1_prediction_share`` of :func:`stim_hf.training.metrics.build_compute_metrics` at
  least ``CONSTANT_PREDICTION_SHARE``, with 3 or more classes).

The first time one does, it logs a warning naming the step, the sign, lambda (its value and the value
in effect at that step) and the remedies, and records it in ``state.log_history`` (``{"collapse":
message, "step": ..., "epoch": ...}``, saved with ``trainer_state.json``). ``on_collapse: stop``
raises :class:`TrainingCollapseError` instead, so the job exits non-zero; ``ignore`` turns the check
off.

The remedies depend on the lambda in effect: below ``STABLE_KL_COEF`` the KL term is an unlikely
cause, and the learning rate a likely one (common training stalls at chance early on too: a ResNet-56
at lr 0.1 without warm-up on 5,000 CIFAR-10 images, docs/measurements/full_network_study/README.md). A stall can be transient, so
after a warning the monitor keeps watching the evaluations: one at least ``RECOVERY_MARGIN`` above
chance, and not a near-constant predictor, is logged as a recovery (``{"collapse_recovered": message,
...}``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from stim_hf.errors import StimError

logger = logging.getLogger(__name__)

COLLAPSE_ACTIONS = ("warn", "stop", "ignore")
"""What ``on_collapse`` may ask for when a run collapses."""

GRACE_EPOCHS = 1.0
"""No verdict before this many epochs (or ``GRACE_STEPS``, whichever ends first): every run starts at ln C."""
GRACE_STEPS = 100
"""...or before this many optimizer steps after the warm-up. Healthy ResNet-20/56 runs at lr 0.1 were off ln C by
step 100 (training cross-entropy at most 0.96 ln 10, test top-1 at least 16 %, on all of CIFAR-10); the
stalled one was still at 0.997 ln 10 with 94 % of its predictions on one class."""
CE_SHARE_OF_LN_C = 0.97
"""A training cross-entropy at or above this share of ln C has learned (almost) nothing. Collapsed runs sit
at 0.99 or more; at 0.95 a slow ResNet-56 start (0.96 of ln 10 while it evaluated at 15-16 %) was flagged."""
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
RECOVERY_MARGIN = 0.1
"""After a warning, an evaluation this far above chance (and not near-constant) counts as a recovery."""
STABLE_KL_COEF = 1.0
"""Lambda in effect below this has not collapsed a run (docs/results.md: lambda 1 from step 0 trained on every seed)."""


class TrainingCollapseError(StimError, RuntimeError):
    """The full network collapsed to a (near-)constant predictor (``on_collapse: stop``)."""


class CollapseMonitorCallback(TrainerCallback):
    """Warns (or stops, or says nothing) when training has collapsed; see the module docstring.

    ``action`` is ``on_collapse``. The number of classes C is the trained model's ``config.num_labels``,
    read when training begins (a model without one is not checked). ``kl_coef_now``, when given,
    returns lambda at the current step (the trainer's schedule), named in the warning.
    """

    def __init__(self, action: str = "warn", kl_coef_now: Callable[[], float] | None = None) -> None:
        if action not in COLLAPSE_ACTIONS:
            raise ValueError(f"action={action!r} is not one of {COLLAPSE_ACTIONS}")
        self.action = action
        self.num_classes = 0
        self._ce_streak: list[tuple[float, float]] = []  # (epoch, cross-entropy) of the logs at about ln C
        self._eval_streak: list[str] = []  # the signs of the evaluations in a row at chance or constant
        self.kl_coef_now = kl_coef_now
        self.reports: list[str] = []
        self.recovery: str | None = None
        self._report_step = 0  # the step of the first report, named by the recovery
        self._grace_steps = GRACE_STEPS  # the warm-up's steps are added when training begins

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
        """Take C from the model being trained, and the warm-up's length from the arguments."""
        num_labels = getattr(getattr(kwargs.get("model"), "config", None), "num_labels", None)
        self.num_classes = int(num_labels) if isinstance(num_labels, int) else 0
        self._ce_streak, self._eval_streak = [], []
        warmup = args.get_warmup_steps(state.max_steps) if state.max_steps > 0 else 0
        self._grace_steps = warmup + GRACE_STEPS

    def in_grace(self, state: TrainerState) -> bool:
        """Whether it is too early for a verdict: within the first epoch and the first ``GRACE_STEPS`` steps after
        the warm-up."""
        return (state.epoch or 0.0) < GRACE_EPOCHS and state.global_step < self._grace_steps

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Follow the training cross-entropy (``ce_loss``, else ``loss``) after the grace period."""
        if not self.active or self.reports or not logs or "eval_loss" in logs:
            return
        ce = logs.get("ce_loss", logs.get("loss"))
        if ce is None or self.in_grace(state):
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
        if not self.active or not metrics or self.in_grace(state):
            return
        accuracy = _metric(metrics, "accuracy")
        share = _metric(metrics, "top1_prediction_share")
        chance = 1.0 / self.num_classes
        if self.reports:
            self._check_recovery(state, accuracy, share, chance)
            return
        if accuracy is not None and accuracy <= chance + CHANCE_MARGIN:
            sign = f"top-1 {100 * accuracy:.2f}%, chance for {self.num_classes} classes"
        elif self._near_constant(share):
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

    def _near_constant(self, share: float | None) -> bool:
        """Whether an evaluation's top-1 prediction share makes a near-constant predictor (3 or more classes)."""
        return share is not None and self.num_classes >= 3 and share >= CONSTANT_PREDICTION_SHARE

    def _check_recovery(self, state: TrainerState, accuracy: float | None, share: float | None, chance: float) -> None:
        """Log, once, an evaluation after the warning that is clearly above chance and not near-constant."""
        if self.recovery is not None or accuracy is None or accuracy < chance + RECOVERY_MARGIN:
            return
        if self._near_constant(share):
            return
        self.recovery = (
            f"training has recovered from the collapse reported at step {self._report_step}: top-1 {100 * accuracy:.2f}% "
            f"at step {state.global_step} (epoch {state.epoch or 0.0:.2f}), chance {100 * chance:.2f}%"
        )
        state.log_history.append({"collapse_recovered": self.recovery, "epoch": state.epoch, "step": state.global_step})
        logger.warning("%s", self.recovery)

    def _report(self, args: TrainingArguments, state: TrainerState, sign: str) -> None:
        message = (
            f"training has collapsed at step {state.global_step} (epoch {state.epoch or 0.0:.2f}): {sign}. "
            f"{_remedy(args, self.kl_coef_now() if self.kl_coef_now is not None else None)}"
        )
        self.reports.append(message)
        self._report_step = state.global_step
        state.log_history.append({"collapse": message, "epoch": state.epoch, "step": state.global_step})
        if self.action == "stop":
            raise TrainingCollapseError(message + " (on_collapse=stop; 'warn' only reports it)")
        logger.warning("%s (on_collapse=warn; set on_collapse: stop to end such runs)", message)


def _metric(metrics: dict[str, Any], name: str) -> float | None:
    """``metrics``' value for ``name`` under the evaluation's prefix (``eval_``, ``test_``..., from its ``_runtime``)."""
    prefix = next((key.removesuffix("_runtime") for key in metrics if key.endswith("_runtime")), "eval")
    value = metrics.get(f"{prefix}_{name}", metrics.get(name))
    return float(value) if isinstance(value, (int, float)) else None


def _remedy(args: TrainingArguments, kl_coef_now: float | None = None) -> str:
    """The settings that lead to a collapse, and what to change, for the run's arguments and the lambda in effect."""
    lr = getattr(args, "learning_rate", None)
    lr_remedies = (
        "a learning-rate warm-up (warmup_steps: 0.1), a lower learning_rate, or gradient clipping (max_grad_norm: 1.0)"
    )
    if not getattr(args, "uses_subnets", False):
        return f"Settings: common training (no sub-network passes), learning_rate={lr:g}. Remedies: {lr_remedies}"
    start = f", from epoch {args.stim_start_epoch:g}" if args.stim_start_epoch else ""
    in_effect = f", {kl_coef_now:.3g} in effect at this step" if kl_coef_now is not None else ""
    settings = (
        f"Settings: kl_coef={args.kl_coef:g} (kl_coef_schedule={args.kl_coef_schedule}{start}, kl_loss={args.kl_loss}"
        f"{in_effect}), learning_rate={lr:g}."
    )
    if kl_coef_now is not None and kl_coef_now < STABLE_KL_COEF:
        return (
            f"{settings} Lambda is still below {STABLE_KL_COEF:g} here, where the KL term has not collapsed a run; "
            "the learning rate more likely did (common training stalls the same way: docs/results.md and the study log it links). "
            f"Remedies: {lr_remedies}"
        )
    # Ordered by what the pilot of docs/results.md measured: cosine_up kept lambda 5 and 10 training;
    # one epoch of common training first and a 20 % learning-rate warm-up did not.
    remedies = "a smaller kl_coef"
    if args.kl_coef_schedule != "cosine_up":
        remedies = (
            "bring lambda in with kl_coef_schedule: cosine_up (it kept lambda 5 and 10 training where they collapsed "
            f"from step 0, docs/results.md), or {remedies}"
        )
    return (
        f"{settings} Remedies: {remedies}; a few epochs of common training first (stim_start_epoch) or "
        "a learning-rate warm-up did not prevent a collapse driven by lambda there"
    )
