"""The method object: the budget sets the group prox's thresholds, and the prox alone zeroes."""

from __future__ import annotations

import math
from types import SimpleNamespace as NS

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.groups import build_groups
from compressor.method.budget import BudgetController, Target
from compressor.method.group_terms import group_term
from compressor.method.splitting import RVSM
from compressor.method.strength import (
    Lambdas,
    group_weights,
    pull_budget,
    reference_norms,
    resolve_group_weighting,
)
from compressor.method.training import SparseTraining
from compressor.models import resnet20
from tests.test_budget import trained_like_resnet20


def _penalty(*, ind_kind="tl1", ind_strength=0.1, ind_lam=None, grp_strength=1.0, grp_lam=None):
    return NS(
        individual=NS(kind=ind_kind, strength=ind_strength, lam=ind_lam, a=1.0),
        group=NS(strength=grp_strength, lam=grp_lam),
    )


def _method(targets=(), *, term="tl1", steps=30, penalty=None, weighting="macs", beta=1.0):
    torch.manual_seed(0)
    model = trained_like_resnet20()
    groups = build_groups(model, torch.randn(1, 1, 16, 16))
    rvsm = RVSM(model, groups, individual_kind="tl1", beta=beta, beta_growth=1.25)
    weights = group_weights(groups, weighting)
    lambdas = Lambdas.from_recipe(
        penalty or _penalty(),
        model=model,
        groups=groups,
        individual_names=rvsm.individual_names,
        weights=weights,
        budget=20.0,
    )
    scale = weights * reference_norms(groups, dict(model.named_parameters()))
    budget = (
        BudgetController(list(targets), groups, scale, total_steps=steps, reach_fraction=0.5)
        if targets
        else None
    )
    method = SparseTraining(
        model, groups, rvsm, lambdas, group_term(term), scale=scale, budget=budget
    )
    method.prox(0)
    return model, groups, method


