"""Evaluation metrics for the Trainer: top-k accuracy through a local ``evaluate`` module.

``evaluate.load("accuracy")`` downloads its script from the hub and fails offline, so stim_hf
ships its own metric module (``metric_modules/top_k_accuracy``). The Trainer is wired as::

    Trainer(..., compute_metrics=build_compute_metrics(), preprocess_logits_for_metrics=top_k_indices)

so each evaluation step keeps only the top-5 class ids (tiny int tensors) instead of full logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import evaluate
import numpy as np
import torch
from transformers import EvalPrediction

TOP_K_ACCURACY_DIR = Path(__file__).resolve().parent / "metric_modules" / "top_k_accuracy"
"""Directory of the ``evaluate`` top-k accuracy module shipped with the package."""


def load_top_k_accuracy(**kwargs) -> evaluate.EvaluationModule:
    """Load the packaged top-k accuracy metric with ``evaluate.load`` from its directory (no network).

    Results stay in memory (``keep_in_memory=True`` unless overridden), so several processes
    computing metrics at once share no cache files or locks.
    """
    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(TOP_K_ACCURACY_DIR), **kwargs)


def top_k_indices(
    logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor | None = None, k: int = 5
) -> torch.Tensor:
    """Reduce logits (B, C) to the ids of the top ``min(k, C)`` classes, best first (B, min(k, C)) int64.

    Meant as the Trainer's ``preprocess_logits_for_metrics`` (signature ``(logits, labels)``): it
    runs on the device, so the Trainer gathers and stores these few ints instead of full logits.
    A tuple of outputs (logits first) is accepted. For ``k`` other than 5 use
    ``functools.partial(top_k_indices, k=k)``.
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    return torch.topk(logits, min(k, logits.shape[-1]), dim=-1).indices


def top1_prediction_share(top1: np.ndarray) -> float:
    """The share of ``top1`` (predicted class ids) taken by the most often predicted class (0.0 when empty)."""
    if top1.size == 0:
        return 0.0
    return float(np.unique(top1, return_counts=True)[1].max() / top1.size)


def build_compute_metrics(ks: Sequence[int] = (1, 5)) -> Callable[[EvalPrediction], dict[str, float]]:
    """A Trainer ``compute_metrics``: ``accuracy`` (top-1) and ``top{k}_accuracy`` for each k in ``ks``.

    Also ``top1_prediction_share``: the share of examples whose top-1 prediction is the most often
    predicted class (1.0: a constant predictor; :mod:`stim_hf.training.collapse` watches it).

    Takes predictions as ranked class ids (from :func:`top_k_indices`; keep its ``k`` >= max(ks),
    since a shorter list counts as "fewer classes than k") or as full float logits (ranked here).
    Examples whose label is negative (the Trainer's -100 padding) are ignored.
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    metric = load_top_k_accuracy()

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        if isinstance(labels, (tuple, list)):
            labels = labels[0]
        predictions = np.asarray(predictions)
        labels = np.asarray(labels).reshape(-1)
        if predictions.ndim == 1:
            predictions = predictions[:, None]
        if predictions.ndim != 2 or predictions.shape[0] != labels.shape[0]:
            raise ValueError(
                f"predictions of shape {predictions.shape} do not match {labels.shape[0]} labels; expected "
                "(N, k) class ids or (N, C) logits"
            )
        if np.issubdtype(predictions.dtype, np.floating):
            top = min(max(ks), predictions.shape[1])
            predictions = np.argsort(-predictions, axis=1, kind="stable")[:, :top]
        keep = labels >= 0
        result = metric.compute(predictions=predictions[keep], references=labels[keep], ks=ks)
        metrics = {key: float(value) for key, value in result.items()}
        metrics["top1_prediction_share"] = top1_prediction_share(predictions[keep, 0])
        return metrics

    return compute_metrics
