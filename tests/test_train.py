"""The training loss: cross-entropy mixed with distillation from the input model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressor
from compressor import train
from compressor.config import Distill
from compressor.errors import DivergenceError
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
        train.training_loss(logits, y, x, teacher, Distill(weight=0.0, temperature=2.0)), ce
    )
    mixed = train.training_loss(logits, y, x, teacher, Distill(weight=0.25, temperature=2.0))
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


def test_first_epoch_divergence_says_nothing_was_kept(tmp_path):
    """Issue 18.13: it said "the last completed epoch is kept for --resume" when none was."""
    torch.manual_seed(0)
    torch.save(lenet5().state_dict(), tmp_path / "lenet5.pt")
    data = random_npz(tmp_path / "data.npz", (1, 12, 12))
    with pytest.raises(DivergenceError) as info:
        compressor.compress(
            str(tmp_path / "lenet5.pt"), arch="lenet5", data=str(data), out=tmp_path / "out",
            device="cpu", overrides=["train.lr=1e6", "train.epochs=1", *FAST],
        )  # fmt: skip
    msg = str(info.value)
    assert "at epoch 1," in msg
    assert "nothing was kept for --resume (no epoch had completed)" in msg
    assert "is kept for --resume" not in msg
    assert "lower `train.lr` (now 1e+06)" in msg
    assert not (tmp_path / "out" / ".compressor-state" / "state.pt").exists()


def _diverging_epoch(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
    loader[2][0][0, 0] = float("inf")  # the loss of the third step is not finite
    optimizer = torch.optim.SGD(model.parameters(), lr=1e12, momentum=0.9)
    scheduler = train.make_scheduler(optimizer, "constant", 4)
    with pytest.raises(DivergenceError) as info:
        train.train_one_epoch(model, loader, optimizer, scheduler, torch.device("cpu"), **kwargs)
    return str(info.value)


def test_divergence_message_tells_what_the_caller_kept():
    later = _diverging_epoch(epoch=2, kept_epochs=2)
    assert "at epoch 3," in later
    assert "The state after epoch 2 is kept for --resume" in later
    assert "would likely diverge again" in later and "lower `train.lr` (now 1e+12)" in later
    bare = _diverging_epoch()  # a caller that keeps nothing
    assert "nothing was kept for --resume" in bare and "is kept" not in bare
    recovery = _diverging_epoch(epoch=1, masks={}, kept_epochs=3, lr_key="recover.lr")
    assert "at recovery epoch 2," in recovery and "`recover.lr`" in recovery
    assert "penalty" not in recovery  # no penalty acts during recovery
