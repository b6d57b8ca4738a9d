from types import SimpleNamespace as NS

import torch
import torch.nn.functional as F
from torch import nn

from compressor.groups import build_groups
from compressor.method.group_terms import group_term
from compressor.method.splitting import RVSM, Thresholds
from compressor.method.strength import Lambdas, group_weights, reference_norms
from compressor.method.training import SparseTraining
from compressor.prune import prune_zero_channels


def tiny_net():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 3),
    )


def blob_data(n=256, seed=0):
    """Three classes told apart by where a bright square sits."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=gen)
    for i, c in enumerate(y.tolist()):
        x[i, 0, 2 * c : 2 * c + 3, 2 * c : 2 * c + 3] += 2.0
    return x, y


def test_coupling_gradient_is_beta_times_w_minus_u():
    model = tiny_net()
    x = torch.randn(2, 1, 8, 8)
    groups = build_groups(model, x[:1])
    rvsm = RVSM(model, groups, individual_kind="l1", beta=0.5)
    for u in rvsm.u.values():
        u.mul_(0.5)
    model.zero_grad()
    model(x).sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    rvsm.add_coupling_grad()
    for n, p in model.named_parameters():
        if n in rvsm.u:
            torch.testing.assert_close(p.grad, before[n] + 0.5 * (p.detach() - rvsm.u[n]))
        else:
            torch.testing.assert_close(p.grad, before[n])


def test_prox_composes_individual_then_group_and_state_round_trips():
    model = tiny_net()
    groups = build_groups(model, torch.randn(1, 1, 8, 8))
    rvsm = RVSM(model, groups, individual_kind="l1", beta=1.0, beta_growth=2.0, beta_every=1)
    big = [torch.full((g.size,), 1e9) for g in groups]
    rvsm.prox(Thresholds({n: 0.0 for n in rvsm.individual_names}, {}, big))
    assert all(float(n.max()) == 0 for n in groups.channel_norms(rvsm.u))
    # a weight that no group covers (the classifier) keeps its value under mu = 0
    torch.testing.assert_close(rvsm.u["8.weight"], model[8].weight.detach())
    rvsm.end_epoch(0)
    assert rvsm.beta == 2.0
    other = RVSM(model, groups, individual_kind="l1")
    other.load_state_dict(rvsm.state_dict())
    assert other.beta == 2.0 and all(torch.equal(other.u[n], rvsm.u[n]) for n in rvsm.u)


def test_sparse_weights_swaps_and_restores():
    model = tiny_net()
    groups = build_groups(model, torch.randn(1, 1, 8, 8))
    rvsm = RVSM(model, groups, individual_kind="none")
    w = model[0].weight.detach().clone()
    rvsm.u["0.weight"].zero_()
    with rvsm.sparse_weights():
        assert float(model[0].weight.detach().abs().sum()) == 0
    torch.testing.assert_close(model[0].weight.detach(), w)


def test_hold_zero_keeps_units_exactly_zero_in_w_through_training_and_resume():
    torch.manual_seed(0)
    model = tiny_net()
    x, y = blob_data(64)
    groups = build_groups(model, x[:1])
    rvsm = RVSM(model, groups, individual_kind="none", beta=1.0)
    masks = [torch.arange(g.size) % 2 == 0 for g in groups]
    rvsm.hold_zero(masks)
    params = dict(model.named_parameters())
    for norms, mask in zip(groups.channel_norms(params, all_members=True), masks, strict=True):
        assert bool((norms[mask] == 0).all()) and bool((norms[~mask] > 0).all())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    zero = Thresholds({}, {}, [torch.zeros(g.size) for g in groups])
    for _ in range(5):  # momentum would bring held units back without the projection
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        rvsm.add_coupling_grad()
        opt.step()
        rvsm.after_optimizer_step(lambda: zero)
    for norms, mask in zip(groups.channel_norms(params, all_members=True), masks, strict=True):
        assert bool((norms[mask] == 0).all()) and bool((norms[~mask] > 0).all())
    other = RVSM(model, groups, individual_kind="none")
    other.load_state_dict(rvsm.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.held_zero, masks, strict=True))
    rvsm.hold_zero(None)
    assert rvsm.held_zero is None


def test_rvsm_with_tl1_and_group_penalty_sparsifies_and_prunes_exactly():
    torch.manual_seed(0)
    model = tiny_net()
    x, y = blob_data()
    groups = build_groups(model, x[:1])
    penalty = NS(
        individual=NS(kind="tl1", strength=0.3, lam=None, a=1.0),
        group=NS(strength=0.6, lam=None),
    )
    rvsm = RVSM(model, groups, individual_kind="tl1", beta=1.0)
    weights = group_weights(groups, "size")
    lambdas = Lambdas.from_recipe(
        penalty, model=model, groups=groups, individual_names=rvsm.individual_names,
        weights=weights, budget=1.0,
    )  # fmt: skip
    scale = weights * reference_norms(groups, dict(model.named_parameters()))
    method = SparseTraining(model, groups, rvsm, lambdas, group_term("l1"), scale=scale)
    method.prox(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(300):
        i = torch.randint(0, len(x), (32,))
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        method.after_backward()
        opt.step()
        method.after_step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    masks = groups.zero_masks(rvsm.u)
    assert sum(int(m.sum()) for m in masks) > 0, "no group went exactly to zero"
    assert float((rvsm.u["3.weight"] == 0).float().mean()) > 0.2
    rvsm.finalize()
    model.eval()
    sparse_out = model(x).detach()
    params_before = sum(p.numel() for p in model.parameters())
    prune_zero_channels(model, groups, x[:64])
    assert sum(p.numel() for p in model.parameters()) < params_before
    torch.testing.assert_close(model(x), sparse_out, atol=1e-4, rtol=1e-4)


def test_prox_with_tensor_scale_is_s_times_prox_of_w_over_s():
    from compressor.method import penalties

    torch.manual_seed(1)
    model = tiny_net()
    groups = build_groups(model, torch.randn(1, 1, 8, 8))
    rvsm = RVSM(model, groups, individual_kind="tl1")
    params = dict(model.named_parameters())
    names = rvsm.individual_names
    scales = {n: float(params[n].detach().abs().mean()) for n in names}
    zero_group = [torch.zeros(g.size) for g in groups]  # factor 1: u is the individual prox
    thr = Thresholds({n: 0.4 for n in names}, {n: 0.8 for n in names}, zero_group, scales)
    rvsm.prox(thr)
    for n in rvsm.names:
        w = params[n].detach()
        if n in scales:
            s = scales[n]
            expect = s * penalties.prox_tl1(w.double() / s, 0.4, 0.8)
            torch.testing.assert_close(rvsm.u[n].double(), expect, rtol=1e-5, atol=1e-6 * s)
            assert 0 < float((rvsm.u[n] == 0).float().mean()) < 1
        else:
            assert torch.equal(rvsm.u[n], w)  # no individual penalty: u = w
