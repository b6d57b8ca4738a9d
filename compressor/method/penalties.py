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

The elementwise operators take ``out=`` (a tensor of ``y``'s shape, dtype and
device, which may be ``y`` itself) and then write the result there and return
it; the RVSM step writes straight into ``u``. With Python-number parameters
they run as a few in-place passes over blocks of ``_BLOCK`` elements on the
CPU (the block and its scratch buffers stay in the L2 cache), or over the
whole tensor on a GPU, instead of one full-size temporary per arithmetic step.

In RVSM (docs/math.md) ``mu = lambda / beta``.
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

# Elements per block of the CPU kernels: the block of y and out plus three scratch
# buffers (5 x 256 KiB in float32) fit a 2 MiB L2 cache; larger and smaller blocks
# were slower on resnet18's weights (benchmarks/rvsm_overhead.py, 1 thread).
_BLOCK = 1 << 16


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


def _check_out(out: torch.Tensor | None, y: torch.Tensor) -> None:
    """``out``, if given, must be like ``y``: same shape, dtype and device."""
    if out is None:
        return
    if (
        not isinstance(out, torch.Tensor)
        or out.shape != y.shape
        or out.dtype != y.dtype
        or out.device != y.device
    ):
        got = (
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
            if isinstance(out, torch.Tensor)
            else type(out).__name__
        )
        raise BadInputError(
            f"`out` must be a tensor like the input ({tuple(y.shape)} {y.dtype} on {y.device}). "
            f"Got {got}."
        )


