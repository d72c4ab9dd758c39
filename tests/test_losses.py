"""Distillation losses against values computed by hand."""

import math

import pytest
import torch

from stim_hf.method.losses import direction_kl_divergence, distillation_loss, kl_divergence, normalize_logits


def _softmax(row):
    exps = [math.exp(v) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _kl_by_hand(teacher, student, temperature=1.0):
    values = []
    for t_row, s_row in zip(teacher, student, strict=True):
        p = _softmax([v / temperature for v in t_row])
        q = _softmax([v / temperature for v in s_row])
        values.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)))
    return temperature**2 * sum(values) / len(values)


TEACHER = [[2.0, 0.5, -1.0], [0.0, 0.3, 0.1]]
STUDENT = [[1.0, 1.0, 0.0], [-0.5, 0.8, 0.2]]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_matches_hand_computation(temperature):
    got = kl_divergence(torch.tensor(TEACHER), torch.tensor(STUDENT), temperature)
    assert got.item() == pytest.approx(_kl_by_hand(TEACHER, STUDENT, temperature), rel=1e-5)


def _layernorm_by_hand(row, amplitude):
    mean = sum(row) / len(row)
    var = sum((v - mean) ** 2 for v in row) / len(row)
    return [amplitude * (v - mean) / math.sqrt(var + 1e-7) for v in row]


@pytest.mark.parametrize("amplitude", [1.0, 3.0])
def test_direction_kl_matches_hand_computation(amplitude):
    got = direction_kl_divergence(torch.tensor(TEACHER), torch.tensor(STUDENT), amplitude=amplitude)
    teacher = [_layernorm_by_hand(r, amplitude) for r in TEACHER]
    student = [_layernorm_by_hand(r, amplitude) for r in STUDENT]
    assert got.item() == pytest.approx(_kl_by_hand(teacher, student), rel=1e-5)


def test_direction_kl_ignores_scale_and_shift():
    teacher = torch.tensor(TEACHER)
    student = torch.tensor(STUDENT)
    base = direction_kl_divergence(teacher, student)
    moved = direction_kl_divergence(3.0 * teacher + 5.0, 0.5 * student - 2.0)
    assert moved.item() == pytest.approx(base.item(), rel=1e-4)
    assert direction_kl_divergence(teacher, 7.0 * teacher + 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_l2_normalisation():
    logits = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    torch.testing.assert_close(normalize_logits(logits, "l2", 2.0), torch.tensor([[1.2, 1.6], [2.0, 0.0]]))


def test_teacher_gets_no_gradient_and_float32():
    teacher = torch.tensor(TEACHER, requires_grad=True)
    student = torch.tensor(STUDENT, dtype=torch.bfloat16, requires_grad=True)
    loss = distillation_loss("kl_direction", teacher, student)
    assert loss.dtype == torch.float32
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad.float()).all()


def test_kl_is_zero_for_equal_logits():
    logits = torch.randn(4, 10)
    assert kl_divergence(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
