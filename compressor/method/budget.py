"""Budgets (``--target-macs/-params/-size/-latency``) as thresholds of the group prox.

A budget never picks channels itself: each step it chooses the threshold of the
group term so that the prox's own zero set meets the budget's schedule. With
``s_gu = ||w_gu|| / scale_g`` (a unit's norm against its group's scale,
``scale_g = c_g ref_g``: the group weighting times the group's median norm at
the start), the prox zeroes unit ``u`` of group ``g`` exactly when
``||w_gu|| <= t_g``; the controller sets ``t_g = min(tau, cap_g) scale_g`` with
one global ``tau`` (the smallest that meets every target's scheduled
reduction) and a per-group cap ``cap_g`` that leaves every group at least
``balance`` times the share of units a uniform ratio would keep. So the zero
set at every step is ``{(g, u) : s_gu <= min(tau, cap_g)}``, the prox's.
With ``target.allocation: sensitivity`` the caps are set tighter by
:mod:`compressor.method.allocation`: each group keeps at least what a one-shot
sensitivity analysis allots it (above the balance floor).

With ``round_to = r > 1`` (``prune.round_to``: the channel block the runtime's
kernels compute in, e.g. onnxruntime's NCHWc block of 8 on AVX2) each group's
threshold is lowered to the largest one that keeps a multiple of ``r`` channels
(or the whole group; in units, :meth:`ChannelGroups.unit_blocks`: fewer for units
of several channels, none for attention heads), so the kept
channel counts are runtime-friendly from the first step and no removed-but-kept
zero channel costs MACs later.

A latency target (``--target-latency``) is costed by a
:class:`compressor.latency_model.LatencyModel` calibrated on this machine before
training: its prediction for a zero set is monotone in every group's kept units, so
the same bisection applies. Before freezing, the zero set's own compact model is
timed (``latency_probe``) and the reading goes into the latency model; if the
corrected model chooses another zero set, that one is timed too
(:data:`LATENCY_PROBES` at most) and the last one chosen is frozen.

The removed share of the cost follows Zhu & Gupta's cubic ramp ("To prune, or
not to prune", 2017), reaching the targets at ``reach_fraction`` of training.
Then the zero set is frozen: its groups are held at zero in ``w``, the limit
``beta -> inf`` of the coupling on them (``RVSM.hold_zero``), and the group
threshold of the others drops to 0, so the rest of training fine-tunes the
network that will ship.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compressor.groups import ChannelGroups
from compressor.method.allocation import Sensitivity, allocate
from compressor.runtime import kept_in_blocks

log = logging.getLogger(__name__)

MIN_KEEP_FRACTION = 0.05  # a budget never empties a group below this share of its units
COST_KINDS = ("macs", "params", "latency")
SCHEDULES = ("cubic", "immediate")
LATENCY_PROBES = 2  # compact models timed before a latency target's zero set freezes


@dataclass(frozen=True)
class Target:
    """One asked reduction: ``kind`` ``macs``, ``params``, ``size`` or ``latency``; ``factor``
    of its cost.

    ``size`` (bytes of the exported model) is costed as params: ``factor`` is
    the baseline size over the asked bytes, ``asked`` keeps what the user typed.
    ``latency`` is costed by the latency model: ``factor`` is the baseline's measured
    milliseconds over the asked ones.
    """

    kind: str
    factor: float
    asked: float

    @property
    def cost(self) -> str:
        return "params" if self.kind == "size" else self.kind


def cubic_schedule(progress: float) -> float:
    """Share of the final removal reached at ``progress`` in [0, 1] (Zhu & Gupta 2017)."""
    p = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - p) ** 3


# ``target.balance: auto``. Under a target the user gives, the uniform floor: chosen on the
# validation split at equal MACs (benchmarks/equal_macs.py, benchmarks/allocation.py), where
# 0.75 lost 0.5-0.7 points at 4x by thinning some groups far below the others. Under the
# accuracy seeker, 0.75: the freedom lets the stages find room in the groups that cost least.
BALANCE_UNDER_TARGET = 1.0
BALANCE_UNDER_SEEKER = 0.75


def resolve_balance(balance: float | str, *, seeking: bool) -> float:
    """``target.balance`` as a number: ``auto`` depends on who sets the budget."""
    if balance == "auto":
        return BALANCE_UNDER_SEEKER if seeking else BALANCE_UNDER_TARGET
    return float(balance)


class BudgetController:
    """Chooses the group threshold of every step so that the zero set meets the targets."""

    def __init__(
        self,
        targets: Sequence[Target],
        groups: ChannelGroups,
        scale: torch.Tensor,
        *,
        total_steps: int,
        reach_fraction: float = 0.3,
        balance: float = 0.75,
        schedule: str = "cubic",
        round_to: int = 1,
        latency=None,
        latency_probe=None,
        sensitivity: Sensitivity | None = None,
    ):
        """``latency_probe(zero) -> (compact ms, baseline ms)`` times the compact model a zero
        set leaves beside the baseline; with a latency target it checks the zero set before
        it freezes (None: the calibrated latency model alone decides). ``sensitivity``
        (``target.allocation: sensitivity``) caps each group's zero set at what
        :func:`~compressor.method.allocation.allocate` gives it; None: the uniform floor."""
        if not targets:
            raise ValueError("a budget needs at least one target")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.groups = groups
        self.scale = scale.to(torch.float64).cpu()
        self.schedule = schedule
        self.balance = float(balance)
        self.round_to = max(1, int(round_to))
        self.blocks = groups.unit_blocks(self.round_to)  # per group, in units
        self.reach_step = max(1, int(round(reach_fraction * total_steps)))
        self.latency = latency  # a LatencyModel, for latency targets
        self.latency_probe = latency_probe
        self.sensitivity = sensitivity
        if latency is None and any(t.cost == "latency" for t in targets):
            raise ValueError("a latency target needs a latency model")
        self.base = {"macs": float(groups.total_macs), "params": float(groups.total_params)}
        if latency is not None:
            self.base["latency"] = latency.base_ms
        self.frozen = False
        self.zero: list[torch.Tensor] | None = None  # the prox's zero set at the last step
        self.tau = 0.0  # the global threshold of the last step, in units of scale_g
        self.reached: dict[str, float] = {k: 1.0 for k in COST_KINDS}
        self.ask(targets)

    # ------------------------------------------------------------------ costs
    def factors(self, zero: Sequence[torch.Tensor]) -> dict[str, float]:
        """The reduction of every cost kind once the ``zero`` units are removed."""
        macs, params = self.groups.estimate_cost(zero)
        factors = {
            "macs": self.base["macs"] / max(macs, 1.0),
            "params": self.base["params"] / max(params, 1.0),
        }
        if self.latency is not None:
            factors["latency"] = self.base["latency"] / max(self.latency.predict(zero), 1e-9)
        return factors

    def meets(self, factors: dict[str, float], wants: dict[str, float]) -> bool:
        return all(factors[k] >= w for k, w in wants.items())

    def _floor_zero(self, keep_fraction: float) -> list[torch.Tensor]:
        masks = []
        for g, block in zip(self.groups, self.blocks, strict=True):
            m = torch.ones(g.size, dtype=torch.bool)
            keep = max(1, math.ceil(keep_fraction * g.size))
            m[: kept_in_blocks(keep, g.size, block)] = False
            masks.append(m)
        return masks

    def floor_factors(self, keep_fraction: float = MIN_KEEP_FRACTION) -> dict[str, float]:
        """The largest reduction of each cost: every group down to ``keep_fraction`` of its units."""
        return self.factors(self._floor_zero(keep_fraction))

    @property
    def unreachable(self) -> list[Target]:
        """The targets beyond what removing channels can give."""
        floor = self.floor_factors()
        return [t for t in self.targets if t.factor > floor[t.cost] * (1 + 1e-7)]

    # ---------------------------------------------------------------- asking
    def ask(self, targets: Sequence[Target]) -> None:
        """Aim at ``targets`` from now on (the accuracy seeker raises its MACs target in stages)."""
        self.targets = list(targets)
        self.wants = {}
        for t in self.targets:
            self.wants[t.cost] = max(self.wants.get(t.cost, 1.0), t.factor)
        self._set_floors()

    def _set_floors(self) -> None:
        """Each group's least kept units (``keep_units``) for the current targets: the
        balance floor, and below it nothing when a sensitivity allocation caps the group."""
        self.keep_fraction = self._balanced_keep_fraction()
        self.keep_units = [max(1, math.ceil(self.keep_fraction * g.size)) for g in self.groups]
        if self.sensitivity is not None:
            self.keep_units = self._allocated_keep(self.keep_units)

    def _allocated_keep(self, floors: list[int]) -> list[int]:
        """Each group's kept units under the sensitivity allocation (above ``floors``)."""
        sizes = [g.size for g in self.groups]
        by_macs = "macs" in self.wants or "latency" in self.wants
        saved = (
            self.groups.macs_per_channel() if by_macs else self.groups.weights_removed_per_unit()
        )

        def meets(zero_counts: list[int]) -> bool:
            masks = [torch.arange(n) < z for n, z in zip(sizes, zero_counts, strict=True)]
            return self.meets(self.factors(masks), self.wants)

        zeros = allocate(self.sensitivity, sizes, floors, self.blocks, saved, meets)
        return [n - z for n, z in zip(sizes, zeros, strict=True)]

    def _balanced_keep_fraction(self) -> float:
        """``balance`` times the share a uniform ratio keeps (about ``1/sqrt(factor)``),
        lowered (down to ``MIN_KEEP_FRACTION``) until every target stays reachable."""
        keep = self.balance / math.sqrt(max(self.wants.values()))
        while keep > MIN_KEEP_FRACTION and not self.meets(
            self.factors(self._floor_zero(keep)), self.wants
        ):
            keep *= 0.9
        return max(MIN_KEEP_FRACTION, keep)

    def scheduled(self, step: int) -> dict[str, float]:
        """Every target's reduction due at ``step`` (cubic: of the removed share of the cost)."""
        if self.schedule == "immediate":
            return dict(self.wants)
        ramp = cubic_schedule(step / self.reach_step)
        return {k: 1.0 / (1.0 - (1.0 - 1.0 / w) * ramp) for k, w in self.wants.items()}

    # ------------------------------------------------------------- thresholds
    @torch.no_grad()
    def thresholds(self, step: int, norms: Sequence[torch.Tensor]) -> list[float]:
        """Per group, the threshold ``min(tau, cap_g)`` at ``step`` on the scores
        ``s_gu = ||w_gu|| / scale_g`` (``norms``: ``||w_gu||``); the prox zeroes
        ``s_gu <= threshold``.

        Frozen: 0 everywhere (the held zero set is exactly zero in ``w``, so the
        prox zeroes it and nothing else).
        """
        if self.frozen:
            return [0.0] * len(self.groups)
        scores = [
            n.detach().double().cpu() / s for n, s in zip(norms, self.scale.tolist(), strict=True)
        ]
        want = self.scheduled(step)
        blocked = any(b > 1 for b in self.blocks)
        ascending = [torch.sort(sc).values for sc in scores] if blocked else None
        limits = self._solve(scores, ascending, want)
        if self.schedule == "cubic" and step >= self.reach_step:
            limits = self._check_latency(scores, ascending, want) or limits
            self.freeze()
        return limits

    def _solve(
        self,
        scores: Sequence[torch.Tensor],
        ascending: Sequence[torch.Tensor] | None,
        want: dict[str, float],
    ) -> list[float]:
        """The fewest units whose removal meets every reduction in ``want``, under the caps
        of the current ``keep_units``: bisects the global ``tau`` over the eligible
        scores, sets ``tau``, the zero set and ``reached``, returns the group thresholds
        (``-inf``: the group may lose no unit). ``ascending``: each group's scores sorted,
        when kept counts are rounded to blocks (None otherwise)."""
        caps = [self._cap(sc, keep) for sc, keep in zip(scores, self.keep_units, strict=True)]
        eligible = torch.cat(
            [torch.where(sc <= c, sc, torch.inf) for sc, c in zip(scores, caps, strict=True)]
        )
        values = torch.sort(eligible).values
        finite = int(torch.isfinite(values).sum())

        def group_thresholds(tau: float) -> list[float]:
            limits = [min(tau, c) for c in caps]
            if ascending is None:
                return limits
            return [
                self._round(a, t, b) for a, t, b in zip(ascending, limits, self.blocks, strict=True)
            ]

        def zero_at(tau: float) -> list[torch.Tensor]:
            return [sc <= t for sc, t in zip(scores, group_thresholds(tau), strict=True)]

        def tau_of(k: int) -> float:  # zeroes exactly the k lowest eligible scores (no ties)
            if k == 0:
                return float(values[0]) / 2 if len(values) and math.isfinite(values[0]) else 0.0
            if k >= finite:  # every eligible unit: just above the largest, clear of rounding
                return float(values[finite - 1]) * (1 + 1e-9) + 1e-300
            return (float(values[k - 1]) + float(values[k])) / 2

        lo, hi = 0, finite
        if not self.meets(self.factors(zero_at(tau_of(hi))), want):
            lo = hi
        while lo < hi:
            mid = (lo + hi) // 2
            if self.meets(self.factors(zero_at(tau_of(mid))), want):
                hi = mid
            else:
                lo = mid + 1
        self.tau = tau_of(lo)
        self.zero = zero_at(self.tau)
        self.reached = self.factors(self.zero)
        return group_thresholds(self.tau)

    def _check_latency(self, scores, ascending, want) -> list[float] | None:
        """Time the compact model of the zero set about to freeze and add the reading to
        the latency model (the balance floor lowered again if the targets need it); while
        that changes the zero set :meth:`_solve` chooses, time the new one
        (:data:`LATENCY_PROBES` timings at most). Returns the last solve's thresholds."""
        if self.latency_probe is None or "latency" not in self.wants:
            return None
        limits = None
        for _ in range(LATENCY_PROBES):
            timed = [z.clone() for z in self.zero]
            predicted, measured = self.latency.add_probe(timed, *self.latency_probe(timed))
            log.info(
                "budget: the zero set's compact model predicted %.3f ms, timed %.3f ms",
                predicted, measured,
            )  # fmt: skip
            self._set_floors()
            limits = self._solve(scores, ascending, want)
            if all(torch.equal(a, b) for a, b in zip(timed, self.zero, strict=True)):
                break
        return limits

    def _round(self, ascending: torch.Tensor, limit: float, block: int) -> float:
        """The largest threshold ``<= limit`` whose zero set keeps a multiple of ``block``
        units of the group (its scores sorted ``ascending``), or all of them (``-inf``)."""
        size = len(ascending)
        zeros = int((ascending <= limit).sum())
        if zeros == 0 or block == 1:
            return limit
        zeros_kept = size - kept_in_blocks(size - zeros, size, block)
        if zeros_kept == zeros:
            return limit
        if zeros_kept == 0:
            return -math.inf
        return (float(ascending[zeros_kept - 1]) + float(ascending[zeros_kept])) / 2

    def _cap(self, scores: torch.Tensor, keep: int) -> float:
        """The largest score a group may lose while keeping ``keep`` of its units."""
        if keep >= len(scores):
            return -math.inf
        top = torch.sort(scores, descending=True).values
        return (float(top[keep - 1]) + float(top[keep])) / 2

    def freeze(self, zero: Sequence[torch.Tensor] | None = None) -> None:
        """Stop moving the threshold; ``zero`` (default: the last step's) is the final zero set."""
        if zero is not None:
            self.zero = [z.clone() for z in zero]
        if self.zero is None:
            self.zero = [torch.zeros(g.size, dtype=torch.bool) for g in self.groups]
        self.reached = self.factors(self.zero)
        if not self.frozen:
            log.info(
                "budget: zero set frozen at %s",
                ", ".join(f"{self.reached[k]:.2f}x {k}" for k in self.wants),
            )
        self.frozen = True

    def allocation_summary(self) -> dict:
        """For the report: how the most units each group may lose was set."""
        return {
            "kind": "sensitivity" if self.sensitivity is not None else "uniform",
            "balance": self.balance,
            "least_kept": list(self.keep_units),
            "units": [g.size for g in self.groups],
        }

    def state_dict(self) -> dict:
        return {
            "targets": [(t.kind, t.factor, t.asked) for t in self.targets],
            "frozen": self.frozen,
            "zero": self.zero,
            "tau": self.tau,
            "reached": dict(self.reached),
            "latency": self.latency.state_dict() if self.latency is not None else None,
            "sensitivity": self.sensitivity.state_dict() if self.sensitivity else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.ask([Target(*t) for t in state["targets"]])
        self.frozen, self.zero, self.tau = state["frozen"], state["zero"], state["tau"]
        self.reached = dict(state["reached"])
