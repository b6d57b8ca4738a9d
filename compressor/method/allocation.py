"""How many units each group may lose under a budget (``target.allocation``).

``uniform`` (the default): every group keeps at least ``target.balance`` times the
share a uniform ratio would keep; the budget's global threshold decides the rest.

``sensitivity``: the one-shot sensitivity analysis of Li et al. ("Pruning Filters
for Efficient ConvNets", ICLR 2017, section 4.2), turned into an allocation. Before
training, each group in turn loses its lowest-norm units (those its prox would zero
first) at a grid of shares, and the damage is measured as the KL divergence of the
model's class distribution from the intact model's on a few training batches
(:func:`measure_sensitivity`). The allocation then removes, one step at a time,
the units whose next step costs the least damage per unit of cost saved
(:func:`allocate`, greedy on ``delta KL / delta cost`` with the damages taken as
additive), down to the fewest steps that meet the targets. The result is a cap
on each group's zero set: the prox's threshold still chooses which units die,
the allocation only bounds how many of each group's may.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import BadInputError
from compressor.groups import ChannelGroups
from compressor.runtime import kept_in_blocks

SHARES = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 0.95)  # of a group's units removed
SENSITIVITY_BATCHES = 2
STEPS_PER_GROUP = 32  # the allocation's resolution: a group loses units in 1/32 of its size


@dataclass(frozen=True)
class Sensitivity:
    """Per group, the damage (KL divergence, nats) of removing each share in ``shares`` of
    its lowest-norm units, every other group intact."""

    shares: tuple[float, ...]
    damage: tuple[tuple[float, ...], ...]

    def at(self, group: int, share: float) -> float:
        """The damage of removing ``share`` of ``group``'s units, linear between the grid's
        points (the last point held beyond it)."""
        xs, ys = self.shares, self.damage[group]
        if share >= xs[-1]:
            return ys[-1]
        i = max(0, next(k for k, x in enumerate(xs) if x > share) - 1)
        t = (share - xs[i]) / (xs[i + 1] - xs[i])
        return ys[i] + t * (ys[i + 1] - ys[i])

    def monotone(self) -> Sensitivity:
        """The same curves made non-decreasing (running maximum): removing more of a group
        is taken to do at least the damage measured for less (one-shot readings are noisy)."""
        return Sensitivity(
            self.shares, tuple(tuple(itertools.accumulate(d, max)) for d in self.damage)
        )

    def state_dict(self) -> dict:
        return {"shares": list(self.shares), "damage": [list(d) for d in self.damage]}

    @classmethod
    def from_state(cls, state: dict) -> Sensitivity:
        return cls(tuple(state["shares"]), tuple(tuple(d) for d in state["damage"]))


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    groups: ChannelGroups,
    inputs: Iterable[torch.Tensor],
    shares: Sequence[float] = SHARES,
) -> Sensitivity:
    """The :class:`Sensitivity` of ``model`` on ``inputs`` (batches already on its device).

    Each group's units are removed by zeroing every member slice (the channel is then
    exactly zero, as the prox leaves it), lowest unit norm first; the weights are put
    back after each measurement. Needs logits, a ``(batch, classes)`` tensor."""
    batches = list(inputs)
    was_training = model.training
    model.eval()
    try:
        reference = [_log_probs(model(x)) for x in batches]
        params = dict(model.named_parameters())
        norms = groups.channel_norms(params)
        damage = []
        for g, group in enumerate(groups):
            names = sorted({m.param for m in group.members})
            saved = {n: params[n].detach().clone() for n in names}
            order = torch.argsort(norms[g])
            row = []
            for share in shares:
                k = min(group.size - 1, int(round(share * group.size)))
                factors: list[torch.Tensor | None] = [None] * len(groups)
                factors[g] = torch.ones(group.size)
                factors[g][order[:k]] = 0.0
                groups.scale_(params, factors)
                kl = sum(
                    float(F.kl_div(_log_probs(model(x)), ref, log_target=True, reduction="sum"))
                    for x, ref in zip(batches, reference, strict=True)
                ) / sum(len(x) for x in batches)
                row.append(kl)
                for n in names:
                    params[n].copy_(saved[n])
            damage.append(tuple(row))
    finally:
        model.train(was_training)
    return Sensitivity(tuple(shares), tuple(damage))


def _log_probs(logits) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise BadInputError(
            "target.allocation: sensitivity measures the change of a classifier's output "
            "distribution and needs a model that returns (batch, classes) logits; this one "
            "does not: use target.allocation=uniform"
        )
    return torch.log_softmax(logits.double(), dim=1)


def allocate(
    sensitivity: Sensitivity,
    sizes: Sequence[int],
    floors: Sequence[int],
    blocks: Sequence[int],
    saved_per_unit: Sequence[float],
    meets: Callable[[list[int]], bool],
) -> list[int]:
    """Per group, the most units it may lose: the shortest prefix of the greedy order that
    ``meets(zero_counts)`` the targets (every group at its floor if none does).

    The greedy order takes, at each step, the group whose next step (about
    ``size / STEPS_PER_GROUP`` units, keeping a multiple of ``blocks[g]`` units or
    the whole group) adds the least damage per cost saved (first order:
    ``saved_per_unit`` per unit); a group keeps at least ``floors[g]`` units.
    ``meets`` is called with exact costs only a logarithmic number of times."""
    sensitivity = sensitivity.monotone()
    choices = [_zero_choices(*args) for args in zip(sizes, floors, blocks, strict=True)]
    at = [0] * len(sizes)  # index into choices[g]
    moves: list[tuple[int, int]] = []  # (group, zero count after the move)
    while True:
        best, best_rate = None, math.inf
        for g, size in enumerate(sizes):
            if at[g] + 1 >= len(choices[g]) or saved_per_unit[g] <= 0:
                continue
            now, nxt = choices[g][at[g]], choices[g][at[g] + 1]
            added = sensitivity.at(g, nxt / size) - sensitivity.at(g, now / size)
            rate = max(added, 0.0) / (saved_per_unit[g] * (nxt - now))
            if rate < best_rate:
                best, best_rate = g, rate
        if best is None:
            break
        at[best] += 1
        moves.append((best, choices[best][at[best]]))

    def counts(n: int) -> list[int]:
        out = [0] * len(sizes)
        for g, z in moves[:n]:
            out[g] = z
        return out

    lo, hi = 0, len(moves)
    while lo < hi:
        mid = (lo + hi) // 2
        if meets(counts(mid)):
            hi = mid
        else:
            lo = mid + 1
    return counts(lo)


def _zero_choices(size: int, floor: int, block: int) -> list[int]:
    """The zero counts a group may take, ascending from 0: each keeps a multiple of
    ``block`` units and at least ``floor``, spaced at least ``size / STEPS_PER_GROUP``."""
    least_kept = kept_in_blocks(max(1, floor), size, block)
    kept = sorted(range(least_kept, size, block), reverse=True)
    spacing = max(1, math.ceil(size / STEPS_PER_GROUP))
    out = [0]
    for k in kept:
        if size - k - out[-1] >= spacing:
            out.append(size - k)
    if kept and out[-1] != size - least_kept:
        out.append(size - least_kept)
    return out