def _new(out: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """Where the fast kernels write: ``out``, or a new contiguous tensor like ``y``."""
    return torch.empty_like(y, memory_format=torch.contiguous_format) if out is None else out


def _store(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return result if out is None else out.copy_(result)


def _blockwise(y: torch.Tensor, out: torch.Tensor, kernel, n_scratch: int) -> torch.Tensor:
    """Run ``kernel(y_block, out_block, *scratch_blocks)`` over flat blocks of ``y`` and ``out``.

    The kernel must read its ``y`` block before it writes its ``out`` block (so
    ``out`` may be ``y``). CPU: blocks of ``_BLOCK`` elements; other devices:
    one block (one launch per op).
    """
    n = y.numel()
    flat_y = y.reshape(-1)
    dense = out.is_contiguous()
    flat_out = out.view(-1) if dense else torch.empty(n, dtype=out.dtype, device=out.device)
    step = _BLOCK if y.device.type == "cpu" else max(n, 1)
    size = min(n, step)
    scratch = [torch.empty(size, dtype=y.dtype, device=y.device) for _ in range(n_scratch)]
    for yb, ob in zip(flat_y.split(step), flat_out.split(step), strict=True):
        if len(yb) < size:  # the last, shorter block
            scratch = [b[: len(yb)] for b in scratch]
        kernel(yb, ob, *scratch)
    if not dense:
        out.copy_(flat_out.view(out.shape))
    return out


def _fast(y: torch.Tensor, *params: Scalar) -> bool:
    """The in-place kernels apply: number parameters, and no autograd graph to record."""
    return all(isinstance(p, float) for p in params) and not (
        y.requires_grad and torch.is_grad_enabled()
    )


def _identity(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    _check_out(out, y)
    if out is None:
        return y.clone()
    return out if out is y else out.copy_(y)


# --------------------------------------------------------------------------- elementwise


def prox_l1(y: torch.Tensor, mu: Scalar, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Soft thresholding, the prox of the L1 norm.

    Objective: ``argmin_x |x| + 1/(2 mu) (x - y)^2`` (elementwise).
    Closed form: ``sign(y) * max(|y| - mu, 0)``.
    Source: Donoho, "De-noising by soft-thresholding", IEEE Trans. Inf. Theory 1995.
    """
    _check_float(y)
    mu = _param(mu, y, "mu", low=0.0)
    _check_out(out, y)
    if _fast(y, mu):
        # One pass: y - mu above mu, y + mu below -mu, 0 between (the same numbers).
        return torch._C._nn.softshrink(y, mu, out=_new(out, y))
    return _store(torch.sign(y) * torch.clamp_min(y.abs() - mu, 0.0), out)


def prox_l0(y: torch.Tensor, mu: Scalar, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Hard thresholding, the prox of the L0 "norm" (number of nonzeros).

    Objective: ``argmin_x 1{x != 0} + 1/(2 mu) (x - y)^2`` (elementwise).
    Closed form: ``y * 1{|y| > sqrt(2 mu)}`` (at ``|y| = sqrt(2 mu)`` both 0 and
    ``y`` are minimisers; 0 is returned).
    Source: Blumensath & Davies, "Iterative thresholding for sparse
    approximations", J. Fourier Anal. Appl. 2008.
    """
    _check_float(y)
    mu = _param(mu, y, "mu", low=0.0)
    _check_out(out, y)
    thr = math.sqrt(2.0 * mu) if isinstance(mu, float) else torch.sqrt(2.0 * mu)
    if _fast(y, mu):
        return torch.hardshrink(y, thr, out=_new(out, y))  # one pass
    return _store(torch.where(y.abs() > thr, y, torch.zeros_like(y)), out)


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


def tl1_scaled_params(mu: Scalar, a: Scalar, scale: Scalar):
    """``(mu', a')`` with ``s prox_{P_a, mu}(y / s) = prox_{P_a', mu'}(y)``.

    ``P_a(x / s) = (a+1) / (a s + 1) * P_{a s}(x)``, so ``a' = a s`` and
    ``mu' = mu s^2 (a+1) / (a s + 1)``.
    """
    return mu * scale * scale * (a + 1.0) / (a * scale + 1.0), a * scale


def prox_tl1(
    y: torch.Tensor, mu: Scalar, a: Scalar = 1.0, *, out: torch.Tensor | None = None
) -> torch.Tensor:
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

    With number parameters (the RVSM step) it runs in place, block by block:
    ``d = hardshrink(y, t)``, ``sin(phi/2) = min(1, sqrt(k / (a+|d|)^3))`` with
    ``k = 27 mu a (a+1) / 4``, and the value ``sign(d) * (|d| - 4/3 (a+|d|)
    sin^2(phi/6))``: the same numbers up to rounding, exact zeros where ``|y| <= t``.
    """
    _check_float(y)
    mu = _param(mu, y, "mu", low=0.0)
    a = _param(a, y, "a", low=0.0, low_open=True)
    _check_out(out, y)
    t = tl1_threshold(mu, a)
    if _fast(y, mu, a):
        k2 = 27.0 * mu * a * (a + 1.0) / 4.0  # e/2 = k2 / (a+|y|)^3

        def kernel(yb, ob, ay, s, x):
            torch.hardshrink(yb, t, out=ob)  # d = y where |y| > t, else 0
            torch.abs(ob, out=ay)
            torch.add(ay, a, out=s)
            torch.pow(s, 3, out=x)
            x.reciprocal_().mul_(k2).clamp_max_(1.0).sqrt_()  # sqrt(e/2) = sin(phi/2)
            x.asin_().mul_(1.0 / 3.0).sin_().square_()  # sin^2(phi/6)
            ay.addcmul_(s, x, value=-4.0 / 3.0)  # |d| - 4/3 (a+|d|) sin^2(phi/6)
            torch.sign(ob, out=s)  # exactly 0 where |y| <= t
            torch.mul(ay, s, out=ob)

        return _blockwise(y, _new(out, y), kernel, 3)
    ay = y.abs()
    s = a + ay
    e = torch.clamp(27.0 * mu * a * (a + 1.0) / (2.0 * s * s * s), 0.0, 2.0)
    phi = 2.0 * torch.asin(torch.sqrt(e / 2.0))
    mag = ay - (4.0 / 3.0) * s * torch.sin(phi / 6.0) ** 2
    return _store(torch.where(ay > t, torch.sign(y) * mag, torch.zeros_like(y)), out)


# --------------------------------------------------------------------------- whole-tensor


def prox_l1l2(
    y: torch.Tensor,
    mu: Scalar,
    alpha: Scalar = 1.0,
    *,
    dim: int | None = None,
    out: torch.Tensor | None = None,
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
    shape (``keepdim=True``). ``out``: see the module docstring (the result is
    computed whole, then copied there).
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
    _check_out(out, y)
    if y.numel() == 0:
        return _store(y.clone(), out)
    work = y.reshape(-1) if dim is None else y
    d = 0 if dim is None else dim
    ay = work.abs()
    ymax = ay.amax(dim=d, keepdim=True)
    # Case 1: soft threshold, then push the survivors out by alpha*mu along z.
    if _fast(y, mu):
        z = torch._C._nn.softshrink(work, mu)
    else:
        z = torch.sign(work) * torch.clamp_min(ay - mu, 0.0)
    zn = torch.linalg.vector_norm(z, dim=d, keepdim=True)
    x1 = z + alpha * mu * z / torch.where(zn > 0, zn, torch.ones_like(zn))
    # Case 2: keep only the largest entry.
    idx = ay.argmax(dim=d, keepdim=True)
    top = torch.zeros_like(work, dtype=torch.bool).scatter(d, idx, True)
    x2 = torch.where(top, torch.sign(work) * (ay + (alpha - 1.0) * mu), torch.zeros_like(work))
    result = torch.where(
        ymax > mu, x1, torch.where(ymax > (1.0 - alpha) * mu, x2, torch.zeros_like(work))
    )
    return _store(result.reshape(y.shape), out)


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
    kind: str,
    y: torch.Tensor,
    mu: Scalar,
    *,
    a: Scalar = 1.0,
    alpha: Scalar = 1.0,
    scale: Scalar = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prox of the elementwise penalty ``kind`` (one of :data:`INDIVIDUAL_PENALTIES`).

    Objective: ``argmin_x P_kind(x) + 1/(2 mu) ||x - y||^2``; see :func:`prox_l1`,
    :func:`prox_l0`, :func:`prox_tl1` (uses ``a``) and :func:`prox_l1l2` (uses
    ``alpha``, whole tensor, scalar ``mu``). ``"none"`` returns ``y`` itself
    (without ``out``), ``mu = 0`` a copy of ``y`` (both: ``y`` copied into ``out``).

    ``scale`` (``s > 0``, a number or a tensor like ``mu``) applies the penalty
    to ``x / s``: the result is ``s * prox_{P, mu}(y / s)``, computed without
    dividing ``y``, as the prox of ``P`` itself with other parameters (the same
    minimiser, rounded differently):
    ``mu s`` for l1 and l1-l2 (degree-1 homogeneous), ``mu s^2`` for l0, and for
    tl1 ``a s`` and ``mu s^2 (a+1) / (a s + 1)``, since
    ``P_a(x / s) = (a+1) / (a s + 1) * P_{a s}(x)``.
    """
    _check_kind(kind)
    if kind == "none":
        return y if out is None else _identity(y, out)
    _check_float(y)
    scale = _param(scale, y, "scale", low=0.0, low_open=True)
    mu = _param(mu, y, "mu", low=0.0)
    if kind == "tl1":
        a = _param(a, y, "a", low=0.0, low_open=True)
    if isinstance(mu, float) and mu == 0.0:
        return _identity(y, out)
    if isinstance(scale, torch.Tensor) or scale != 1.0:
        if kind == "l0":
            mu = mu * scale * scale
        elif kind == "tl1":
            mu, a = tl1_scaled_params(mu, a, scale)
        else:
            mu = mu * scale
    if kind == "l1":
        return prox_l1(y, mu, out=out)
    if kind == "l0":
        return prox_l0(y, mu, out=out)
    if kind == "tl1":
        return prox_tl1(y, mu, a, out=out)
    return prox_l1l2(y, mu, alpha, out=out)


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

    ``weights`` is a number or a tensor broadcastable to ``norms`` (the papers'
    parametrisation uses ``w_g = sqrt(|g|)``, docs/math.md).
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
