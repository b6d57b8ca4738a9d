"""Fused kernels: the same numbers and the same exact zeros as the eager penalties."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from compressor.groups import build_groups
from compressor.method import kernels, penalties
from compressor.method.splitting import RVSM, Thresholds
from tests.test_splitting import blob_data, tiny_net


def test_ratio_polynomial_matches_the_trigonometric_form():
    q = np.concatenate([np.linspace(0.0, 1.0, 200_001), 1.0 - np.logspace(-12, -1, 500)])
    truth = np.sin(np.arcsin(np.sqrt(q)) / 3.0) ** 2
    in64 = kernels.sin_third_asin_squared(torch.tensor(q, dtype=torch.float64)).numpy()
    q32 = torch.tensor(q, dtype=torch.float32)
    in32 = kernels.sin_third_asin_squared(q32).double().numpy()
    truth32 = np.sin(np.arcsin(np.sqrt(q32.double().numpy())) / 3.0) ** 2  # of the rounded q
    nonzero = q > 0
    rel64 = np.abs(in64 - truth)[nonzero] / truth[nonzero]
    rel32 = np.abs(in32 - truth32)[nonzero] / truth32[nonzero]
    assert rel64.max() < 5e-8  # the fit itself
    assert rel32.max() < 8e-7  # float32 evaluation: a few ulps of a square
    assert in64[0] == 0.0


def _draws(seed: int):
    gen = torch.Generator().manual_seed(seed)
    for mu in (1e-8, 1e-5, 1e-3, 0.05, 0.2, 0.5, 1.0, 5.0):
        for a in (0.01, 0.3, 1.0, 3.0, 50.0):
            scale = 10.0 ** torch.randint(-3, 2, (1,), generator=gen).item()
            y = torch.randn(5000, generator=gen, dtype=torch.float64) * scale
            yield y, mu, a


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_tl1_prox_equals_eager(seed):
    for y64, mu, a in _draws(seed):
        y = y64.float()
        out = torch.empty_like(y)
        kernels.prox_tl1_(y, out, mu, a)
        eager32 = penalties.prox_tl1(y, mu, a)
        reference = penalties.prox_tl1(y.double(), mu, a)
        where = f"mu={mu}, a={a}"
        assert torch.equal(out == 0, eager32 == 0), where  # the same exact zeros
        tol = 2e-6 * (y.double().abs() + a)
        assert ((out.double() - reference).abs() <= tol).all(), where
        assert torch.equal(torch.sign(out), torch.sign(eager32)), where


def test_fused_tl1_prox_on_shapes_zero_mu_and_other_dtypes():
    w = torch.randn(8, 4, 3, 3)
    out = torch.empty_like(w)
    kernels.prox_tl1_(w, out, 0.01, 1.0)
    assert torch.allclose(out, penalties.prox_tl1(w, 0.01, 1.0), atol=1e-6)
    kernels.prox_tl1_(w, out, 0.0, 1.0)
    assert torch.equal(out, w)
    w64 = w.double()
    out64 = torch.empty_like(w64)
    kernels.prox_tl1_(w64, out64, 0.01, 1.0)  # not float32: the eager function, exactly
    assert torch.equal(out64, penalties.prox_tl1(w64, 0.01, 1.0))
    strided = torch.randn(6, 10).t()  # not contiguous: eager
    out_s = torch.empty_like(strided)
    kernels.prox_tl1_(strided, out_s, 0.01, 1.0)
    assert torch.equal(out_s, penalties.prox_tl1(strided, 0.01, 1.0))


def test_fused_coupling_equals_eager():
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 3, 3, 3), (7,), (10, 16)]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    ws = [torch.randn(s, generator=gen) for s in shapes]
    us = [torch.randn(s, generator=gen) for s in shapes]
    expected = [g + 0.7 * (w - u) for g, w, u in zip(grads, ws, us, strict=True)]
    mixed = [grads[0].double(), grads[1]]  # mixed dtypes: not fused, left to the caller
    assert not kernels.add_coupling_grad_(
        mixed, [ws[0].double(), ws[1]], [us[0].double(), us[1]], 0.7
    )
    if not kernels.add_coupling_grad_(grads, ws, us, 0.7):
        pytest.skip("torch.compile cannot build kernels here")
    for got, want in zip(grads, expected, strict=True):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_failing_compile_falls_back_to_eager_once(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    failing = kernels._Compiled(broken)
    failing.get = lambda: None if failing.failed else broken
    monkeypatch.setattr(kernels, "_TL1", failing)
    y = torch.randn(100)
    out = torch.empty_like(y)
    with caplog.at_level(logging.WARNING, logger="compressor.kernels"):
        kernels.prox_tl1_(y, out, 0.01, 1.0)
        kernels.prox_tl1_(y, out, 0.02, 1.0)
    assert torch.equal(out, penalties.prox_tl1(y, 0.02, 1.0))
    assert not kernels.fused_available("tl1")
    warnings = [r for r in caplog.records if "fused kernels are off" in r.message]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].message


def test_rvsm_fused_and_eager_steps_agree():
    x, y = blob_data(n=32)
    states = {}
    for mode in ("on", "off"):
        torch.manual_seed(0)
        model = tiny_net()
        groups = build_groups(model, x[:2])
        rvsm = RVSM(model, groups, individual_kind="tl1", fused=mode)
        assert rvsm.fused == (mode == "on")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        mus = {n: 0.02 for n in rvsm.individual_names}
        thresholds = Thresholds(
            individual=mus,
            individual_a={n: 1.0 for n in mus},
            group=[torch.full((g.size,), 0.05) for g in groups.groups],
            individual_scale={n: 0.5 for n in mus},
        )
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            rvsm.add_coupling_grad()
            opt.step()
            rvsm.after_optimizer_step(lambda t=thresholds: t)
        states[mode] = rvsm.u
    for name, u_on in states["on"].items():
        u_off = states["off"][name]
        assert torch.allclose(u_on, u_off, rtol=1e-4, atol=1e-5), name
    zeros_on = sum(int((u == 0).sum()) for u in states["on"].values())
    assert zeros_on > 0


def test_rvsm_auto_turns_fusion_on_for_big_models_only():
    small = tiny_net()
    x = torch.randn(2, 1, 8, 8)
    assert not RVSM(small, build_groups(small, x), individual_kind="tl1").fused
    with pytest.raises(ValueError, match="fused"):
        RVSM(small, build_groups(small, x), fused="yes")


def test_many_tensors_in_one_call_with_mixed_entries():
    gen = torch.Generator().manual_seed(3)
    ys = [
        torch.randn(32, 3, 3, 3, generator=gen),
        torch.randn(10, generator=gen, dtype=torch.float64),  # eager
        torch.randn(16, 32, generator=gen),
        torch.randn(7, 5, generator=gen).t(),  # not contiguous: eager
        torch.randn(9, generator=gen),  # mu = 0: a copy
    ]
    mus = [0.01, 0.02, 0.3, 0.01, 0.0]
    as_ = [1.0, 0.5, 2.0, 1.0, 1.0]
    outs = [torch.full_like(y, float("nan")) for y in ys]
    kernels.prox_tl1_many_(ys, outs, mus, as_)
    for y, out, mu, a in zip(ys, outs, mus, as_, strict=True):
        want = penalties.prox_tl1(y, mu, a)
        assert torch.equal(out == 0, want == 0)
        assert torch.allclose(out, want, rtol=1e-5, atol=1e-7)


def _bn_net():
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1, bias=False),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12 * 4 * 4, 5),
    )


@pytest.mark.parametrize("individual", ["tl1", "none"])
def test_one_pass_sparse_group_prox_equals_the_two_pass_eager_one(individual):
    """BatchNorm units: shrink factors from w, then prox and shrink in one fused pass."""
    torch.manual_seed(0)
    model = _bn_net()
    x = torch.randn(2, 3, 4, 4)
    groups = build_groups(model, x)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    fused = RVSM(model, groups, individual_kind=individual, fused="on")
    eager = RVSM(model, groups, individual_kind=individual, fused="off")
    mus = {n: 0.01 for n in fused.individual_names}
    group_mu = [torch.rand(g.size, generator=gen) * 0.6 for g in groups.groups]
    group_mu[0][0] = float("inf")  # forced to zero
    thresholds = Thresholds(
        individual=mus,
        individual_a={n: 1.0 for n in mus},
        group=group_mu,
        individual_scale={n: 0.7 for n in mus},
    )
    assert fused.can_fuse_prox(thresholds)
    factors = fused.group_factors(fused.param_by_name, thresholds)
    assert fused.sparse_group_pass_(thresholds, factors) or not kernels.fused_available(
        "sparse_group"
    )
    eager.prox(thresholds)
    zero_units = 0
    for name in fused.names:
        u_f, u_e = fused.u[name], eager.u[name]
        assert torch.equal(u_f == 0, u_e == 0), name
        assert torch.allclose(u_f, u_e, rtol=2e-6, atol=1e-7), name
    for mask in groups.zero_masks(fused.u):
        zero_units += int(mask.sum())
    assert zero_units >= 1


def test_one_pass_prox_is_not_taken_where_units_are_measured_by_penalised_weights():
    model = tiny_net()  # BatchNorm: units measured by gamma and beta
    groups = build_groups(model, torch.randn(2, 1, 8, 8))
    rvsm = RVSM(model, groups, individual_kind="tl1", fused="on")
    norm_param = sorted(rvsm._norm_params)[0]
    penalised = Thresholds(
        individual={norm_param: 0.1},  # a penalty on a unit-measuring entry
        individual_a={norm_param: 1.0},
        group=[torch.zeros(g.size) for g in groups.groups],
    )
    assert not rvsm.can_fuse_prox(penalised)
    unpenalised = Thresholds(individual={}, individual_a={}, group=penalised.group)
    assert rvsm.can_fuse_prox(unpenalised)
    l1 = RVSM(model, groups, individual_kind="l1", fused="on")  # no fused l1 kernel
    assert not l1.can_fuse_prox(unpenalised)


def test_sparse_group_prox_declines_what_it_cannot_fuse():
    y = torch.randn(4, 3)
    out = torch.empty_like(y)
    assert not kernels.sparse_group_prox_([y.double()], [out.double()], [0.1], [1.0], torch.ones(4))
    assert not kernels.sparse_group_prox_([y.t()], [out.t()], [0.1], [1.0], torch.ones(3))
    assert not kernels.sparse_group_prox_([y], [out], [0.1], [1.0], torch.ones(5))  # wrong rows
    factors = torch.tensor([1.0, 0.0, 0.5, 2.0])
    if not kernels.sparse_group_prox_([y], [out], [None], [1.0], factors):
        pytest.skip("torch.compile cannot build kernels here")
    assert torch.equal(out, y * factors[:, None])  # no prox: a scaled copy
