"""Each proximal operator against its closed form and a brute-force minimiser.

The brute force evaluates ``P(x) + 1/(2 mu) ||x - y||^2`` on a fine grid (plus
0 and y) and the test asserts the operator's objective is no worse: a grid
point can only be an upper bound of the true minimum, so a wrong prox that
loses to any grid point fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressor.errors import BadInputError
from compressor.method.penalties import (
    INDIVIDUAL_PENALTIES,
    group_norms,
    group_penalty_value,
    group_shrink,
    group_shrink_factor,
    individual_prox,
    penalty_value,
    prox_l0,
    prox_l1,
    prox_l1l2,
    prox_tl1,
    sparse_group_prox,
    tl1_threshold,
)

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


ELEMENTWISE = ("l1", "l0", "tl1")

ys = st.floats(-5.0, 5.0, allow_nan=False)
mus = st.floats(1e-4, 5.0)
as_ = st.floats(0.05, 5.0)
alphas = st.floats(0.05, 1.0)


def elementwise_penalty(kind: str, x: torch.Tensor, a: float) -> torch.Tensor:
    ax = x.abs()
    if kind == "l1":
        return ax
    if kind == "l0":
        return (x != 0).to(x.dtype)
    return (a + 1.0) * ax / (a + ax)


def objective_1d(kind, x, y, mu, a):
    return elementwise_penalty(kind, x, a) + (x - y) ** 2 / (2.0 * mu)


def brute_force_1d(kind, y, mu, a, n=200_001):
    """Minimum of the 1-D objective over a grid of [-|y|-1, |y|+1] plus {0, y}."""
    r = abs(y) + 1.0
    grid = torch.cat([torch.linspace(-r, r, n, dtype=F64), torch.tensor([0.0, y], dtype=F64)])
    return objective_1d(kind, grid, y, mu, a).min()


def tol(value):
    return 1e-9 * (1.0 + abs(float(value)))


# --------------------------------------------------------------------------- elementwise


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(ELEMENTWISE), y=ys, mu=mus, a=as_)
def test_elementwise_prox_beats_brute_force(kind, y, mu, a):
    yt = torch.tensor([y], dtype=F64)
    x = individual_prox(kind, yt, mu, a=a)
    got = objective_1d(kind, x, yt, mu, a)[0]
    best = brute_force_1d(kind, y, mu, a)
    assert got <= best + tol(best)


@settings(max_examples=40, deadline=None)
@given(y=ys, mu=mus, a=as_)
def test_tl1_beats_brute_force(y, mu, a):
    # TL1 is the operator with a nontrivial closed form: test it on its own budget.
    yt = torch.tensor([y], dtype=F64)
    x = prox_tl1(yt, mu, a)
    got = objective_1d("tl1", x, yt, mu, a)[0]
    best = brute_force_1d("tl1", y, mu, a)
    assert got <= best + tol(best)


@pytest.mark.parametrize(
    "mu, a",
    [
        (0.1, 1.0),  # subcritical: mu <= a^2 / (2 (a+1)) = 0.25
        (0.25, 1.0),  # exactly critical
        (1.0, 1.0),  # supercritical
        (0.01, 0.1),  # subcritical, small a (close to L0)
        (2.0, 0.1),  # supercritical, small a
        (3.0, 5.0),  # subcritical, large a (close to L1)
    ],
)
def test_tl1_both_branches_on_a_sweep(mu, a):
    critical = a * a / (2 * (a + 1))
    t = tl1_threshold(mu, a)
    if mu <= critical:
        assert t == pytest.approx(mu * (a + 1) / a)
    else:
        assert t == pytest.approx(math.sqrt(2 * mu * (a + 1)) - a / 2)
    y = torch.linspace(-5, 5, 401, dtype=F64)
    x = prox_tl1(y, mu, a)
    assert torch.all(x[y.abs() <= t] == 0)
    assert torch.all(x[y.abs() > t + 1e-12] != 0)
    got = objective_1d("tl1", x, y, mu, a)
    for i in range(0, 401, 8):
        best = brute_force_1d("tl1", float(y[i]), mu, a, n=20_001)
        assert got[i] <= best + tol(best)


def test_tl1_threshold_tensor_matches_float():
    mu = torch.tensor([0.05, 0.25, 1.0, 4.0], dtype=F64)
    for a in (0.1, 1.0, 3.0):
        t = tl1_threshold(mu, a)
        expect = [tl1_threshold(float(m), a) for m in mu]
        torch.testing.assert_close(t, torch.tensor(expect, dtype=F64))


def test_closed_forms_on_known_values():
    y = torch.tensor([-3.0, -0.5, 0.0, 0.2, 2.0], dtype=F64)
    torch.testing.assert_close(prox_l1(y, 1.0), torch.tensor([-2.0, 0, 0, 0, 1.0], dtype=F64))
    # sqrt(2 * 0.125) = 0.5: |y| must exceed it strictly.
    torch.testing.assert_close(prox_l0(y, 0.125), torch.tensor([-3.0, 0, 0, 0, 2.0], dtype=F64))


# --------------------------------------------------------------------------- l1 - l2


def l1l2_objective(x, y, mu, alpha):
    """Objective for a batch of candidates x (rows) and one y."""
    pen = x.abs().sum(-1) - alpha * torch.linalg.vector_norm(x, dim=-1)
    return pen + ((x - y) ** 2).sum(-1) / (2.0 * mu)


def brute_force_l1l2(y, mu, alpha):
    """Grid over a box around y, then three zoomed-in grids around the best point."""
    n = y.numel()
    pts = {2: 401, 3: 61}[n]
    center = torch.zeros(n, dtype=F64)
    half = float(y.abs().max()) + 1.0
    best = l1l2_objective(torch.stack([torch.zeros_like(y), y]), y, mu, alpha).min()
    for _ in range(4):
        axes = [torch.linspace(float(c) - half, float(c) + half, pts, dtype=F64) for c in center]
        cand = torch.cartesian_prod(*axes)
        obj = l1l2_objective(cand, y, mu, alpha)
        i = obj.argmin()
        best = torch.minimum(best, obj[i])
        center = cand[i]
        half = 4.0 * half / (pts - 1)
    return best


@settings(max_examples=40, deadline=None)
@given(
    y=st.lists(ys, min_size=2, max_size=3),
    mu=mus,
    alpha=alphas,
)
def test_l1l2_beats_brute_force(y, mu, alpha):
    yt = torch.tensor(y, dtype=F64)
    x = prox_l1l2(yt, mu, alpha)
    got = l1l2_objective(x, yt, mu, alpha)
    best = brute_force_l1l2(yt, mu, alpha)
    assert got <= best + tol(best)


@pytest.mark.parametrize(
    "y, mu, alpha, expect",
    [
        ([3.0, -1.0], 1.0, 0.5, None),  # max|y| > mu: soft threshold then push out
        ([0.8, -0.3], 1.0, 0.5, [0.3, 0.0]),  # one nonzero: 0.8 + (0.5 - 1) * 1
        ([0.4, -0.3], 1.0, 0.5, [0.0, 0.0]),  # max|y| <= (1 - alpha) mu
        # Just past each boundary, where the objective gaps are smallest:
        ([1.02, -0.3], 1.0, 0.5, [0.52, 0.0]),  # z = (0.02, 0), pushed out by 0.5
        ([0.52, 0.1], 1.0, 0.5, [0.02, 0.0]),  # one nonzero just above (1 - alpha) mu
        ([-0.48, 0.1], 1.0, 0.5, [0.0, 0.0]),  # zero just below it
    ],
)
def test_l1l2_three_cases(y, mu, alpha, expect):
    yt = torch.tensor(y, dtype=F64)
    x = prox_l1l2(yt, mu, alpha)
    if expect is None:
        z = torch.tensor([2.0, 0.0], dtype=F64)
        expect = (z * (2.0 + alpha * mu) / 2.0).tolist()
    torch.testing.assert_close(x, torch.tensor(expect, dtype=F64))
    best = brute_force_l1l2(yt, mu, alpha)
    assert l1l2_objective(x, yt, mu, alpha) <= best + tol(best)


def test_l1l2_ties_pick_one_entry():
    y = torch.tensor([0.5, -0.5, 0.1], dtype=F64)
    x = prox_l1l2(y, 1.0, 0.9)
    assert int((x != 0).sum()) == 1
    i = int(x.nonzero()[0, 0])
    assert i in (0, 1)
    assert float(x[i]) == pytest.approx(math.copysign(0.4, float(y[i])))
    # Either tied choice has the same objective, and beats zero.
    other = torch.zeros_like(y)
    other[1 - i] = math.copysign(0.4, float(y[1 - i]))
    assert float(l1l2_objective(x, y, 1.0, 0.9)) == pytest.approx(
        float(l1l2_objective(other, y, 1.0, 0.9))
    )
    assert l1l2_objective(x, y, 1.0, 0.9) < l1l2_objective(torch.zeros_like(y), y, 1.0, 0.9)


def test_l1l2_per_slice_dim_matches_rows():
    y = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    mu = torch.tensor([[0.1], [0.5], [1.5], [4.0]], dtype=F64)
    out = prox_l1l2(y, mu, 0.7, dim=1)
    for r in range(4):
        torch.testing.assert_close(out[r], prox_l1l2(y[r], float(mu[r]), 0.7))


def test_l1l2_whole_tensor_needs_scalar_mu():
    with pytest.raises(BadInputError, match="scalar"):
        prox_l1l2(torch.ones(2, 3), torch.ones(2, 1))
    out = prox_l1l2(torch.ones(2, 3), torch.tensor([0.5]))
    assert out.shape == (2, 3)


# --------------------------------------------------------------------------- groups


def test_group_shrink_closed_form():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=F64)
    out = group_shrink(x, 1.0)
    torch.testing.assert_close(out, torch.tensor([[2.4, 3.2], [0.0, 0.0], [0.0, 0.0]], dtype=F64))
    factor = group_shrink_factor(group_norms(x), 1.0)
    torch.testing.assert_close(factor, torch.tensor([0.8, 0.0, 0.0], dtype=F64))
    # Exactly zero (not NaN) for zero-norm groups, also at mu = 0.
    zero = group_shrink_factor(torch.zeros(3, dtype=F64), 0.0)
    assert torch.equal(zero, torch.zeros(3, dtype=F64))


@settings(max_examples=25, deadline=None)
@given(
    y=st.lists(ys, min_size=2, max_size=4),
    mu=mus,
)
def test_group_shrink_beats_brute_force(y, mu):
    """Brute force over radius (fine grid) and direction (y's and random ones)."""
    yt = torch.tensor(y, dtype=F64)
    x = group_shrink(yt.unsqueeze(0), mu)[0]

    def obj(c):
        return torch.linalg.vector_norm(c, dim=-1) + ((c - yt) ** 2).sum(-1) / (2 * mu)

    gen = torch.Generator().manual_seed(0)
    dirs = torch.randn(256, yt.numel(), dtype=F64, generator=gen)
    if yt.norm() > 0:
        dirs = torch.cat([dirs, yt.unsqueeze(0)])
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    radii = torch.linspace(0, float(yt.norm()) + 1.0, 2001, dtype=F64)
    cand = (radii[:, None, None] * dirs[None]).reshape(-1, yt.numel())
    best = obj(cand).min()
    got = obj(x)
    assert got <= best + tol(best)


def test_group_shrink_per_group_mu_and_dim():
    x = torch.ones(3, 4, dtype=F64)  # every row has norm 2
    out = group_shrink(x, torch.tensor([0.0, 1.0, 3.0], dtype=F64))
    torch.testing.assert_close(out[:, 0], torch.tensor([1.0, 0.5, 0.0], dtype=F64))
    # Groups along dim 1 of a conv-like weight: columns (input channels).
    w = torch.ones(2, 3, 2, 2, dtype=F64)  # each input-channel slice has norm sqrt(8)
    out = group_shrink(w, math.sqrt(8) / 2, dim=1)
    torch.testing.assert_close(out, w / 2)


def test_sparse_group_prox_is_the_composition():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(5, 7, dtype=F64, generator=gen)
    for kind in INDIVIDUAL_PENALTIES:
        got = sparse_group_prox(w, 0.3, 0.8, kind, a=0.5, alpha=0.5)
        expect = group_shrink(individual_prox(kind, w, 0.3, a=0.5, alpha=0.5), 0.8)
        torch.testing.assert_close(got, expect)
    with pytest.raises(BadInputError, match="`a` and `alpha`"):
        sparse_group_prox(w, 0.3, 0.8, "tl1", b=1.0)


def test_sparse_group_l1_is_exact_prox():
    """For l1 the composition minimises |x|_1 + ||x||_2 + 1/(2 mu)||x - y||^2 (one group)."""
    y = torch.tensor([1.5, -0.7, 0.2], dtype=F64)
    mu = 0.3
    x = sparse_group_prox(y.unsqueeze(0), mu, mu, "l1")[0]

    def obj(c):
        return (
            c.abs().sum(-1)
            + torch.linalg.vector_norm(c, dim=-1)
            + ((c - y) ** 2).sum(-1) / (2 * mu)
        )

    axes = [torch.linspace(-2, 2, 161, dtype=F64)] * 3
    best = obj(torch.cartesian_prod(*axes)).min()
    assert obj(x) <= best + 1e-9


# --------------------------------------------------------------------------- edge cases


ALL_OPS = {
    "l1": lambda y, mu: prox_l1(y, mu),
    "l0": lambda y, mu: prox_l0(y, mu),
    "tl1": lambda y, mu: prox_tl1(y, mu, 0.7),
    "l1-l2": lambda y, mu: prox_l1l2(y, mu, 0.6),
    "group": lambda y, mu: group_shrink(y, mu),
}


@pytest.mark.parametrize("name", sorted(ALL_OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mu_zero_is_identity(name, dtype):
    y = torch.randn(6, 5, dtype=dtype, generator=torch.Generator().manual_seed(2))
    y[0, 0] = 0.0
    y[1, 1] = 1e-30
    out = ALL_OPS[name](y, 0.0)
    assert out.dtype == dtype
    assert torch.equal(out, y)
    if name != "l1-l2" and name != "group":
        assert torch.equal(ALL_OPS[name](y, torch.zeros(6, 1, dtype=dtype)), y)


@pytest.mark.parametrize("name", sorted(ALL_OPS))
def test_zero_input_huge_and_tiny_mu(name):
    op = ALL_OPS[name]
    y = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(op(torch.zeros(4, 3, dtype=F64), 0.5), torch.zeros(4, 3, dtype=F64))
    assert torch.all(op(y, 1e6) == 0)
    tiny = op(y, 1e-12)
    torch.testing.assert_close(tiny, y, atol=1e-5, rtol=0)
    assert torch.isfinite(tiny).all()


@pytest.mark.parametrize("name", sorted(ALL_OPS))
def test_odd_symmetry(name):
    op = ALL_OPS[name]
    y = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(4)) * 2
    for mu in (0.05, 0.5, 2.0):
        torch.testing.assert_close(op(-y, mu), -op(y, mu))


@pytest.mark.parametrize("name", sorted(ALL_OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shape_preserved(name, dtype):
    y = torch.randn(2, 3, 4, dtype=dtype)
    out = ALL_OPS[name](y, 0.3)
    assert out.dtype == dtype and out.shape == y.shape
    out = ALL_OPS[name](y, torch.tensor(0.3, dtype=torch.float64))
    assert out.dtype == dtype


@pytest.mark.parametrize("kind", ELEMENTWISE)
def test_float32_matches_float64(kind):
    y = torch.linspace(-5, 5, 1001, dtype=F64)
    for mu in (1e-3, 0.2, 2.0):
        x64 = individual_prox(kind, y, mu, a=0.5)
        x32 = individual_prox(kind, y.float(), mu, a=0.5)
        # Compare away from the thresholds, where float32 may round either way.
        t = {"l1": mu, "l0": math.sqrt(2 * mu), "tl1": tl1_threshold(mu, 0.5)}[kind]
        far = (y.abs() - t).abs() > 1e-4
        torch.testing.assert_close(x32.double()[far], x64[far], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ELEMENTWISE)
def test_per_row_tensor_mu_broadcasts(kind):
    y = torch.randn(3, 8, dtype=F64, generator=torch.Generator().manual_seed(5)) * 2
    mu = torch.tensor([[0.0], [0.3], [2.0]], dtype=F64)
    out = individual_prox(kind, y, mu, a=0.8)
    for r in range(3):
        torch.testing.assert_close(out[r], individual_prox(kind, y[r], float(mu[r]), a=0.8))
    # Per-element mu too.
    mu_el = torch.rand(3, 8, dtype=F64, generator=torch.Generator().manual_seed(6))
    out = individual_prox(kind, y, mu_el, a=0.8)
    flat = [
        individual_prox(kind, y.view(-1)[i : i + 1], float(mu_el.view(-1)[i]), a=0.8)
        for i in range(24)
    ]
    torch.testing.assert_close(out.view(-1), torch.cat(flat))


def test_tensor_a_for_tl1():
    y = torch.linspace(-3, 3, 31, dtype=F64)
    torch.testing.assert_close(
        prox_tl1(y, 0.4, torch.tensor(0.6, dtype=F64)), prox_tl1(y, 0.4, 0.6)
    )
    torch.testing.assert_close(
        prox_tl1(y, torch.tensor(0.4, dtype=F64), 0.6), prox_tl1(y, 0.4, 0.6)
    )


# --------------------------------------------------------------------------- dispatch and values


def test_none_returns_input_unchanged():
    y = torch.randn(3, 3)
    assert individual_prox("none", y, 5.0) is y


def test_unknown_kind_names_allowed_kinds():
    with pytest.raises(ValueError, match="l1, l0, tl1, l1-l2") as info:
        individual_prox("tl2", torch.ones(2), 0.1)
    assert "Did you mean 'tl1'" in str(info.value)
    with pytest.raises(BadInputError):
        penalty_value("lasso", torch.ones(2))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: prox_l1(torch.ones(2), -0.1), "`mu` must be a finite float >= 0"),
        (lambda: prox_tl1(torch.ones(2), 0.1, 0.0), "`a` must be a finite float > 0"),
        (lambda: prox_l1l2(torch.ones(2), 0.1, 1.5), r"`alpha` must be a float in \(0, 1\]"),
        (lambda: prox_l1(torch.ones(2, dtype=torch.long), 0.1), "floating-point"),
    ],
)
def test_bad_parameters_raise(call, match):
    with pytest.raises(BadInputError, match=match):
        call()


def test_penalty_values():
    x = torch.tensor([3.0, -4.0, 0.0], dtype=F64)
    assert float(penalty_value("none", x)) == 0.0
    assert float(penalty_value("l1", x)) == 7.0
    assert float(penalty_value("l0", x)) == 2.0
    assert float(penalty_value("tl1", x, a=1.0)) == pytest.approx(2 * 3 / 4 + 2 * 4 / 5)
    assert float(penalty_value("l1-l2", x, alpha=0.5)) == pytest.approx(7.0 - 2.5)
    assert penalty_value("l1", x.float()).dtype == torch.float32
    norms = torch.tensor([1.0, 2.0], dtype=F64)
    assert float(group_penalty_value(norms, torch.tensor([2.0, 3.0], dtype=F64))) == 8.0
    assert float(group_penalty_value(norms)) == 3.0


@pytest.mark.parametrize("kind", ["l1", "l0", "tl1", "l1-l2"])
def test_prox_value_matches_penalty_value(kind):
    """The objective built from penalty_value is minimised (vs. random perturbations)."""
    gen = torch.Generator().manual_seed(7)
    y = torch.randn(6, dtype=F64, generator=gen) * 2
    mu = 0.4
    x = individual_prox(kind, y, mu, a=0.5, alpha=0.5)

    def obj(c):
        return float(penalty_value(kind, c, a=0.5, alpha=0.5) + ((c - y) ** 2).sum() / (2 * mu))

    base = obj(x)
    for _ in range(200):
        c = x + 0.05 * torch.randn(6, dtype=F64, generator=gen)
        assert base <= obj(c) + 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    y = torch.randn(64, 9, dtype=F64)
    mu = torch.rand(64, 1, dtype=F64)
    for name, op in ALL_OPS.items():
        m = {"l1-l2": 0.3, "group": mu[:, 0]}.get(name, mu)
        m_cuda = m if isinstance(m, float) else m.cuda()
        torch.testing.assert_close(op(y.cuda(), m_cuda).cpu(), op(y, m))


# --------------------------------------------------------------------------- out=, blocks, scale

OUT_OPS = {
    "l1": lambda y, mu, **kw: prox_l1(y, mu, **kw),
    "l0": lambda y, mu, **kw: prox_l0(y, mu, **kw),
    "tl1": lambda y, mu, **kw: prox_tl1(y, mu, 0.7, **kw),
    "l1-l2": lambda y, mu, **kw: prox_l1l2(y, mu, 0.6, **kw),
}


@pytest.mark.parametrize("name", sorted(OUT_OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_out_writes_in_place_and_may_be_the_input(name, dtype):
    op = OUT_OPS[name]
    y = torch.randn(7, 5, dtype=dtype, generator=torch.Generator().manual_seed(8)) * 2
    expect = op(y, 0.4)
    out = torch.full_like(y, 123.0)
    assert op(y, 0.4, out=out) is out
    assert torch.equal(out, expect)
    inplace = y.clone()
    assert op(inplace, 0.4, out=inplace) is inplace
    assert torch.equal(inplace, expect)
    # A non-contiguous input and out (a transposed view) give the same numbers.
    yt, ot = y.t().contiguous().t(), torch.empty(5, 7, dtype=dtype).t()
    assert op(yt, 0.4, out=ot) is ot
    assert torch.equal(ot, expect)


@pytest.mark.parametrize("bad", [torch.empty(7, 4), torch.empty(7, 5, dtype=F64), "x"])
def test_out_must_be_like_the_input(bad):
    with pytest.raises(BadInputError, match="`out` must be a tensor like the input"):
        prox_tl1(torch.ones(7, 5), 0.1, out=bad)


@pytest.mark.parametrize("kind", ELEMENTWISE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_kernels_match_the_tensor_parameter_path(kind, dtype):
    """Number parameters take the in-place blocked kernels; tensor ones the plain expressions."""
    from compressor.method import penalties

    n = 2 * penalties._BLOCK + 123  # two full blocks and a short one
    y = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(9)) * 3
    for mu in (1e-3, 0.2, 0.3, 2.0):  # tl1 at a = 0.7: sub- and supercritical
        fast = individual_prox(kind, y, mu, a=0.7)
        plain = individual_prox(kind, y, torch.tensor(mu, dtype=dtype), a=0.7)
        assert torch.equal(fast == 0, plain == 0)
        torch.testing.assert_close(fast, plain, rtol=0, atol=4 * torch.finfo(dtype).eps * 3)


def test_prox_still_differentiable_without_out():
    y = torch.randn(6, dtype=F64, requires_grad=True)
    for op in OUT_OPS.values():
        op(y, 0.3).sum().backward()
    assert torch.isfinite(y.grad).all()


@pytest.mark.parametrize("kind", ["l1", "l0", "tl1", "l1-l2"])
@pytest.mark.parametrize("scale", [0.01, 0.37, 1.0, 4.0])
def test_scale_is_the_prox_of_the_penalty_on_x_over_s(kind, scale):
    y = torch.randn(4, 9, dtype=F64, generator=torch.Generator().manual_seed(10)) * scale * 2
    for mu in (0.05, 0.4, 1.5):
        got = individual_prox(kind, y, mu, a=0.8, alpha=0.6, scale=scale)
        expect = scale * individual_prox(kind, y / scale, mu, a=0.8, alpha=0.6)
        torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12 * scale)
        out = torch.empty_like(y)
        individual_prox(kind, y, mu, a=0.8, alpha=0.6, scale=scale, out=out)
        assert torch.equal(out, got)


def test_mu_zero_and_none_copy_into_out():
    y = torch.randn(3, 4)
    for kind in INDIVIDUAL_PENALTIES:
        out = torch.zeros_like(y)
        assert individual_prox(kind, y, 0.0, scale=2.0, out=out) is out
        assert torch.equal(out, y)
    assert individual_prox("tl1", y, 0.0) is not y
