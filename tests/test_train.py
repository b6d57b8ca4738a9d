"""The training loss: cross-entropy mixed with distillation from the input model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressor
from compressor import train
from compressor.models import lenet5
from tests.test_pipeline import FAST, random_npz

pytestmark = pytest.mark.usefixtures("one_thread")


def test_distillation_loss_is_the_scaled_kl_divergence():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(6, 10, generator=gen)
    teacher = torch.randn(6, 10, generator=gen)
    t = 3.0
    p = F.softmax(teacher / t, dim=1)
    q = F.softmax(student / t, dim=1)
    by_hand = (p * (p.log() - q.log())).sum(1).mean() * t * t
    assert torch.allclose(train.distillation_loss(student, teacher, t), by_hand, atol=1e-6)
    assert train.distillation_loss(teacher, teacher, t).abs() < 1e-6


def test_training_loss_mixes_and_leaves_the_teacher_alone():
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3).eval().requires_grad_(False)
    student = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    logits = student(x)
    ce = F.cross_entropy(logits, y)
    kd = train.distillation_loss(logits, teacher(x), 2.0)
    assert torch.equal(train.training_loss(logits, y, x, None, None), ce)
    assert torch.equal(
        train.training_loss(logits, y, x, teacher, {"weight": 0.0, "temperature": 2.0}), ce
    )
    mixed = train.training_loss(logits, y, x, teacher, {"weight": 0.25, "temperature": 2.0})
    assert torch.allclose(mixed, 0.75 * ce + 0.25 * kd)
    mixed.backward()
    assert student.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_compress_with_distillation(tmp_path):
    torch.manual_seed(0)
    torch.save(lenet5().state_dict(), tmp_path / "lenet5.pt")
    data = random_npz(tmp_path / "data.npz", (1, 12, 12))
    report = compressor.compress(
        str(tmp_path / "lenet5.pt"),
        arch="lenet5",
        data=str(data),
        out=tmp_path / "out",
        device="cpu",
        target_macs=2,
        overrides=["train.epochs=2", "distill.weight=0.5", "distill.temperature=2", *FAST],
    )
    assert report["exit_code"] == 0
    assert report["recipe"]["distill"] == {"weight": 0.5, "temperature": 2.0}
    assert report["target"]["reached"] >= 2 * 0.95
