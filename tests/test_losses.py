"""The distillation loss against a direct computation on fixed logits."""

import math

import pytest
import torch
from torch import nn

from myrtle_vision.losses import DistillationLoss


def _logits():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3,
            torch.randn(6, 5, generator=g) * 3, torch.tensor([0, 1, 2, 3, 4, 0]))


def _log_softmax(row, T):
    m = max(x / T for x in row)
    z = math.log(sum(math.exp(x / T - m) for x in row)) + m
    return [x / T - z for x in row]


def _cross_entropy(logits, targets):
    return sum(-_log_softmax(row, 1.0)[t] for row, t in zip(logits.tolist(), targets.tolist())) / len(targets)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("T", [1.0, 3.0, 10.0])
def test_soft_loss_matches_direct_computation(alpha, T):
    cls, dist, teacher, y = _logits()
    kl = 0.0
    for d_row, t_row in zip(dist.tolist(), teacher.tolist()):
        log_p_t, log_p_s = _log_softmax(t_row, T), _log_softmax(d_row, T)
        kl += sum(math.exp(a) * (a - b) for a, b in zip(log_p_t, log_p_s))
    expected = alpha * _cross_entropy(cls, y) + (1 - alpha) * T * T * kl / len(y)  # alpha weights the labels
    loss = DistillationLoss(nn.CrossEntropyLoss(), "soft", alpha, T)(cls, dist, teacher, y)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("T", [1.0, 4.0])  # hard distillation ignores the temperature
def test_hard_loss_matches_direct_computation(alpha, T):
    cls, dist, teacher, y = _logits()
    teacher_labels = teacher.argmax(dim=1)
    assert not torch.equal(teacher_labels, y)  # so that the two terms really differ
    expected = alpha * _cross_entropy(cls, y) + (1 - alpha) * _cross_entropy(dist, teacher_labels)
    loss = DistillationLoss(nn.CrossEntropyLoss(), "hard", alpha, T)(cls, dist, teacher, y)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_gradients_reach_only_the_student():
    cls, dist, teacher, y = _logits()
    cls, dist, teacher = cls.requires_grad_(), dist.requires_grad_(), teacher.requires_grad_()
    DistillationLoss(nn.CrossEntropyLoss(), "soft", 0.5, 3.0)(cls, dist, teacher, y).backward()
    assert cls.grad.abs().sum() > 0 and dist.grad.abs().sum() > 0
    assert teacher.grad is None


def test_soft_term_is_zero_when_student_matches_teacher():
    _, _, teacher, y = _logits()
    loss = DistillationLoss(nn.CrossEntropyLoss(), "soft", 0.0, 3.0)(teacher, teacher.clone(), teacher, y)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_label_smoothing_applies_to_the_class_head_only():
    cls, dist, teacher, y = _logits()
    smooth = DistillationLoss(nn.CrossEntropyLoss(label_smoothing=0.1), "hard", 0.5)
    plain = DistillationLoss(nn.CrossEntropyLoss(), "hard", 0.5)
    diff = smooth(cls, dist, teacher, y) - plain(cls, dist, teacher, y)
    expected = 0.5 * (nn.CrossEntropyLoss(label_smoothing=0.1)(cls, y) - nn.CrossEntropyLoss()(cls, y))
    assert diff.item() == pytest.approx(expected.item(), rel=1e-5)
