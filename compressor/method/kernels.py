"""Fused kernels for the RVSM step's hot path: the transformed-L1 prox and the coupling.

In eager PyTorch the TL1 prox (:func:`compressor.method.penalties.prox_tl1`) is about
fifteen elementwise passes over every penalised weight, two of them the
transcendental ``asin`` and ``sin``, and the coupling ``grad += beta (w - u)``
is two more passes; on torchvision's ``resnet18`` (11.2M weights) that is most
of the RVSM step's cost (``benchmarks/rvsm_overhead.py``). Here each is one
loop that ``torch.compile`` generates (Inductor: vectorised C++ on the CPU,
Triton on CUDA) over the flat views of all the tensors, one call per step.

The TL1 loop also drops the two transcendentals and one square root. The
prox's magnitude is ``|y| - 4/3 (a+|y|) c^2`` with ``c = sin(theta/3)``,
``sin(theta) = x`` and ``x^2 = q = k / (a+|y|)^3`` (see
:func:`~compressor.method.penalties.prox_tl1`), so ``c^2 = q H`` with
``H = (sin(theta/3) / sin(theta))^2``. ``H`` is an even function of ``theta``,
hence analytic in ``z = cos(theta) = sqrt(1 - q)`` on the whole range ``z`` in
``[0, 1]`` (its nearest singularity is at ``z = -1``), so a degree-10
polynomial in ``2z - 1`` (a Chebyshev fit, made at import from the formula
itself) gives it to 2e-8 relative. One division and one square root per weight
remain; in float32 the evaluated ``c^2`` is within a few ulps of the true
value (``tests/test_kernels.py``). The exact zero set is the eager function's
rule: zero exactly where ``|y| <= t``.

With coupled channel groups whose units are measured by norm-layer entries
(every BatchNorm network), the group shrink factors are known before the prox
(the norm entries have no elementwise penalty, so their prox is the identity),
and :func:`sparse_group_prox_` applies them in the same loop: the whole
``u = group_shrink(individual_prox(w))`` is one pass over the weights.

Only float32 tensors take the fused TL1 loop (the polynomial is fitted to
float32 accuracy); other dtypes, and every call when ``torch.compile`` cannot
build a kernel here (no C++ compiler, an unsupported device), use the eager
functions: the first failure logs a warning and switches the fused path off
for the process.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from compressor.method import penalties

log = logging.getLogger(__name__)

RATIO_DEGREE = 10
_FIT_NODES = 4000


def fit_ratio_polynomial(degree: int = RATIO_DEGREE) -> tuple[float, ...]:
    """Power-basis coefficients (constant first) of ``p(w) ~ (sin(theta/3) / sin(theta))^2``, ``w = 2 cos(theta) - 1``.

    A least-squares fit at Chebyshev nodes of ``w`` in ``[-1, 1]`` (near-minimax),
    converted to powers of ``w`` (the coefficients stay below 0.2 in magnitude, so
    Horner's rule is stable). At ``theta = 0`` the ratio's limit is ``1/9``.
    """
    w = np.cos(np.pi * (np.arange(_FIT_NODES) + 0.5) / _FIT_NODES)
    theta = np.arccos((w + 1.0) / 2.0)
    x = np.sin(theta)
    safe = np.where(x > 0, x, 1.0)
    ratio = np.where(x > 0, (np.sin(theta / 3.0) / safe) ** 2, 1.0 / 9.0)
    cheb = np.polynomial.chebyshev.chebfit(w, ratio, degree)
    return tuple(float(c) for c in np.polynomial.chebyshev.cheb2poly(cheb))


RATIO_COEFFS = fit_ratio_polynomial()


def sin_third_asin_squared(q: torch.Tensor) -> torch.Tensor:
    """``sin(asin(sqrt(q)) / 3)^2`` for ``q`` in ``[0, 1]`` by the fitted polynomial (float32 accuracy)."""
    w = 2.0 * torch.sqrt(1.0 - q) - 1.0
    acc = torch.full_like(w, RATIO_COEFFS[-1])
    for c in RATIO_COEFFS[-2::-1]:
        acc = acc * w + c
    return q * acc


def _tl1_values(
    y: torch.Tensor, t: torch.Tensor, k2: torch.Tensor, a: torch.Tensor
) -> torch.Tensor:
    """``prox_tl1(y)`` with ``t`` its threshold and ``k2 = 27 mu a (a+1) / 4``."""
    ay = y.abs()
    s = ay + a
    c2 = sin_third_asin_squared(torch.clamp(k2 / (s * s * s), 0.0, 1.0))  # sin^2(phi/6)
    mag = ay - (4.0 / 3.0) * s * c2
    return torch.where(ay > t, torch.copysign(mag, y), torch.zeros_like(y))


def _tl1_loops(ys: list[torch.Tensor], outs: list[torch.Tensor], params: torch.Tensor) -> None:
    for i in range(len(ys)):  # unrolled by the compiler: one call per step, not per tensor
        outs[i].copy_(_tl1_values(ys[i], params[i, 0], params[i, 1], params[i, 2]))


def _sparse_group_loops(
    ys: list[torch.Tensor],
    outs: list[torch.Tensor],
    params: torch.Tensor,
    row_factors: torch.Tensor,
    prox: list[bool],
) -> None:
    start = 0
    for i in range(len(ys)):  # each y is a (rows, -1) view; its rows' factors follow the last's
        rows = ys[i].shape[0]
        factor = row_factors[start : start + rows].unsqueeze(1)
        start += rows
        value = _tl1_values(ys[i], params[i, 0], params[i, 1], params[i, 2]) if prox[i] else ys[i]
        outs[i].copy_(value * factor)


def _coupling_loops(
    grads: list[torch.Tensor], ws: list[torch.Tensor], us: list[torch.Tensor], beta: torch.Tensor
) -> None:
    for g, w, u in zip(grads, ws, us, strict=True):
        g.add_(beta * (w - u))


class _Compiled:
    """``torch.compile`` of one function, built on first use; ``None`` from :meth:`get` once it failed.

    The shapes are static (a model's tensors do not change), so the first call
    for a list of tensors compiles (seconds per model; Inductor caches the result
    on disk for later runs) and later calls only pass new numbers.
    """

    def __init__(self, fn):
        self.fn = fn
        self.compiled = None
        self.failed = False

    def get(self):
        if self.failed:
            return None
        if self.compiled is None:  # lazily: importing the compiler stack costs start-up time
            self.compiled = torch.compile(self.fn, dynamic=False, fullgraph=True)
        return self.compiled

    def disable(self, exc: BaseException) -> None:
        if not self.failed:
            log.warning(
                "fused kernels are off (torch.compile failed: %s); using the eager ones",
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
        self.failed = True


_TL1 = _Compiled(_tl1_loops)
_SPARSE_GROUP = _Compiled(_sparse_group_loops)
_COUPLING = _Compiled(_coupling_loops)


def _flat(t: torch.Tensor) -> torch.Tensor | None:
    return t.view(-1) if t.is_contiguous() else None


def _run(kernel: _Compiled, *args) -> bool:
    fn = kernel.get()
    if fn is None:
        return False
    try:
        fn(*args)
    except Exception as exc:  # no compiler, unsupported device: fall back for good
        kernel.disable(exc)
        return False
    return True


def fused_available(kernel: str = "tl1") -> bool:
    """Whether the fused ``kernel`` (``"tl1"``, ``"sparse_group"`` or ``"coupling"``) has not failed."""
    return not {"tl1": _TL1, "sparse_group": _SPARSE_GROUP, "coupling": _COUPLING}[kernel].failed


@torch.no_grad()
def prox_tl1_many_(
    ys: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor],
    mus: Sequence[float],
    as_: Sequence[float],
) -> None:
    """``outs[i] = prox_tl1(ys[i], mus[i], as_[i])`` for every ``i``: one fused call for all.

    The float32, contiguous pairs on one device go through the fused loop; the
    rest (and everything when compiling failed) through :func:`penalties.prox_tl1`.
    ``mu`` and ``a`` are numbers (the RVSM step's); they travel in one tensor,
    so new values every step do not recompile.
    """
    fused, rows, rest = [], [], []
    device = None
    for y, out, mu, a in zip(ys, outs, mus, as_, strict=True):
        flat_y, flat_out = _flat(y), _flat(out)
        ok = (
            mu > 0.0
            and y.dtype == out.dtype == torch.float32
            and flat_y is not None
            and flat_out is not None
            and (device is None or y.device == device)
        )
        if not ok:
            rest.append((y, out, mu, a))
            continue
        device = y.device
        fused.append((y, out, mu, a, flat_y, flat_out))
        rows.append(_tl1_row(mu, a))
    if fused:
        params = torch.tensor(rows, dtype=torch.float32).to(device, non_blocking=True)
        if not _run(_TL1, [f[4] for f in fused], [f[5] for f in fused], params):
            rest = [f[:4] for f in fused] + rest
    for y, out, mu, a in rest:
        penalties.prox_tl1(y, mu, a, out=out)


def row_count(t: torch.Tensor) -> int:
    """Rows (dim 0) of ``t`` as the row-factor layout counts them (a scalar is one row)."""
    return t.shape[0] if t.dim() else 1


def _tl1_row(mu: float, a: float) -> tuple[float, float, float]:
    """What the fused TL1 loop needs of ``(mu, a)``: the threshold, ``k2 = 27 mu a (a+1) / 4``, ``a``."""
    return penalties.tl1_threshold(mu, a), 27.0 * mu * a * (a + 1.0) / 4.0, a


@torch.no_grad()
def sparse_group_prox_(
    ys: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor],
    mus: Sequence[float | None],
    as_: Sequence[float],
    row_factors: torch.Tensor,
) -> bool:
    """``outs[i] = f_i * prox_tl1(ys[i], mus[i], as_[i])`` for every ``i`` in one fused call.

    ``f_i`` scales each row (dim 0) of tensor ``i``: ``row_factors`` holds the
    factors of all rows, tensor after tensor (the group shrink factors of the
    rows' channels, 1 outside the groups). ``mus[i]`` None or 0: no prox, the
    scaled copy ``f_i * ys[i]``. Returns False, with nothing written, where it
    cannot run (not all float32 and contiguous on one device, a different
    number of rows, or compiling failed); the caller then takes the eager path.
    """
    tensors = [*ys, *outs, row_factors]
    if (
        not ys
        or len({(t.dtype, t.device) for t in tensors}) != 1
        or ys[0].dtype != torch.float32
        or not all(t.is_contiguous() for t in tensors)
        or row_factors.dim() != 1
        or row_factors.numel() != sum(row_count(y) for y in ys)
    ):
        return False
    views_y = [y.view(row_count(y), -1) for y in ys]
    views_out = [o.view(v.shape) for o, v in zip(outs, views_y, strict=True)]
    prox = [bool(mu) for mu in mus]
    rows = [_tl1_row(mu, a) if mu else (0.0, 0.0, 1.0) for mu, a in zip(mus, as_, strict=True)]
    params = torch.tensor(rows, dtype=torch.float32).to(ys[0].device, non_blocking=True)
    return _run(_SPARSE_GROUP, views_y, views_out, params, row_factors, prox)


@torch.no_grad()
def prox_tl1_(y: torch.Tensor, out: torch.Tensor, mu: float, a: float) -> torch.Tensor:
    """``out = prox_tl1(y, mu, a)``: :func:`prox_tl1_many_` for one tensor."""
    prox_tl1_many_([y], [out], [mu], [a])
    return out


@torch.no_grad()
def add_coupling_grad_(grads, weights, us, beta: float) -> bool:
    """``grad += beta (w - u)`` for each triple in one fused call; False (nothing done) when it cannot run.

    It cannot for mixed dtypes or devices, non-contiguous tensors, or once compiling
    failed; the caller then takes its eager path (``RVSM.add_coupling_grad``).
    """
    flats = [(_flat(g), _flat(w), _flat(u)) for g, w, u in zip(grads, weights, us, strict=True)]
    same = (
        len({(g.dtype, g.device) for g in grads} | {(t.dtype, t.device) for t in [*weights, *us]})
        == 1
    )
    if grads and same and all(f is not None for triple in flats for f in triple):
        beta_t = torch.tensor(beta, dtype=grads[0].dtype).to(grads[0].device, non_blocking=True)
        return _run(
            _COUPLING, [f[0] for f in flats], [f[1] for f in flats], [f[2] for f in flats], beta_t
        )
    return False
