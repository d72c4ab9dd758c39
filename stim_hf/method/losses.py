"""Distillation losses from the full network (teacher) to a sub-network (student).

All losses are computed in float32 whatever the autocast dtype, and averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KL_LOSSES = ("kl", "kl_direction")
LOGIT_NORMALIZATIONS = ("layernorm", "l2")

# The released ST++ code normalises with LayerNorm(eps=1e-7); kept for faithful results.
LAYERNORM_EPS = 1e-7


def normalize_logits(logits: torch.Tensor, method: str = "layernorm", amplitude: float = 1.0) -> torch.Tensor:
    """Keep only the direction of each row of logits, scaled to ``amplitude``.

    ``layernorm``: zero mean, unit standard deviation over the classes (no affine), as the
    released ST++ code does; ``l2``: unit Euclidean norm. The result is multiplied by
    ``amplitude`` (A), which sets how peaked the softmax of the normalised logits can be.
    """
    logits = logits.float()
    if method == "layernorm":
        normalized = F.layer_norm(logits, logits.shape[-1:], eps=LAYERNORM_EPS)
    elif method == "l2":
        normalized = F.normalize(logits, p=2.0, dim=-1, eps=LAYERNORM_EPS)
    else:
        raise ValueError(f"unknown logit normalization '{method}'; valid: {', '.join(LOGIT_NORMALIZATIONS)}")
    return amplitude * normalized


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, batch mean.

    The teacher is detached here, so no gradient reaches the full network through this term.
    The ``T^2`` factor keeps gradient magnitudes independent of the temperature (Hinton et al.).
    """
    teacher = teacher_logits.detach().float() / temperature
    student = student_logits.float() / temperature
    kl = F.kl_div(
        F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="batchmean", log_target=True
    )
    return kl * (temperature**2)


def direction_kl_divergence(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    temperature: float = 1.0,
    amplitude: float = 1.0,
    normalization: str = "layernorm",
) -> torch.Tensor:
    """ST++'s "KL-": KL between the normalised logits, aligning only their direction."""
    return kl_divergence(
        normalize_logits(teacher_logits.detach(), normalization, amplitude),
        normalize_logits(student_logits, normalization, amplitude),
        temperature,
    )


def distillation_loss(
    kind: str,
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    temperature: float = 1.0,
    amplitude: float = 1.0,
    normalization: str = "layernorm",
) -> torch.Tensor:
    """Dispatch to :func:`kl_divergence` (``kl``) or :func:`direction_kl_divergence` (``kl_direction``)."""
    if kind == "kl":
        return kl_divergence(teacher_logits, student_logits, temperature)
    if kind == "kl_direction":
        return direction_kl_divergence(teacher_logits, student_logits, temperature, amplitude, normalization)
    raise ValueError(f"unknown kl_loss '{kind}'; valid: {', '.join(KL_LOSSES)}")