def _train(model, method, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs, ys = torch.randn(32, 1, 16, 16, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        loss = F.cross_entropy(model(xs), ys)
        opt.zero_grad()
        loss.backward()
        method.after_backward()
        opt.step()
        method.after_step()
        yield


@pytest.mark.parametrize("term", ["l1", "l0", "tl1"])
def test_budget_zero_set_is_the_prox_zero_set_and_w_differs_from_u(term):
    targets = [Target("macs", 2.0, 2.0)]
    model, groups, method = _method(targets, term=term)
    gaps = []
    for _ in _train(model, method, 30):
        budget = method.budget
        prox_zero = method.zero_masks()  # units that are exactly zero in u
        assert all(torch.equal(p, b) for p, b in zip(prox_zero, budget.zero, strict=True))
        if not budget.frozen:
            gaps.append(method.gap())
    assert max(gaps) > 1e-2  # the splitting is doing something: w is not u
    assert method.budget.frozen and method.budget.reached["macs"] >= 2.0


def test_every_target_is_met_at_once():
    targets = [Target("macs", 1.6, 1.6), Target("params", 2.5, 2.5)]
    model, groups, method = _method(targets)
    for _ in _train(model, method, 30):
        pass
    reached = method.budget.reached
    assert reached["macs"] >= 1.6 and reached["params"] >= 2.5
    pruned_macs, pruned_params = groups.estimate_cost(method.zero_masks())
    assert groups.total_params / pruned_params >= 2.5


def test_frozen_zero_set_is_held_in_w_as_the_beta_infinity_limit():
    model, groups, method = _method([Target("macs", 2.0, 2.0)])
    for _ in _train(model, method, 30):
        pass
    params = dict(model.named_parameters())
    w_zero = groups.zero_masks(params)
    assert all(torch.equal(w, z) for w, z in zip(w_zero, method.budget.zero, strict=True))


def test_state_dict_resumes_the_same_run():
    targets = [Target("macs", 2.0, 2.0)]
    model, _, method = _method(targets)
    for _ in _train(model, method, 10):
        pass
    state = method.state_dict()
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    model2, _, method2 = _method(targets)
    model2.load_state_dict(model_state)
    method2.load_state_dict(state)
    assert method2.budget.tau == method.budget.tau
    assert all(torch.equal(a, b) for a, b in zip(method2.zero_masks(), method.zero_masks(), strict=True))


def test_unreachable_targets_are_named():
    _, groups, method = _method([Target("macs", 1e4, 1e4), Target("params", 1.5, 1.5)])
    assert [t.kind for t in method.budget.unreachable] == ["macs"]


# ------------------------------------------------------------ the papers' lambda


def test_lambda_keys_give_mu_lambda_over_beta_with_sqrt_group_size_once():
    lam = 0.01
    for beta in (1.0, 4.0):
        model, groups, method = _method(
            penalty=_penalty(ind_lam=0.002, grp_lam=lam), weighting="size", beta=beta
        )
        sizes = groups.weights_removed_per_unit()
        mu = method.lambdas.group_mu(method.rvsm.beta)
        expected = torch.tensor([lam * math.sqrt(n) / beta for n in sizes], dtype=torch.float64)
        assert torch.allclose(mu, expected)
        ind = method.lambdas.individual_thresholds(method.rvsm.beta)
        assert ind.mu and all(v == pytest.approx(0.002 / beta) for v in ind.mu.values())


def test_group_size_counts_the_weights_one_unit_removes():
    model = resnet20(in_channels=1)
    groups = build_groups(model, torch.randn(1, 1, 16, 16))
    # The group rooted at the first block's first conv: 16 rows of 16x3x3 in conv1, and its
    # 16 input columns of 16x3x3 in conv2, plus the conv1 bias if any.
    layer = "layer1.0.conv1"
    g = next(i for i, g in enumerate(groups) if g.root == layer)
    conv1, conv2 = dict(model.named_modules())[layer], dict(model.named_modules())["layer1.0.conv2"]
    per_row = conv1.weight[0].numel() + (1 if conv1.bias is not None else 0)
    per_column = conv2.weight[:, 0].numel()
    assert groups.weights_removed_per_unit()[g] == pytest.approx(per_row + per_column)


def test_group_size_leaves_out_a_consumers_bias():
    """A unit's input column in a consumer takes none of that consumer's bias with it."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=True), nn.ReLU(), nn.Conv2d(8, 6, 3, bias=True), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10),
    )  # fmt: skip
    groups = build_groups(model, torch.randn(1, 3, 12, 12))
    sizes = {g.root: n for g, n in zip(groups, groups.weights_removed_per_unit(), strict=True)}
    assert sizes["0"] == pytest.approx(3 * 3 * 3 + 1 + 6 * 3 * 3)  # conv0 row + bias, conv2 column
    assert sizes["2"] == pytest.approx(8 * 3 * 3 + 1 + 10)  # conv2 row + bias, linear column


def test_strength_keys_keep_lambda_fixed_while_beta_grows():
    _, _, method = _method(penalty=_penalty(grp_strength=1.0))
    lambdas = method.lambdas
    mu1, mu2 = lambdas.group_mu(1.0), lambdas.group_mu(2.0)
    assert torch.allclose(mu2 * 2.0, mu1)  # mu = lambda / beta: the threshold falls as 1/beta


def test_strength_is_scale_free_lambda_is_not():
    _, groups, m1 = _method(penalty=_penalty(grp_strength=1.0))
    model = m1.model
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    scaled = Lambdas.from_recipe(
        _penalty(grp_strength=1.0),
        model=model,
        groups=groups,
        individual_names=m1.rvsm.individual_names,
        weights=group_weights(groups, "macs"),
        budget=20.0,
    )
    assert torch.allclose(scaled.group, 3.0 * m1.lambdas.group)


def test_pull_budget_is_the_sum_of_learning_rates_over_one_minus_momentum():
    b = pull_budget(lr=0.01, momentum=0.9, schedule="constant", total_steps=100)
    assert b == pytest.approx(0.01 * 100 / 0.1)


def test_auto_weighting():
    assert resolve_group_weighting("auto", macs_target=False, raw_lambda=True) == "size"
    assert resolve_group_weighting("auto", macs_target=True, raw_lambda=False) == "macs"
    assert resolve_group_weighting("auto", macs_target=False, raw_lambda=False) == "uniform"
    assert resolve_group_weighting("uniform", macs_target=True, raw_lambda=True) == "uniform"
