"""Proximal (thresholding) operators of the sparsity penalties.

Pure tensor functions: no model knowledge, any shape, float32 or float64, CPU
or CUDA, vectorised, and free of host synchronisation (no ``.item()``) so the
RVSM step can call them on every parameter every step.

Every operator solves, for a penalty ``P`` and a strength ``mu >= 0``::

    prox_{P, mu}(y) = argmin_x  P(x) + 1/(2 mu) ||x - y||^2

``mu`` is a Python number or a tensor broadcastable to ``y`` (one threshold
per element, or per row with shape ``(rows, 1, ...)``), except where a
docstring says it must be a scalar. ``mu = 0`` is the identity for every
operator. Python-number parameters are validated; tensor parameters are not
(checking them would synchronise with the device).

In RVSM (see DESIGN.md) ``mu = lambda / beta``.
"""

from __future__ import annotations

import difflib
import math
from numbers import Real

import torch

from compressor.errors import BadInputError

__all__ = [
    "INDIVIDUAL_PENALTIES",
    "group_norms",
    "group_penalty_value",
    "group_shrink",
    "group_shrink_factor",
    "individual_prox",
    "penalty_value",
    "prox_l0",
    "prox_l1",
    "prox_l1l2",
    "prox_tl1",
    "sparse_group_prox",
    "tl1_threshold",
]

INDIVIDUAL_PENALTIES = ("none", "l1", "l0", "tl1", "l1-l2")

Scalar = float | torch.Tensor


# --------------------------------------------------------------------------- helpers


