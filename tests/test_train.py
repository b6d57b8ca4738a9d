"""The training loss (cross-entropy mixed with distillation from the input model), and how
the steps run: mixed precision (``train.amp``) and channels-last batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compressor
from compressor import train
from compressor.config import Distill, Recipe
from compressor.errors import DivergenceError, RecipeError
from compressor.models import lenet5
from compressor.recipe import load_recipe
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


# ------------------------------------------------------------ mixed precision, channels-last


def _train_cfg(**keys):
    return Recipe.from_dict(
        load_recipe("tl1-group", [f"train.{k}={v}" for k, v in keys.items()])
    ).train


def test_amp_auto_resolves_per_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert train.resolve_amp("auto", cpu) == "off"
    assert train.resolve_amp("bf16", cpu) == "bf16"  # asked for: runs under CPU autocast
    assert train.resolve_amp("off", cuda) == "off"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert train.resolve_amp("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert train.resolve_amp("auto", cuda) == "fp16"  # pre-Ampere: fp16 with loss scaling
    assert train.resolve_amp("fp16", cuda) == "fp16"


def test_fp16_on_the_cpu_is_refused_with_the_fix():
    with pytest.raises(RecipeError) as info:
        train.resolve_amp("fp16", torch.device("cpu"))
    assert info.value.exit_code == 2
    msg = str(info.value)
    assert "`train.amp`" in msg and "bf16, off or auto" in msg and "--device cuda" in msg


def test_channels_last_auto_is_on_for_conv_models_on_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    conv, mlp = nn.Sequential(nn.Conv2d(1, 2, 3)), nn.Sequential(nn.Linear(2, 2))
    cfg = _train_cfg()
    assert (cfg.amp, cfg.channels_last) == ("auto", "auto")
    cpu = train.resolve_precision(cfg, torch.device("cpu"), conv)
    assert cpu.summary() == {"amp": "off", "channels_last": False} and cpu.scaler is None
    cuda = torch.device("cuda", 0)
    assert train.resolve_precision(cfg, cuda, conv).summary() == {
        "amp": "bf16",
        "channels_last": True,
    }
    assert not train.resolve_precision(cfg, cuda, mlp).channels_last
    forced = train.resolve_precision(_train_cfg(channels_last="on"), torch.device("cpu"), mlp)
    assert forced.channels_last  # YAML's on is true
    assert forced.batch(torch.zeros(2, 3)).is_contiguous()  # only 4-D batches change layout
    assert forced.batch(torch.zeros(2, 3, 4, 5)).is_contiguous(memory_format=torch.channels_last)


def _quadrants(n=64, seed=0):
    """8x8 images whose class (0-3) is the bright quadrant: learnt in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = 0.2 * torch.rand(n, 1, 8, 8, generator=gen)
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, 0, 4 * r : 4 * r + 4, 4 * col : 4 * col + 4] += 1.0
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4),
    )  # fmt: skip


def _epochs(model, precision, epochs, method=None, lr=0.1):
    loader = _quadrants()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = train.make_scheduler(optimizer, "constant", epochs * len(loader))
    cpu = torch.device("cpu")
    return [
        train.train_one_epoch(
            model, loader, optimizer, scheduler, cpu, method=method, precision=precision
        )
        for _ in range(epochs)
    ]


def test_bf16_trains_and_the_method_hooks_still_run():
    from compressor import method as method_mod
    from compressor.groups import build_groups

    model = _conv_net()
    cfg = Recipe.from_dict(load_recipe("tl1-group", ["target.seek_accuracy_drop=null"]))
    groups = build_groups(model, torch.randn(1, 1, 8, 8))
    sparse = method_mod.build(cfg, model, groups, total_steps=32, baseline={})
    u0 = {k: v.clone() for k, v in sparse.rvsm.u.items()}
    precision = train.Precision(torch.device("cpu"), amp="bf16")
    with precision.autocast():
        assert model(torch.randn(2, 1, 8, 8)).dtype == torch.bfloat16  # autocast is on
    losses = _epochs(model, precision, 8, method=sparse)
    assert losses[-1] < 0.3 * losses[0], losses
    assert sparse.rvsm.step_count == 32  # after_step ran every step
    assert any(not torch.equal(u0[k], u) for k, u in sparse.rvsm.u.items())  # u = prox(w) moved
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


class _Hooks:
    """A stand-in method: records the gradient it sees and counts the steps it is told of."""

    def __init__(self, param):
        self.param, self.grads, self.steps = param, [], 0

    def after_backward(self):
        self.grads.append(self.param.grad.detach().clone())

    def after_step(self):
        self.steps += 1


