"""The group terms' prox against brute force, their thresholds, and the registry."""

from __future__ import annotations

import math

import pytest
import torch

from compressor.errors import BadInputError
from compressor.method import group_terms
from compressor.method.group_terms import GROUP_TERMS, GroupTerm, group_term, register_group_term

TERMS = [("l1", {}), ("l0", {}), ("tl1", {"a": 1.0}), ("tl1", {"a": 0.3}), ("tl1", {"a": 5.0})]


def brute_force_prox(term: GroupTerm, y: torch.Tensor, mu: float) -> torch.Tensor:
    """argmin_x phi(||x||) + 1/(2 mu) ||x - y||^2 over a fine 2-D grid around y and 0."""
    span = float(y.abs().max()) * 1.5 + 0.1
    axis = torch.linspace(-span, span, 1201, dtype=torch.float64)
    xs = torch.cartesian_prod(axis, axis)
    xs = torch.cat([xs, torch.zeros(1, 2, dtype=torch.float64), y[None]])  # 0 and y exactly
    objective = term.value(xs.norm(dim=1)) + (xs - y).square().sum(dim=1) / (2 * mu)
    return xs[objective.argmin()]


@pytest.mark.parametrize("kind,params", TERMS)
@pytest.mark.parametrize("seed", range(6))
def test_prox_matches_brute_force(kind, params, seed):
    term = group_term(kind, **params)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(2, generator=gen, dtype=torch.float64) * 1.5
    mu = float(torch.rand(1, generator=gen)) * 1.5 + 0.05
    prox = y * term.factor(y.norm()[None], mu)[0]
    best = brute_force_prox(term, y, mu)

    def objective(x):
        return float(term.value(x.norm()[None])[0] + (x - y).square().sum() / (2 * mu))

    # The closed form is at least as good as the best grid point, and close to it.
    assert objective(prox) <= objective(best) + 1e-9
    assert torch.allclose(prox, best, atol=2 * 1.5 * span_step(y))


def span_step(y: torch.Tensor) -> float:
    return (float(y.abs().max()) * 1.5 + 0.1) * 2 / 1200


@pytest.mark.parametrize("kind,params", TERMS)
def test_zeroes_exactly_the_groups_at_or_below_the_threshold(kind, params):
    term = group_term(kind, **params)
    for threshold in (0.05, 0.4, 1.0, 3.0):
        mu = term.mu_for_threshold(threshold)
        assert term.threshold(mu) == pytest.approx(threshold, rel=1e-12)
        norms = torch.tensor(
            [0.0, threshold * 0.5, threshold * (1 - 1e-9), threshold * (1 + 1e-6), threshold * 2]
        )
        zero = term.factor(norms, mu) == 0
        assert zero.tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("kind,params", TERMS)
def test_factor_takes_a_threshold_per_group(kind, params):
    term = group_term(kind, **params)
    norms = torch.tensor([1.0, 1.0, 1.0])
    mus = torch.tensor([term.mu_for_threshold(t) for t in (0.5, 1.0, 2.0)])
    zero = (term.factor(norms, mus) == 0).tolist()
    assert zero == [False, True, True]


def test_group_lasso_is_block_soft_thresholding():
    norms = torch.tensor([3.0, 0.5])
    assert torch.allclose(group_term("l1").factor(norms, 1.0), torch.tensor([2 / 3, 0.0]))


def test_tl1_shrinks_large_groups_less_than_the_group_lasso():
    norms = torch.tensor([2.0, 5.0, 20.0])
    l1 = group_term("l1").factor(norms, 0.5)
    tl1 = group_term("tl1", a=1.0)
    same_threshold = tl1.factor(norms, tl1.mu_for_threshold(0.5))
    assert bool((same_threshold > l1).all())
    assert float(same_threshold[-1]) > 0.99


def test_unknown_kind_names_the_choices():
    with pytest.raises(BadInputError, match="l0, l1, tl1.*Did you mean 'tl1'"):
        group_term("tl2")


def test_a_new_group_term_is_one_registered_class():
    @register_group_term("test-scad-like")
    class Capped(GroupTerm):
        """phi(r) = min(r, 1): soft threshold below 1, identity above."""

        def factor(self, norms, mu):
            radius = torch.where(norms > 1 + mu, norms, torch.clamp_min(norms - mu, 0))
            return self._ratio(radius, norms)

        def threshold(self, mu):
            return float(mu)

        def mu_for_threshold(self, threshold):
            return float(threshold)

        def value(self, norms):
            return norms.clamp_max(1.0)

    try:
        term = group_term("test-scad-like")
        assert term.factor(torch.tensor([0.3, 5.0]), 0.5).tolist() == [0.0, 1.0]
        with pytest.raises(ValueError, match="already registered"):
            register_group_term("test-scad-like")(Capped)
    finally:
        GROUP_TERMS.pop("test-scad-like")


def test_registry_holds_the_documented_kinds():
    assert {"l1", "l0", "tl1"} <= set(group_terms.GROUP_TERMS)
    assert math.isclose(group_term("l0").threshold(group_term("l0").mu_for_threshold(0.7)), 0.7)