def _param(value: Scalar, y: torch.Tensor, name: str, *, low: float, low_open: bool = False):
    """A Python number stays a number (checked); a tensor is moved to y's dtype and device."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype=y.dtype, device=y.device)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise BadInputError(
            f"`{name}` must be a float or a tensor. Got {type(value).__name__} instead."
        )
    value = float(value)
    bad = (value <= low) if low_open else (value < low)
    if bad or not math.isfinite(value):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise BadInputError(f"`{name}` must be a finite float {bound}. Got {value!r} instead.")
    return value


def _check_float(y: torch.Tensor) -> None:
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        got = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise BadInputError(f"the proximal operators take a floating-point tensor. Got {got}.")


def _check_kind(kind: str) -> None:
    if kind not in INDIVIDUAL_PENALTIES:
        close = difflib.get_close_matches(str(kind), INDIVIDUAL_PENALTIES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BadInputError(
            f"the individual penalty must be one of {', '.join(INDIVIDUAL_PENALTIES)}. "
            f"Got {kind!r} instead.{hint}"
        )


# --------------------------------------------------------------------------- elementwise


def prox_l1(y: torch.Tensor, mu: Scalar) -> torch.Tensor:
    """Soft thresholding, the prox of the L1 norm.

    Objective: ``argmin_x |x| + 1/(2 mu) (x - y)^2`` (elementwise).
    Closed form: ``sign(y) * max(|y| - mu, 0)``.
    Source: Donoho, "De-noising by soft-thresholding", IEEE Trans. Inf. Theory 1995.
    """
    _check_float(y)
    mu = _param(mu, y, "mu", low=0.0)
    return torch.sign(y) * torch.clamp_min(y.abs() - mu, 0.0)


def prox_l0(y: torch.Tensor, mu: Scalar) -> torch.Tensor:
    """Hard thresholding, the prox of the L0 "norm" (number of nonzeros).

    Objective: ``argmin_x 1{x != 0} + 1/(2 mu) (x - y)^2`` (elementwise).
    Closed form: ``y * 1{|y| > sqrt(2 mu)}`` (at ``|y| = sqrt(2 mu)`` both 0 and
    ``y`` are minimisers; 0 is returned).
    Source: Blumensath & Davies, "Iterative thresholding for sparse
    approximations", J. Fourier Anal. Appl. 2008.
    """
    _check_float(y)
    mu = _param(mu, y, "mu", low=0.0)
    thr = math.sqrt(2.0 * mu) if isinstance(mu, float) else torch.sqrt(2.0 * mu)
    return torch.where(y.abs() > thr, y, torch.zeros_like(y))


def tl1_threshold(mu: Scalar, a: Scalar):
    """The TL1 threshold ``t``: ``prox_tl1(y) = 0`` exactly when ``|y| <= t``.

    ``t = mu (a+1)/a`` if ``mu <= a^2 / (2(a+1))`` (subcritical), else
    ``t = sqrt(2 mu (a+1)) - a/2`` (supercritical). Zhang & Xin 2018, Theorem 3.1.
    Works on numbers (returns a float) and on tensors (returns a tensor).
    """
    if isinstance(mu, torch.Tensor) or isinstance(a, torch.Tensor):
        # Every expression below is a tensor: no host-to-device scalar copies.
        sub = mu * (a + 1.0) / a
        sup = torch.sqrt(2.0 * mu * (a + 1.0)) - a / 2.0
        return torch.where(mu <= a * a / (2.0 * (a + 1.0)), sub, sup)
    if mu <= a * a / (2.0 * (a + 1.0)):
        return mu * (a + 1.0) / a
    return math.sqrt(2.0 * mu * (a + 1.0)) - a / 2.0


def prox_tl1(y: torch.Tensor, mu: Scalar, a: Scalar = 1.0) -> torch.Tensor:
    """Prox of the transformed L1 penalty ``P_a(x) = (a+1)|x| / (a+|x|)``, ``a > 0``.

    Objective: ``argmin_x P_a(x) + 1/(2 mu) (x - y)^2`` (elementwise).
    Closed form: 0 if ``|y| <= t`` (see :func:`tl1_threshold`), else
    ``sign(y) * (2/3 (a+|y|) cos(phi/3) - 2a/3 + |y|/3)`` with
    ``phi = arccos(1 - 27 mu a (a+1) / (2 (a+|y|)^3))``.
    Source: Zhang & Xin, "Minimization of transformed L1 penalty: closed form
    representation and iterative thresholding algorithms", Math. Program. 2018.

    Evaluated in an algebraically equal, cancellation-free form: with
    ``e = 27 mu a (a+1) / (2 (a+|y|)^3)`` (clamped to [0, 2], i.e. the arccos
    argument clamped to [-1, 1]), ``phi = 2 asin(sqrt(e/2))`` and the value is
    ``|y| - 4/3 (a+|y|) sin^2(phi/6)``; at ``mu = 0`` this is exactly ``y``.
    Small ``a`` approaches L0, large ``a`` approaches L1.
    """
    _check_float(y)
    mu = _param(mu, y, "mu", low=0.0)
    a = _param(a, y, "a", low=0.0, low_open=True)
    t = tl1_threshold(mu, a)
    ay = y.abs()
    s = a + ay
    e = torch.clamp(27.0 * mu * a * (a + 1.0) / (2.0 * s * s * s), 0.0, 2.0)
    phi = 2.0 * torch.asin(torch.sqrt(e / 2.0))
    mag = ay - (4.0 / 3.0) * s * torch.sin(phi / 6.0) ** 2
    return torch.where(ay > t, torch.sign(y) * mag, torch.zeros_like(y))


# --------------------------------------------------------------------------- whole-tensor


def prox_l1l2(
    y: torch.Tensor, mu: Scalar, alpha: Scalar = 1.0, *, dim: int | None = None
) -> torch.Tensor:
    """Prox of ``P(x) = ||x||_1 - alpha ||x||_2`` (L1 minus L2), ``0 < alpha <= 1``.

    Objective: ``argmin_x ||x||_1 - alpha ||x||_2 + 1/(2 mu) ||x - y||_2^2`` over
    the whole tensor (``dim=None``), or independently over each slice along ``dim``.
    Closed form (Lou & Yan, "Fast L1-L2 minimization via a proximal operator",
    J. Sci. Comput. 2018, Lemma 1):

    - ``max|y| > mu``: ``z = soft(y, mu)``, ``x = z (||z||_2 + alpha mu) / ||z||_2``;
    - ``(1 - alpha) mu < max|y| <= mu``: one nonzero, at the largest ``|y_i|``
      (ties: the first in flattened order), ``x_i = sign(y_i)(|y_i| + (alpha - 1) mu)``;
    - otherwise ``x = 0``.

    With ``dim=None``, ``mu`` and ``alpha`` must be scalars (a number or a
    one-element tensor); with ``dim`` they may broadcast against the reduced
    shape (``keepdim=True``).
    """
    _check_float(y)
    mu = _param(mu, y, "mu", low=0.0)
    alpha = _param(alpha, y, "alpha", low=0.0, low_open=True)
    if isinstance(alpha, float) and alpha > 1.0:
        raise BadInputError(f"`alpha` must be a float in (0, 1]. Got {alpha!r} instead.")
    if dim is None:
        for name, v in (("mu", mu), ("alpha", alpha)):
            if isinstance(v, torch.Tensor) and v.numel() != 1:
                raise BadInputError(
                    f"`{name}` of prox_l1l2 over a whole tensor must be a scalar. "
                    f"Got a tensor of shape {tuple(v.shape)}; pass `dim` for per-slice values."
                )
            if isinstance(v, torch.Tensor):
                v = v.reshape(())
            if name == "mu":
                mu = v
            else:
                alpha = v
    if y.numel() == 0:
        return y.clone()
    work = y.reshape(-1) if dim is None else y
    d = 0 if dim is None else dim
    ay = work.abs()
    ymax = ay.amax(dim=d, keepdim=True)
    # Case 1: soft threshold, then push the survivors out by alpha*mu along z.
    z = torch.sign(work) * torch.clamp_min(ay - mu, 0.0)
    zn = torch.linalg.vector_norm(z, dim=d, keepdim=True)
    x1 = z + alpha * mu * z / torch.where(zn > 0, zn, torch.ones_like(zn))
    # Case 2: keep only the largest entry.
    idx = ay.argmax(dim=d, keepdim=True)
    top = torch.zeros_like(work, dtype=torch.bool).scatter(d, idx, True)
    x2 = torch.where(top, torch.sign(work) * (ay + (alpha - 1.0) * mu), torch.zeros_like(work))
    out = torch.where(
        ymax > mu, x1, torch.where(ymax > (1.0 - alpha) * mu, x2, torch.zeros_like(work))
    )
    return out.reshape(y.shape)


# --------------------------------------------------------------------------- groups


def group_norms(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """L2 norm of each slice of ``x`` along ``dim`` (over all the other dims); shape ``(x.shape[dim],)``."""
    _check_float(x)
    moved = x.movedim(dim, 0)
    return torch.linalg.vector_norm(moved.reshape(moved.shape[0], -1), dim=1)


def group_shrink_factor(norms: torch.Tensor, mu: Scalar) -> torch.Tensor:
    """Multiplicative factor of the group soft threshold (block soft thresholding).

    Objective, per group ``g``: ``argmin_x ||x_g||_2 + 1/(2 mu_g) ||x_g - y_g||_2^2``.
    Closed form: ``x_g = y_g * max(0, 1 - mu_g / ||y_g||_2)``; this returns the
    factor ``max(0, 1 - mu_g / norm_g)``, exactly 0 where ``norm_g == 0`` (no NaN).
    Weighted groups (``sqrt(|g|) ||x_g||``) use ``mu_g = sqrt(|g|) * mu``.
    Source: Yuan & Lin, "Model selection and estimation in regression with
    grouped variables", JRSS-B 2006; Simon et al., "A sparse-group lasso", JCGS 2013.
    """
    _check_float(norms)
    mu = _param(mu, norms, "mu", low=0.0)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    factor = torch.clamp_min(1.0 - mu / safe, 0.0)
    return torch.where(norms > 0, factor, torch.zeros_like(factor))


def group_shrink(x: torch.Tensor, mu: Scalar, dim: int = 0) -> torch.Tensor:
    """Group soft threshold of ``x`` whose slices along ``dim`` are the groups.

    Objective: ``argmin_v sum_g ||v_g||_2 + 1/(2 mu_g) ||v_g - x_g||_2^2`` where
    ``g`` runs over ``x.select(dim, g)``. Closed form: ``x_g * max(0, 1 - mu_g / ||x_g||_2)``
    (see :func:`group_shrink_factor`). ``mu`` is a number or a tensor broadcastable
    to ``(x.shape[dim],)``, one strength per group.
    Source: Yuan & Lin, "Model selection and estimation in regression with
    grouped variables", JRSS-B 2006.
    """
    factor = group_shrink_factor(group_norms(x, dim), mu)
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    return x * factor.reshape(shape)


# --------------------------------------------------------------------------- dispatch


def individual_prox(
    kind: str, y: torch.Tensor, mu: Scalar, *, a: Scalar = 1.0, alpha: Scalar = 1.0
) -> torch.Tensor:
    """Prox of the elementwise penalty ``kind`` (one of :data:`INDIVIDUAL_PENALTIES`).

    Objective: ``argmin_x P_kind(x) + 1/(2 mu) ||x - y||^2``; see :func:`prox_l1`,
    :func:`prox_l0`, :func:`prox_tl1` (uses ``a``) and :func:`prox_l1l2` (uses
    ``alpha``, whole tensor, scalar ``mu``). ``"none"`` returns ``y`` itself.
    """
    _check_kind(kind)
    if kind == "none":
        return y
    if kind == "l1":
        return prox_l1(y, mu)
    if kind == "l0":
        return prox_l0(y, mu)
    if kind == "tl1":
        return prox_tl1(y, mu, a)
    return prox_l1l2(y, mu, alpha)


def penalty_value(
    kind: str, x: torch.Tensor, *, a: Scalar = 1.0, alpha: Scalar = 1.0
) -> torch.Tensor:
    """``P_kind(x)`` summed over ``x``, as a 0-dim tensor of ``x``'s dtype.

    ``none``: 0; ``l1``: ``sum |x|``; ``l0``: number of nonzeros; ``tl1``:
    ``sum (a+1)|x| / (a+|x|)``; ``l1-l2``: ``||x||_1 - alpha ||x||_2`` (whole tensor).
    """
    _check_kind(kind)
    _check_float(x)
    ax = x.abs()
    if kind == "none":
        return x.new_zeros(())
    if kind == "l1":
        return ax.sum()
    if kind == "l0":
        return (x != 0).sum().to(x.dtype)
    if kind == "tl1":
        a = _param(a, x, "a", low=0.0, low_open=True)
        return ((a + 1.0) * ax / (a + ax)).sum()
    alpha = _param(alpha, x, "alpha", low=0.0, low_open=True)
    return ax.sum() - alpha * torch.linalg.vector_norm(x)


def group_penalty_value(norms: torch.Tensor, weights: Scalar = 1.0) -> torch.Tensor:
    """Group (L2,1) penalty ``sum_g w_g ||x_g||_2`` from the group norms.

    ``weights`` is a number or a tensor broadcastable to ``norms`` (DESIGN.md
    uses ``w_g = sqrt(|g|)``).
    """
    _check_float(norms)
    weights = _param(weights, norms, "weights", low=0.0)
    return (weights * norms).sum()


def sparse_group_prox(
    w_rows: torch.Tensor,
    mu_individual: Scalar,
    mu_group: Scalar,
    kind: str,
    **params: Scalar,
) -> torch.Tensor:
    """Thresholding step of the sparse group penalty on a tensor whose rows (dim 0) are groups.

    Objective (for ``kind="l1"`` this composition is its exact minimiser):
    ``argmin_x mu_individual P_kind(x) + sum_g mu_group_g ||x_g||_2 + 1/2 ||x - y||^2``,
    computed as ``group_shrink(individual_prox(kind, y, mu_individual), mu_group)``
    (Simon et al., "A sparse-group lasso", JCGS 2013; for the nonconvex kinds
    this is the composed step of Bui et al., "Structured sparsity of
    convolutional neural networks via nonconvex sparse group regularization",
    Front. Appl. Math. Stat. 2021). ``params`` are ``a`` (tl1) and ``alpha`` (l1-l2).
    """
    unknown = set(params) - {"a", "alpha"}
    if unknown:
        raise BadInputError(
            f"sparse_group_prox takes the penalty parameters `a` and `alpha`. "
            f"Got {sorted(unknown)} instead."
        )
    return group_shrink(individual_prox(kind, w_rows, mu_individual, **params), mu_group, dim=0)