def test_fp16_loss_scaling_unscales_before_the_hooks_and_skips_overflowed_steps():
    """The coupling gradient must be added to the true gradients, and a step the scaler
    skips (inf/nan from an fp16 overflow) must not run the method's after_step."""
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    reference = nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    F.cross_entropy(reference(x), y).backward()

    precision = train.Precision(cpu, amp="fp16")  # CPU fp16: only to exercise the scaler here
    assert precision.scaler is not None and precision.scaler.get_scale() > 1
    hooks = _Hooks(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = train.make_scheduler(optimizer, "constant", 4)
    train.train_one_epoch(
        model, [(x, y)], optimizer, scheduler, cpu, method=hooks, precision=precision
    )
    assert torch.allclose(hooks.grads[0], reference.weight.grad, rtol=1e-2, atol=1e-3)
    assert hooks.steps == 1 and scheduler.last_epoch == 1

    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = model.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    scale = precision.scaler.get_scale()
    train.train_one_epoch(
        model, [(x, y)], optimizer, scheduler, cpu, method=hooks, precision=precision
    )
    handle.remove()
    assert hooks.steps == 1 and scheduler.last_epoch == 1  # skipped: no after_step, no schedule
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert precision.scaler.get_scale() < scale


def test_channels_last_gives_the_same_training_as_contiguous_batches():
    cpu = torch.device("cpu")
    plain, nhwc = _conv_net(), _conv_net()
    a = _epochs(plain, train.Precision(cpu), 2)
    b = _epochs(nhwc, train.Precision(cpu, channels_last=True), 2)
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    for p, q in zip(plain.parameters(), nhwc.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5)
        assert q.is_contiguous()  # the parameters keep their layout (fused kernels, exports)


def test_compress_with_bf16_and_channels_last_records_them(tmp_path):
    torch.manual_seed(0)
    torch.save(lenet5().state_dict(), tmp_path / "lenet5.pt")
    data = random_npz(tmp_path / "data.npz", (1, 12, 12))
    report = compressor.compress(
        str(tmp_path / "lenet5.pt"), arch="lenet5", data=str(data), out=tmp_path / "out",
        device="cpu", target_macs=2,
        overrides=["train.epochs=1", "train.amp=bf16", "train.channels_last=on", *FAST],
    )  # fmt: skip
    assert report["exit_code"] == 0
    assert report["input"]["amp"] == "bf16" and report["input"]["channels_last"] is True
    assert report["recipe"]["train"]["amp"] == "bf16"
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_compress_refuses_fp16_on_the_cpu_before_touching_out(tmp_path):
    torch.save(lenet5().state_dict(), tmp_path / "lenet5.pt")
    data = random_npz(tmp_path / "data.npz", (1, 12, 12))
    with pytest.raises(RecipeError, match="`train.amp` is 'fp16'"):
        compressor.compress(
            str(tmp_path / "lenet5.pt"), arch="lenet5", data=str(data), out=tmp_path / "out",
            device="cpu", overrides=["train.amp=fp16", *FAST],
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_auto_epochs_train_at_least_min_steps_on_small_training_sets():
    """``train.epochs: auto``: 3 epochs where they make enough steps (55,000 images in
    batches of 128: 430 a epoch), more on a small set (10,000 images: 79 a epoch), whole
    epochs; an explicit number is kept as given."""
    assert train.resolve_epochs("auto", 430, 600) == 3
    assert train.resolve_epochs("auto", 79, 600) == 8  # 632 steps
    assert train.resolve_epochs("auto", 600, 600) == 3
    assert train.resolve_epochs(1, 79, 600) == 1
    assert train.resolve_epochs(0, 79, 600) == 0


def test_auto_epochs_run_and_are_reported_as_resolved(tmp_path):
    """A run with ``epochs: auto`` trains the resolved number of epochs and says so; the
    recipe it writes keeps ``auto``."""
    torch.manual_seed(0)
    torch.save(lenet5().state_dict(), tmp_path / "lenet5.pt")
    data = random_npz(tmp_path / "data.npz", (1, 12, 12))  # 128 training samples: 4 batches
    report = compressor.compress(
        str(tmp_path / "lenet5.pt"), arch="lenet5", data=str(data), out=tmp_path / "out",
        device="cpu", overrides=["train.min_steps=17", "gates.max_accuracy_drop=null", *FAST],
    )  # fmt: skip
    assert report["exit_code"] == 0
    assert report["input"]["epochs"] == 5  # ceil(17 / 4)
    assert [row["epoch"] for row in report["epochs"]] == [1, 2, 3, 4, 5]
    assert report["recipe"]["train"]["epochs"] == "auto"


def test_per_sample_hits_are_the_images_evaluate_counts_right():
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3)
    xs, ys = torch.randn(10, 4, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    loader = [(xs[:6], ys[:6]), (xs[6:], ys[6:])]
    hits = train.top1_per_sample(model, loader, torch.device("cpu"))
    with torch.no_grad():
        outputs = model(xs)
    assert torch.equal(hits, 100.0 * (outputs.argmax(1) == ys).to(torch.float64))
    acc, loss = train.evaluate(model, loader, torch.device("cpu"))
    assert acc == pytest.approx(float(hits.mean()))
    assert loss == pytest.approx(float(F.cross_entropy(outputs, ys)))
