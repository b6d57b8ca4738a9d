"""Penalty strengths that mean the same thing on every model, and the target controller.

A raw ``lambda`` is not portable (docs/math.md, "Strength"): in RVSM the
coupling ``beta (w - u)`` pulls every penalised weight toward its thresholded
copy, and over a run that pull adds up to about
``mu * sum_t(beta_t * lr_t) / (1 - momentum)``: it grows with the learning
rate, the momentum, the number of steps and beta. Recipes therefore state
strength as the *total pull over the run*, in units of the weights themselves:

* individual ``strength`` s: the penalty acts on each tensor's weights in units
  of their typical size, ``P(W / mean|W|)`` (``mean|W|`` measured at the start;
  this makes L0 and TL1, whose thresholds grow like ``sqrt(mu)``, scale-free
  too), with ``mu = s / budget``, where ``budget = sum_t(beta_t lr_t) / (1 -
  momentum)`` (see :func:`coupling_budget`); s = 1 means a weight of typical
  size that the loss does not defend is pulled all the way to zero by the end
  of training. TL1's ``a`` is then relative to ``mean|W|`` as well.
* group ``strength`` s: ``mu_g = s * c_g * ref_g / budget``, with ``ref_g`` the
  median unit norm of group ``g`` at the start and ``c_g`` the group weighting
  (``size``: sqrt(|g|), ``macs``: the MACs one unit saves to the power 0.25, ``uniform``:
  1; normalised to mean 1; ``auto``, the default: ``macs`` with a MACs target,
  else ``uniform``).

``lambda`` keys keep the papers' parametrisation: ``mu = lambda / beta`` and
``mu_g = lambda_g sqrt(|g|) / beta`` (times the MACs weight when asked).

With a target (``--target-macs 4``) a ``TargetController`` decides which units
are zero: it follows a cubic schedule (Zhu & Gupta 2017) of the cost to remove,
reaching the target at ``reach_fraction`` of training; each update it ranks
units by ``||w_gu|| / (c_g ref_g)`` (recipe ``target.importance: magnitude``;
``taylor``: by the first-order loss change of removing the unit, divided by
``c_g``) and zeroes the lowest ones until their
removal meets the schedule, every group keeping at least ``balance`` times the
share of units a uniform ratio would keep. The pipeline holds the chosen units
at exactly zero in ``w`` (``RVSM.hold_zero``; recipe ``target.hold``: from the
step they are chosen, or once frozen), and the kept units are not shrunk
(unless ``target.shrink``). Once reached, the zero set is frozen, so the rest
of training fine-tunes the network that will ship.

Several targets at once (``--target-macs 2 --target-params 3``, a size target
counted in params) are one :class:`CostTargets`: the single place that says how
far a candidate zero set is from each target (``gaps``) and how far from all of
them (``attainment``, the least-met target's reached / asked). The controller
grows the zero set until every target meets its schedule.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.groups import ChannelGroups
from compressor.splitting import Thresholds

log = logging.getLogger(__name__)

MIN_BUDGET = 4.0  # see coupling_budget
MIN_KEEP_FRACTION = 0.05  # a target never empties a group below this fraction of its units
# ``macs`` weighting uses (MACs one unit saves) ** this: 1 would spend the whole penalty on
# the high-resolution residual stream, whose few channels every block reads. On the
# benchmark's ResNet-20 (two seeds each) 0.25 gave 92.45% at 4.66x and 91.62% at 8.72x
# fewer MACs, 0.5 gave 92.27% and 91.63%, and uniform (0) 92.42% and 91.03%.
MACS_WEIGHT_EXPONENT = 0.25
# When the next unit in rank order would overshoot the scheduled factor by more than this,
# the controller skips it for later-ranked, cheaper units (see TargetController.update).
OVERSHOOT_TOLERANCE = 0.02
REFINE_CANDIDATES = 64
IMPORTANCES = ("magnitude", "taylor")
TAYLOR_DECAY = 0.9  # per step: the Taylor scores average over about the last 10 batches
TAYLOR_WARMUP = 10  # batches observed before the Taylor ranking zeroes its first unit
# (at most a third of the steps to the target, so short runs still reach it)


def coupling_budget(
    *,
    lr: float,
    momentum: float,
    schedule: str,
    steps_per_epoch: int,
    epochs: int,
    beta: float,
    beta_growth: float,
    beta_every: int,
    optimizer: str = "sgd",
) -> float:
    """``sum_t(beta_t * lr_t) / (1 - momentum)``: how far the coupling can pull a weight per unit gap.

    Uses the same learning-rate schedule as ``train.make_scheduler``. For Adam(W)
    the momentum factor is left out (its steps are normalised per coordinate).
    """
    from compressor.train import lr_factor

    total = max(1, steps_per_epoch * epochs)
    budget = 0.0
    for step in range(total):
        epoch = step // max(1, steps_per_epoch)
        beta_t = beta * beta_growth ** (epoch // beta_every)
        budget += beta_t * lr * lr_factor(schedule, step, total)
    if optimizer == "sgd" and momentum < 1:
        budget /= 1.0 - momentum
    # The prox threshold is mu itself: a run too short to pull anything would
    # otherwise get a threshold above the weights' own size and zero them all.
    return max(budget, MIN_BUDGET)


def mu_for_threshold(kind: str, threshold: float, a: float = 1.0) -> float:
    """The prox parameter ``mu`` whose zeroing threshold on ``|y|`` is ``threshold``.

    l1: t = mu; l0: t = sqrt(2 mu); l1-l2: t = mu (alpha = 1); tl1 (Zhang & Xin):
    t = mu (a+1)/a when mu <= a^2 / (2(a+1)), else t = sqrt(2 mu (a+1)) - a/2.
    """
    t = float(threshold)
    if kind in ("l1", "l1-l2"):
        return t
    if kind == "l0":
        return t * t / 2
    if kind == "tl1":
        mu = t * a / (a + 1)
        if mu <= a * a / (2 * (a + 1)):
            return mu
        return (t + a / 2) ** 2 / (2 * (a + 1))
    raise ValueError(f"no threshold for penalty kind {kind!r}")


def resolve_group_weighting(weighting: str, target_kind: str | None) -> str:
    """The weighting ``auto`` stands for: ``macs`` with a MACs target, else ``uniform``.

    With a MACs target the controller ranks units by norm per unit of MACs
    saved, so channels of the high-resolution layers (few params, many MACs)
    go first and the cheap low-resolution ones stay: on the benchmark's
    ResNet-20 this gained 0.6 points at 8.7x fewer MACs over ``uniform`` (two
    seeds, ``benchmarks/RESULTS.md``). Other targets and the accuracy seeker
    (``target_kind`` None) keep ``uniform`` (scores relative to each group's
    median norm): the seeker judges each stage by the sparse model's accuracy
    before it is fine-tuned, which the high-resolution channels cost most
    (bundled example, ``--max-accuracy-drop 1``: 1.82x with ``macs``, 2.06x
    with ``uniform``).
    """
    if weighting != "auto":
        return weighting
    return "macs" if target_kind == "macs" else "uniform"


def group_weights(groups: ChannelGroups, weighting: str) -> torch.Tensor:
    """Per-group weight ``c_g``, normalised to mean 1 over units."""
    if weighting == "size":
        w = torch.tensor([math.sqrt(g.weights_per_channel) for g in groups], dtype=torch.float64)
    elif weighting == "macs":
        w = torch.tensor(groups.macs_per_channel(), dtype=torch.float64).clamp_min(1e-12)
        w = w**MACS_WEIGHT_EXPONENT
    elif weighting == "uniform":
        w = torch.ones(len(groups), dtype=torch.float64)
    else:
        raise ValueError(f"unknown group weighting {weighting!r}")
    sizes = torch.tensor([g.size for g in groups], dtype=torch.float64)
    if len(w) == 0:
        return w
    return w / ((w * sizes).sum() / sizes.sum())


@dataclass
class Strength:
    """Computes the prox thresholds of each step from the recipe's strengths.

    Build it with ``Strength.from_recipe`` before training (it measures the
    starting weights). ``group_strength`` may be changed during training (the
    target controller does).
    """

    individual_kind: str
    individual_strength: float | None
    individual_lambda: float | None
    a: float
    group_strength: float | None
    group_lambda: float | None
    weights: torch.Tensor  # c_g per group
    ref: torch.Tensor  # ref_g per group (median unit norm at start)
    sqrt_sizes: torch.Tensor
    tensor_scale: dict[str, float]  # mean |W| per individually penalised tensor
    unit_sizes: list[int]
    weighting: str = "uniform"  # the c_g rule (group_weights)
    budget: float = 1.0  # coupling_budget(...) of the run
    forced_zero: list[torch.Tensor] | None = None  # units the target controller zeroes
    frozen: bool = False  # target reached: survivors are no longer shrunk
    shrink_kept: bool = True  # False: with a target, only the controller's zero units are shrunk
    history: list[dict] = field(default_factory=list)

    @classmethod
    def from_recipe(
        cls,
        penalty: Mapping,
        model: nn.Module,
        groups: ChannelGroups,
        individual_names: list[str],
        budget: float = 1.0,
    ) -> Strength:
        ind, grp = penalty["individual"], penalty["group"]
        weighting = grp.get("weighting", "size")
        params = dict(model.named_parameters())
        norms = groups.channel_norms(params)
        ref = torch.tensor(
            [
                float(n.median()) if float(n.median()) > 0 else float(n.mean()) + 1e-12
                for n in norms
            ],
            dtype=torch.float64,
        )
        scale = {n: float(params[n].detach().abs().mean()) + 1e-12 for n in individual_names}
        return cls(
            individual_kind=ind["kind"],
            individual_strength=ind.get("strength"),
            individual_lambda=ind.get("lambda"),
            a=float(ind.get("a", 1.0)),
            group_strength=grp.get("strength"),
            group_lambda=grp.get("lambda"),
            weights=group_weights(groups, weighting),
            weighting=weighting,
            ref=ref,
            sqrt_sizes=torch.tensor(
                [math.sqrt(g.weights_per_channel) for g in groups], dtype=torch.float64
            ),
            tensor_scale=scale,
            unit_sizes=[g.size for g in groups],
            budget=budget,
        )

    def group_mu(self, beta: float) -> list[torch.Tensor]:
        """Per group, per unit ``mu`` of the group shrink."""
        if self.group_lambda is not None:
            per_group = self.group_lambda * self.sqrt_sizes * self.weights / beta
        else:
            per_group = (self.group_strength or 0.0) * self.weights * self.ref / self.budget
        if self.frozen or not self.shrink_kept:
            per_group = torch.zeros_like(per_group)
        mus = [
            torch.full((n,), float(m), dtype=torch.float32)
            for n, m in zip(self.unit_sizes, per_group, strict=True)
        ]
        if self.forced_zero is not None:
            mus = [
                mu.masked_fill(z, float("inf")) for mu, z in zip(mus, self.forced_zero, strict=True)
            ]
        return mus

    def thresholds(self, beta: float) -> Thresholds:
        individual, a_of, scale_of = {}, {}, {}
        if self.individual_kind != "none":
            for name, scale in self.tensor_scale.items():
                a_of[name] = self.a
                if self.individual_lambda is not None:
                    individual[name] = self.individual_lambda / beta
                else:
                    individual[name] = (self.individual_strength or 0.0) / self.budget
                    scale_of[name] = scale
        return Thresholds(individual, a_of, self.group_mu(beta), scale_of)


def cubic_schedule(progress: float) -> float:
    """Fraction of the final removal reached at ``progress`` in [0, 1] (Zhu & Gupta 2017)."""
    p = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - p) ** 3


COST_MEASURES = ("macs", "params")  # what ChannelGroups.estimate_cost counts


@dataclass(frozen=True)
class Target:
    """One asked reduction: ``kind`` as the user named it (``macs``, ``params``, ``size``),
    ``factor`` (4 = 4x fewer) and the cost it is counted in (``measure``: ``macs`` or
    ``params``; a size target is counted in params, default: ``kind``)."""

    kind: str
    factor: float
    measure: str = ""

    def __post_init__(self):
        measure = self.measure or self.kind
        if measure not in COST_MEASURES:
            raise ValueError(
                f"target {self.kind!r} must be counted in one of {COST_MEASURES}, got {measure!r}"
            )
        if not self.factor >= 1:
            raise ValueError(f"target {self.kind!r} factor must be >= 1, got {self.factor!r}")
        object.__setattr__(self, "measure", measure)
        object.__setattr__(self, "factor", float(self.factor))


class CostTargets:
    """Every asked reduction at once, and how far a candidate zero set is from each.

    This is the controller's only notion of "enough": whatever chooses the zero
    set (a ranking now, penalty thresholds set from a budget later) asks
    ``attainment(masks)`` and grows the set until it is >= 1.
    """

    def __init__(self, groups: ChannelGroups, targets: Sequence[Target]):
        if not targets:
            raise ValueError("at least one target is needed")
        kinds = [t.kind for t in targets]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"each target kind may be given once, got {kinds}")
        self.groups = groups
        self.targets = list(targets)
        self.base = {"macs": float(groups.total_macs), "params": float(groups.total_params)}

    @property
    def asked(self) -> dict[str, float]:
        return {t.kind: t.factor for t in self.targets}

    def reached(self, masks: Sequence[torch.Tensor]) -> dict[str, float]:
        """Per target kind, the reduction (base cost / cost) once the ``masks`` units are removed."""
        macs, params = self.groups.estimate_cost(masks)
        cost = {"macs": macs, "params": params}
        return {t.kind: self.base[t.measure] / max(cost[t.measure], 1.0) for t in self.targets}

    def gaps(
        self, masks: Sequence[torch.Tensor], want: Mapping[str, float] | None = None
    ) -> dict[str, float]:
        """Per target kind, how far the zero set is from it: ``want / reached`` (> 1: short of it,
        <= 1: met). ``want`` defaults to the asked factors (a schedule passes its own)."""
        want = self.asked if want is None else want
        return {k: want[k] / r for k, r in self.reached(masks).items()}

    def attainment(
        self, masks: Sequence[torch.Tensor], want: Mapping[str, float] | None = None
    ) -> float:
        """``min`` over targets of ``reached / want``: >= 1 when every target is met; the
        least-met target sets it (for one target, its reached / asked)."""
        return 1.0 / max(self.gaps(masks, want).values())


class TargetController:
    """Raises the group strength until the zero units remove the asked share of MACs and/or params.

    ``kind`` is ``"macs"`` or ``"params"`` with ``factor`` the asked reduction (4 = 4x
    fewer), or a sequence of :class:`Target` (``factor`` None) to meet them all at once:
    the zero set grows until the least-met target is met. ``kind``, ``factor``,
    ``reached_factor`` and ``floor_factor`` describe the first target; ``reached`` and
    ``max_reachable`` every target.
    """

    def __init__(
        self,
        kind: str | Sequence[Target],
        factor: float | None,
        groups: ChannelGroups,
        strength: Strength,
        *,
        total_steps: int,
        reach_fraction: float = 0.3,
        schedule: str = "cubic",
        balance: float = 0.0,
        importance: str = "magnitude",
    ):
        if isinstance(kind, str):
            if kind not in COST_MEASURES:
                raise ValueError(f"target kind must be 'macs' or 'params', got {kind!r}")
            targets = [Target(kind, float(factor))]
        else:
            targets = list(kind)
        if importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
        self.costs = CostTargets(groups, targets)
        self.kind = targets[0].kind
        self.importance = importance
        # taylor: running mean of each unit's squared first-order loss change (observe_gradients)
        self.taylor: list[torch.Tensor] | None = None
        self.taylor_seen = 0  # batches folded into ``taylor``
        self.groups, self.strength = groups, strength
        self.reach_step = max(1, int(round(reach_fraction * total_steps)))
        self.taylor_warmup = min(TAYLOR_WARMUP, max(1, self.reach_step // 3))
        self.base = self.costs.base[targets[0].measure]
        if schedule not in ("cubic", "geometric", "immediate"):
            raise ValueError(
                f"schedule must be 'cubic', 'geometric' or 'immediate', got {schedule!r}"
            )
        self.schedule = schedule
        self.frozen = False
        self.threshold = 0.0  # score of the last unit zeroed
        self.reached_factor = 1.0
        self.reached = {t.kind: 1.0 for t in targets}  # every target's reduction of the zero set
        # the most each target can reach: every group keeps MIN_KEEP_FRACTION of its units
        self.max_reachable = self.costs.reached(self._floor_masks(MIN_KEEP_FRACTION))
        self.floor_factor = self.max_reachable[self.kind]
        self.balance = balance
        self.ask(self.costs.asked if factor is None else factor)

    @torch.no_grad()
    def observe_gradients(
        self, tensors: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor | None]
    ) -> None:
        """Fold one batch's ``(sum w dL/dw)^2`` per unit into the Taylor scores (``importance: taylor``).

        Molchanov et al. (CVPR 2019) average this over minibatches; here the
        average is exponential (``TAYLOR_DECAY``, bias-corrected), so the
        ranking follows the network as it adapts to the channels already gone.
        """
        terms = [t.double().cpu().square() for t in self.groups.channel_taylor(tensors, grads)]
        if self.taylor is None:
            self.taylor = [torch.zeros_like(t) for t in terms]
        for avg, t in zip(self.taylor, terms, strict=True):
            avg.mul_(TAYLOR_DECAY).add_(t, alpha=1 - TAYLOR_DECAY)
        self.taylor_seen += 1

    def _scores(self, tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per group, each unit's rank score (lowest goes first), before the balance floor.

        ``magnitude``: ``||w_gu|| / (c_g ref_g)``, the unit's norm against its
        group's median at the start. ``taylor``: ``sqrt(E[(sum w dL/dw)^2]) /
        c_g``, already in units of loss, so comparable across groups; units
        that are zero score 0 either way.
        """
        norms = self.groups.channel_norms(tensors)
        if self.importance == "taylor" and self.taylor is not None and self.taylor_seen > 0:
            weights = self.strength.weights.tolist()
            bias = 1 - TAYLOR_DECAY**self.taylor_seen  # the weight the average has gathered
            return [
                (t / bias).sqrt() * (n.double().cpu() > 0) / c
                for t, n, c in zip(self.taylor, norms, weights, strict=True)
            ]
        scale = (self.strength.weights * self.strength.ref).tolist()
        return [n.double().cpu() / s for n, s in zip(norms, scale, strict=True)]

    def ask(self, factor: float | Mapping[str, float]) -> None:
        """Aim at ``factor`` from now on: a float for the first target (the accuracy seeker
        raises it in stages), or ``{kind: factor}`` for several."""
        asked = factor if isinstance(factor, Mapping) else {self.kind: factor}
        self.costs.targets = [
            Target(t.kind, float(asked.get(t.kind, t.factor)), t.measure)
            for t in self.costs.targets
        ]
        self.factor = self.costs.asked[self.kind]
        self.keep_fraction = self._balanced_keep_fraction()

    def _factor(self, masks) -> float:
        """The first target's reduction factor (base cost / cost) once the ``masks`` units are removed."""
        return self.costs.reached(masks)[self.kind]

    def _floor_masks(self, keep_fraction: float) -> list[torch.Tensor]:
        """Every group keeps only ``keep_fraction`` of its units (at least one)."""
        masks = []
        for g in self.groups:
            m = torch.ones(g.size, dtype=torch.bool)
            m[: max(1, math.ceil(keep_fraction * g.size))] = False
            masks.append(m)
        return masks

    def _floor_factor(self, keep_fraction: float) -> float:
        """The first target's reduction when every group keeps only ``keep_fraction`` of its units."""
        return self._factor(self._floor_masks(keep_fraction))

    def _balanced_keep_fraction(self) -> float:
        """The share of its units every group keeps: ``balance`` times a uniform ratio's.

        A uniform ratio keeping ``k`` of every layer's channels cuts MACs (and
        params) by about ``1 / k^2``, so it keeps ``1 / sqrt(factor)``. Ranking
        units globally can otherwise leave a whole stage a few channels wide (a
        bottleneck no fine-tuning recovers from). Lowered, down to
        ``MIN_KEEP_FRACTION``, until the target stays reachable.
        """
        keep = self.balance / math.sqrt(max(self.costs.asked.values()))
        while keep > MIN_KEEP_FRACTION and self.costs.attainment(self._floor_masks(keep)) < 1:
            keep *= 0.9
        return max(MIN_KEEP_FRACTION, keep)

    @property
    def unreachable(self) -> dict[str, float]:
        """``{kind: max_reachable}`` of each target beyond what removing channels can give."""
        return {
            k: self.max_reachable[k]
            for k, f in self.costs.asked.items()
            if f > self.max_reachable[k] * 1.0000001
        }

    @property
    def reachable(self) -> bool:
        """Every target can be met (then all at once: the floor zero set meets each)."""
        return not self.unreachable

    def scheduled_factor(self, step: int) -> float:
        """The reduction factor the zero set should give at ``step``.

        ``cubic``: the removed share of the cost follows Zhu & Gupta's cubic ramp
        (fast early, gentle near the target). ``geometric``: the factor grows by
        the same ratio every step. ``immediate``: the factor itself (the accuracy
        seeker raises it in stages).
        """
        return self.scheduled(step)[self.kind]

    def scheduled(self, step: int) -> dict[str, float]:
        """Every target's scheduled reduction at ``step`` (see :meth:`scheduled_factor`)."""
        out = {}
        for kind, factor in self.costs.asked.items():
            if self.schedule == "immediate":
                out[kind] = factor
            elif self.schedule == "geometric":
                progress = min(max(step / self.reach_step, 0.0), 1.0)
                out[kind] = factor**progress
            else:
                removed = (1.0 - 1.0 / factor) * cubic_schedule(step / self.reach_step)
                out[kind] = min(1.0 / (1.0 - removed), factor)
        return out

    def _refine(self, order, k, finite, sizes, want) -> list[torch.Tensor] | None:
        """A zero set that meets every ``want`` without overshooting the least-met one by more
        than the tolerance.

        The first ``k - 1`` units in rank order, then later-ranked units one at a
        time (at most ``REFINE_CANDIDATES``), skipping any whose removal alone
        would overshoot: one channel of a high-resolution stream can remove a
        large share of the MACs, so the plain rank order may land well past the
        target. None when no such set is found.
        """
        flat = torch.zeros(sum(sizes), dtype=torch.bool)
        flat[order[: k - 1]] = True
        limit = 1 + OVERSHOOT_TOLERANCE
        for unit in order[k - 1 : min(finite, k - 1 + REFINE_CANDIDATES)].tolist():
            flat[unit] = True
            masks = list(torch.split(flat.clone(), sizes))
            attained = self.costs.attainment(masks, want)
            if attained > limit:
                flat[unit] = False
            elif attained >= 1:
                return masks
        return None

    def _record(self, masks: Sequence[torch.Tensor]) -> None:
        self.reached = self.costs.reached(masks)
        self.reached_factor = self.reached[self.kind]

    def freeze(self, masks: list[torch.Tensor] | None = None) -> None:
        """Stop raising the strength; keep ``masks`` (default: the current zero set) as the zero set."""
        if masks is not None:
            self.strength.forced_zero = [m.clone() for m in masks]
            self._record(self.strength.forced_zero)
        self.frozen = True
        self.strength.frozen = True

    @torch.no_grad()
    def update(self, step: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Set the group strength so that zero units meet the schedule at ``step``.

        ``tensors`` are the weights the group prox will see (after the
        individual prox). The chosen zero set is imposed as a mask (so the
        estimate is exact whatever the prox does to the other units); after
        ``reach_step`` it is frozen and survivors are no longer shrunk.
        """
        if self.frozen:
            return
        want = self.scheduled(step)
        warming_up = self.importance == "taylor" and self.taylor_seen < self.taylor_warmup
        if warming_up:
            want = dict.fromkeys(want, 1.0)  # too few batches for a ranking: remove nothing yet
        scores = self._scores(tensors)
        for sc in scores:  # every group keeps keep_fraction of its units
            keep = max(1, math.ceil(self.keep_fraction * len(sc)))
            sc[torch.topk(sc, keep).indices] = float("inf")
        flat = torch.cat(scores)
        # rank units (ties broken by position, so equal scores still zero one at a time)
        order = torch.sort(flat, stable=True)
        rank = torch.empty_like(order.indices)
        rank[order.indices] = torch.arange(len(flat))
        ranks = torch.split(rank, [len(sc) for sc in scores])
        finite = int(torch.isfinite(order.values).sum())

        def masks_at(k: int) -> list[torch.Tensor]:
            return [r < k for r in ranks]

        def met(k: int) -> bool:
            return self.costs.attainment(masks_at(k), want) >= 1

        lo, hi = 0, finite  # smallest k whose zero set meets every ``want``
        if not met(hi):
            lo = hi
        else:
            while lo < hi:
                mid = (lo + hi) // 2
                if met(mid):
                    hi = mid
                else:
                    lo = mid + 1
        k = lo
        threshold = float(order.values[k - 1]) if k > 0 else 0.0
        masks = masks_at(k)
        if k > 0 and self.costs.attainment(masks, want) > 1 + OVERSHOOT_TOLERANCE:
            refined = self._refine(order.indices, k, finite, [len(sc) for sc in scores], want)
            if refined is not None:
                masks = refined
        self.threshold = threshold
        self.strength.forced_zero = masks
        self._record(masks)
        if step >= self.reach_step and self.schedule != "immediate" and not warming_up:
            self.frozen = True
            self.strength.frozen = True
            log.info(
                "target %s reached %s at step %d; zero set frozen",
                ", ".join(f"{f:.2f}x {k}" for k, f in self.costs.asked.items()),
                ", ".join(f"{f:.3f}x {k}" for k, f in self.reached.items()),
                step,
            )
