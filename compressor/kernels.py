"""Fused kernels for the RVSM step's hot path: the transformed-L1 prox and the coupling.

In eager PyTorch the TL1 prox (:func:`compressor.penalties.prox_tl1`) is about
fifteen elementwise passes over every penalised weight, two of them the
transcendental ``asin`` and ``sin``, and the coupling ``grad += beta (w - u)``
is two more passes; on torchvision's ``resnet18`` (11.2M weights) that is most
of the RVSM step's cost (``benchmarks/rvsm_overhead.py``). Here each is one
loop that ``torch.compile`` generates (Inductor: vectorised C++ on the CPU,
Triton on CUDA) over the flat views of all the tensors, one call per step.

The TL1 loop also drops the two transcendentals. The prox's magnitude is
``|y| - 4/3 (a+|y|) sin^2(phi/6)`` with ``sin(phi/2) = x`` (see
:func:`~compressor.penalties.prox_tl1`), i.e. ``c = sin(asin(x) / 3)``, the root
in ``[0, 1/2]`` of the triple-angle cubic ``4c^3 - 3c + x = 0``. The ratio
``c / x = sin(theta/3) / sin(theta)`` is analytic in ``v = sqrt(1 - x)`` on the
whole range ``x`` in ``[0, 1]`` (``asin`` has its square-root branch point at
``x = 1``, which ``v`` absorbs), so a degree-10 polynomial in ``2v - 1``
(a Chebyshev fit, made at import from the formula itself) gives it to 4e-8;
in float32 the evaluated ``c`` is within a few ulps of the true value (under
4e-7 relative, ``tests/test_kernels.py``), like the ``asin``/``sin`` route.
The exact zero set is the eager function's rule: zero exactly where ``|y| <= t``.

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

from compressor import penalties

log = logging.getLogger(__name__)

RATIO_DEGREE = 10
_FIT_NODES = 4000


def fit_ratio_polynomial(degree: int = RATIO_DEGREE) -> tuple[float, ...]:
    """Power-basis coefficients (constant first) of ``p(w) ~ sin(asin(x)/3) / x``, ``w = 2 sqrt(1-x) - 1``.

    A least-squares fit at Chebyshev nodes of ``w`` in ``[-1, 1]`` (near-minimax),
    converted to powers of ``w`` (the coefficients stay below 0.4 in magnitude, so
    Horner's rule is stable). At ``x = 0`` the ratio's limit is ``1/3``.
    """
    w = np.cos(np.pi * (np.arange(_FIT_NODES) + 0.5) / _FIT_NODES)
    v = (w + 1.0) / 2.0
    x = 1.0 - v * v
    safe = np.where(x > 0, x, 1.0)
    ratio = np.where(x > 0, np.sin(np.arcsin(x) / 3.0) / safe, 1.0 / 3.0)
    cheb = np.polynomial.chebyshev.chebfit(w, ratio, degree)
    return tuple(float(c) for c in np.polynomial.chebyshev.cheb2poly(cheb))


RATIO_COEFFS = fit_ratio_polynomial()


def sin_third_asin(x: torch.Tensor) -> torch.Tensor:
    """``sin(asin(x) / 3)`` for ``x`` in ``[0, 1]`` by the fitted polynomial (float32 accuracy)."""
    w = 2.0 * torch.sqrt(1.0 - x) - 1.0
    acc = torch.full_like(w, RATIO_COEFFS[-1])
    for c in RATIO_COEFFS[-2::-1]:
        acc = acc * w + c
    return x * acc


def _tl1_loop(
    y: torch.Tensor, out: torch.Tensor, t: torch.Tensor, k2: torch.Tensor, a: torch.Tensor
) -> None:
    ay = y.abs()
    s = ay + a
    x = torch.sqrt(torch.clamp(k2 / (s * s * s), 0.0, 1.0))  # sin(phi/2)
    c = sin_third_asin(x)  # sin(phi/6)
    mag = ay - (4.0 / 3.0) * s * c * c
    out.copy_(torch.where(ay > t, torch.copysign(mag, y), torch.zeros_like(y)))


def _tl1_loops(ys: list[torch.Tensor], outs: list[torch.Tensor], params: torch.Tensor) -> None:
    for i in range(len(ys)):  # unrolled by the compiler: one call per step, not per tensor
        _tl1_loop(ys[i], outs[i], params[i, 0], params[i, 1], params[i, 2])


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
    """Whether the fused ``kernel`` (``"tl1"`` or ``"coupling"``) has not failed in this process."""
    return not {"tl1": _TL1, "coupling": _COUPLING}[kernel].failed


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
        rows.append((penalties.tl1_threshold(mu, a), 27.0 * mu * a * (a + 1.0) / 4.0, a))
    if fused:
        params = torch.tensor(rows, dtype=torch.float32).to(device, non_blocking=True)
        if not _run(_TL1, [f[4] for f in fused], [f[5] for f in fused], params):
            rest = [f[:4] for f in fused] + rest
    for y, out, mu, a in rest:
        penalties.prox_tl1(y, mu, a, out=out)


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
