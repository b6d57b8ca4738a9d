"""Candidate speed-ups of the RVSM prox, timed against the library on the same state.

Nothing here is used by the library: these are measured suggestions for
``compressor/penalties.py`` and ``compressor/groups.py``. Each candidate is
checked against the library's result (same exact zeros, small max difference)
before it is timed.

- ``tl1_inplace``: the same closed form as ``penalties.prox_tl1``, evaluated with
  in-place ops on one work buffer and written straight into ``u`` (no
  ``u.copy_(prox(w))`` round trip): about half the memory passes.
- ``tl1_compiled``: the library's expression under ``torch.compile`` (Inductor
  fuses it into one loop over memory); needs a C++ compiler and ~20 s to compile
  once per process, so it is only timed with ``--compile``.
- ``coupling_no_alloc``: ``grad += beta w; grad -= beta u`` with two in-place
  ``_foreach_add_`` calls instead of allocating ``w - u`` for every tensor.
- ``norms_no_gather`` / ``scale_in_place``: ``ChannelGroups.channel_norms`` and
  ``scale_`` without the ``index_select`` / ``index_copy_`` copies when a member's
  rows are the whole tensor in order (every member of resnet18's groups).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from benchmarks.common import timed_ms
from compressor import penalties


def tl1_inplace(y: torch.Tensor, mu: float, a: float, out: torch.Tensor) -> torch.Tensor:
    """``prox_tl1(y, mu, a)`` written into ``out``: ``|y| - 4/3 (a+|y|) sin^2(phi/6)``, 0 below t."""
    t = penalties.tl1_threshold(mu, a)
    c = 27.0 * mu * a * (a + 1.0) / 2.0
    ay = y.abs()
    s = ay + a
    w = s.reciprocal()
    # e = c / s^3 in [0, 2]; phi/6 = asin(sqrt(e/2)) / 3; w = 4/3 s sin^2(phi/6)
    w.pow_(3).mul_(c).clamp_(0.0, 2.0).mul_(0.5).sqrt_().asin_().mul_(1.0 / 3.0)
    w.sin_().square_().mul_(s).mul_(4.0 / 3.0)
    torch.sub(ay, w, out=w)
    torch.copysign(w, y, out=out)
    out.masked_fill_(ay <= t, 0.0)
    return out


_compiled_core = None


def _tl1_core(y, mu, a, t):
    ay = y.abs()
    s = a + ay
    e = torch.clamp(27.0 * mu * a * (a + 1.0) / (2.0 * s * s * s), 0.0, 2.0)
    phi = 2.0 * torch.asin(torch.sqrt(e / 2.0))
    mag = ay - (4.0 / 3.0) * s * torch.sin(phi / 6.0) ** 2
    return torch.where(ay > t, torch.sign(y) * mag, torch.zeros_like(y))


def tl1_compiled(y: torch.Tensor, mu: float, a: float, out: torch.Tensor) -> torch.Tensor:
    """The library's TL1 expression compiled by Inductor (one fused loop), on a flat view."""
    global _compiled_core
    if _compiled_core is None:
        _compiled_core = torch.compile(_tl1_core, dynamic=True)
    t = penalties.tl1_threshold(mu, a)
    out.copy_(_compiled_core(y.reshape(-1), mu, a, t).view_as(y))
    return out


def _full_rows(groups, tensors) -> dict[tuple[str, str], bool]:
    full = {}
    for g in groups:
        for m in g.members:
            rows = tensors[m.param].shape[0]
            full[(g.root, m.param)] = len(m.index) == rows and bool(
                torch.equal(m.index.cpu(), torch.arange(rows))
            )
    return full


def norms_no_gather(groups, tensors, full) -> list[torch.Tensor]:
    out = []
    for g in groups:
        sq = None
        for m in g.members:
            t = tensors[m.param].detach()
            rows = t if full[(g.root, m.param)] else t.index_select(0, m.index.to(t.device))
            contrib = torch.linalg.vector_norm(rows.reshape(len(m.index), -1), dim=1).square_()
            if sq is None:
                sq = torch.zeros(g.size, dtype=contrib.dtype, device=contrib.device)
            sq.index_add_(0, m.channel.to(sq.device), contrib)
        out.append(sq.sqrt_())
    return out


@torch.no_grad()
def scale_in_place(groups, tensors, factors, full) -> None:
    for g, f in zip(groups, factors, strict=True):
        for m in g.members:
            t = tensors[m.param]
            fm = f.to(t.device, t.dtype).index_select(0, m.channel.to(t.device))
            fm = fm.view(-1, *([1] * (t.dim() - 1)))
            if full[(g.root, m.param)]:
                t.mul_(fm)
            else:
                index = m.index.to(t.device)
                t.index_copy_(0, index, t.index_select(0, index) * fm)


