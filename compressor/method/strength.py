"""Penalty weights ``lambda`` from the recipe, and the prox parameter ``mu = lambda / beta``.

RVSM minimises ``f(w) + lambda P(u) + beta/2 ||w - u||^2``; the thresholding step
is ``u = prox_{P, mu}(w)`` with ``mu = lambda / beta`` (Dinh & Xin), so while
``beta`` grows the threshold falls as ``1 / beta`` and the penalty's weight
stays ``lambda``. Two ways to give ``lambda``:

* ``lambda`` keys (the papers' parametrisation): individual ``lambda`` as is;
  group ``lambda_g = lambda * c_g`` with ``c_g = sqrt(|g|)`` (``weighting: size``,
  ``|g|`` the number of weights removing one unit of the group removes: its
  rows in every member tensor and its columns in every consumer) applied once.
  ``uniform`` gives ``c_g = 1``, ``macs`` the MACs one unit saves to the power
  ``MACS_WEIGHT_EXPONENT`` (mean 1 over units).
* ``strength`` keys (scale-free): the coupling pulls a kept weight toward its
  thresholded copy by ``beta_t mu_t = lambda`` per unit of learning rate, so
  over the run the pull adds up to ``lambda * B`` with
  ``B = sum_t lr_t / (1 - momentum)`` (:func:`pull_budget`). A strength ``s``
  means "pull a typical weight (or unit) by ``s`` times its own size over the
  run": individual ``lambda = s / B`` on weights measured in units of their
  tensor's ``mean|W|`` (so L0 and TL1, whose thresholds grow like
  ``sqrt(mu)``, are scale-free too), group ``lambda_g = s c_g ref_g / B`` with
  ``ref_g`` the group's median unit norm at the start and ``c_g`` with mean 1.

So ``lambda = strength * size / B``: the two agree when the ``lambda`` key is
set to that value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from compressor.groups import ChannelGroups

MIN_BUDGET = 0.5  # see pull_budget
# ``macs`` weighting uses (MACs one unit saves) ** this: 1 would spend the whole penalty on
# the high-resolution residual stream, whose few channels every block reads. On the
# benchmark's ResNet-20 (two seeds each) 0.25 gave 92.45% at 4.66x and 91.62% at 8.72x
# fewer MACs, 0.5 gave 92.27% and 91.63%, and uniform (0) 92.42% and 91.03%.
MACS_WEIGHT_EXPONENT = 0.25
WEIGHTINGS = ("auto", "uniform", "size", "macs")


def pull_budget(
    *, lr: float, momentum: float, schedule: str, total_steps: int, optimizer: str = "sgd"
) -> float:
    """``B = sum_t lr_t / (1 - momentum)``: the total displacement per unit of ``lambda``.

    Uses the learning-rate schedule of ``train.make_scheduler``; for Adam(W) the
    momentum factor is left out. Bounded below by ``MIN_BUDGET`` so that a run too
    short to pull anything does not get a threshold above the weights' own size.
    """
    from compressor.train import lr_factor

    total = max(1, total_steps)
    budget = sum(lr * lr_factor(schedule, step, total) for step in range(total))
    if optimizer == "sgd" and momentum < 1:
        budget /= 1.0 - momentum
    return max(budget, MIN_BUDGET)


def resolve_group_weighting(weighting: str, *, macs_target: bool, raw_lambda: bool) -> str:
    """What ``auto`` stands for: ``size`` with ``lambda`` keys (the papers), ``macs`` with a
    MACs target (high-resolution channels cost most per unit of norm), else ``uniform``."""
    if weighting != "auto":
        return weighting
    if raw_lambda:
        return "size"
    return "macs" if macs_target else "uniform"


def group_weights(groups: ChannelGroups, weighting: str) -> torch.Tensor:
    """``c_g`` per group: ``size``: ``sqrt(|g|)`` (not normalised, as in the papers);
    ``macs``: MACs per unit ** ``MACS_WEIGHT_EXPONENT``, mean 1 over units; ``uniform``: 1."""
    if weighting == "size":
        return torch.tensor(
            [math.sqrt(n) for n in groups.weights_removed_per_unit()], dtype=torch.float64
        )
    if weighting == "uniform":
        return torch.ones(len(groups), dtype=torch.float64)
    if weighting != "macs":
        raise ValueError(f"unknown group weighting {weighting!r}")
    w = torch.tensor(groups.macs_per_channel(), dtype=torch.float64).clamp_min(1e-12)
    w = w**MACS_WEIGHT_EXPONENT
    if len(w) == 0:
        return w
    sizes = torch.tensor([g.size for g in groups], dtype=torch.float64)
    return w / ((w * sizes).sum() / sizes.sum())


def reference_norms(groups: ChannelGroups, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``ref_g``: each group's median unit norm (its mean where the median is 0)."""
    out = []
    for n in groups.channel_norms(tensors):
        median = float(n.median()) if len(n) else 0.0
        out.append(median if median > 0 else float(n.mean()) + 1e-12 if len(n) else 1.0)
    return torch.tensor(out, dtype=torch.float64)


@dataclass(frozen=True)
class IndividualThresholds:
    """Per tensor: ``mu``, TL1 ``a`` and the scale the penalty measures weights in."""

    mu: Mapping[str, float]
    a: Mapping[str, float]
    scale: Mapping[str, float]


@dataclass(frozen=True)
class Lambdas:
    """The penalty weights of a run: ``mu_t = lambda / beta_t`` at every step."""

    individual_kind: str
    individual: float  # lambda of the individual term (on scaled weights with strength keys)
    a: float
    tensor_scale: Mapping[str, float]  # name -> s (1 with lambda keys)
    group: torch.Tensor  # lambda_g per group

    @classmethod
    def from_recipe(
        cls,
        penalty,
        *,
        model: nn.Module,
        groups: ChannelGroups,
        individual_names: list[str],
        weights: torch.Tensor,
        budget: float,
    ) -> Lambdas:
        """``penalty`` is the recipe's penalty section (typed config); ``weights`` the ``c_g``."""
        ind, grp = penalty.individual, penalty.group
        params = dict(model.named_parameters())
        if ind.lam is not None:
            individual, scale = float(ind.lam), {n: 1.0 for n in individual_names}
        else:
            individual = ind.strength / budget
            scale = {n: float(params[n].detach().abs().mean()) + 1e-12 for n in individual_names}
        if grp.lam is not None:
            group = grp.lam * weights
        else:
            group = grp.strength * weights * reference_norms(groups, params) / budget
        if ind.kind == "none":
            individual, scale = 0.0, {}
        return cls(ind.kind, individual, ind.a, scale, group)

    def individual_thresholds(self, beta: float) -> IndividualThresholds:
        mu = {n: self.individual / beta for n in self.tensor_scale} if self.individual else {}
        return IndividualThresholds(mu, {n: self.a for n in self.tensor_scale}, self.tensor_scale)

    def group_mu(self, beta: float) -> torch.Tensor:
        return self.group / beta