def _stats(fn: Callable[[], object], reps: int, sync: Callable[[], None] | None = None) -> float:
    """Median ms of ``fn``; ``sync`` (CUDA) waits for the kernels before each timer reading."""
    ms = timed_ms(fn, reps, warmup=1, sync=sync)
    return sorted(ms)[len(ms) // 2]


def _max_abs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _compare(ref, got, exact) -> dict:
    """Candidate vs library: same exact zeros, and each one's max abs error vs a float64 prox."""
    return {
        "same_zeros_as_library": all(bool(torch.equal(got[k] == 0, ref[k] == 0)) for k in ref),
        "max_abs_diff_vs_library": _max_abs(got, ref),
        "max_abs_err_vs_float64": _max_abs(got, exact),
    }


@torch.no_grad()
def run(rvsm, groups, thresholds, reps: int, compile_: bool, sync=None) -> dict:
    """Time each candidate (median ms) and the library piece it would replace.

    ``sync``: called around each timing (``torch.cuda.synchronize`` when the state is on a GPU).
    """
    names, params, u = rvsm.names, rvsm.params, rvsm.u
    thr = thresholds
    sync = sync or (lambda: None)

    def individual(fn):
        def go():
            for name, p in zip(names, params, strict=True):
                mu = thr.individual.get(name)
                if mu is None:
                    u[name].copy_(p)
                else:
                    fn(p.detach(), mu, thr.individual_a.get(name, 1.0), u[name])

        return go

    def library(y, mu, a, out):
        out.copy_(penalties.individual_prox("tl1", y, mu, a=a))

    result: dict[str, dict] = {}
    individual(library)()
    ref = {k: v.clone() for k, v in u.items()}
    exact = {}
    for name, p in zip(names, params, strict=True):
        mu = thr.individual.get(name)
        y = p.detach().double()
        exact[name] = y if mu is None else penalties.prox_tl1(y, mu, thr.individual_a[name])
    result["individual_prox_library"] = {
        "median_ms": _stats(individual(library), reps, sync),
        "max_abs_err_vs_float64": _max_abs(ref, exact),
    }
    candidates = [("tl1_inplace", tl1_inplace)]
    if compile_:
        candidates.append(("tl1_compiled", tl1_compiled))
    for name, fn in candidates:
        sync()
        t0 = time.perf_counter()
        individual(fn)()
        sync()
        first = time.perf_counter() - t0
        entry = _compare(ref, u, exact)
        entry["first_call_s"] = round(first, 2)
        entry["median_ms"] = _stats(individual(fn), reps, sync)
        result[name] = entry
    for k, v in ref.items():
        u[k].copy_(v)

    full = _full_rows(groups, u)
    lib_norms = groups.channel_norms(u)
    fast_norms = norms_no_gather(groups, u, full)
    norm_rel = max(
        float((a - b).abs().max()) / max(float(a.abs().max()), 1e-30)
        for a, b in zip(lib_norms, fast_norms, strict=True)
    )
    ones = [torch.ones(g.size, device=params[0].device) for g in groups]
    result["channel_norms_library"] = {
        "median_ms": _stats(lambda: groups.channel_norms(u), reps, sync)
    }
    result["norms_no_gather"] = {
        "median_ms": _stats(lambda: norms_no_gather(groups, u, full), reps, sync),
        "max_relative_diff": norm_rel,
    }
    result["scale_library"] = {"median_ms": _stats(lambda: groups.scale_(u, ones), reps, sync)}
    result["scale_in_place"] = {
        "median_ms": _stats(lambda: scale_in_place(groups, u, ones, full), reps, sync)
    }
    result["members_full_rows"] = f"{sum(full.values())}/{len(full)}"

    grads = [p.grad for p in params if p.grad is not None]
    if len(grads) == len(params):
        us = [u[n] for n in names]
        ws = [p.detach() for p in params]
        beta = rvsm.beta

        def coupling_no_alloc():
            torch._foreach_add_(grads, ws, alpha=beta)
            torch._foreach_add_(grads, us, alpha=-beta)

        result["add_coupling_grad_library"] = {
            "median_ms": _stats(rvsm.add_coupling_grad, reps, sync)
        }
        result["coupling_no_alloc"] = {"median_ms": _stats(coupling_no_alloc, reps, sync)}
    return result
