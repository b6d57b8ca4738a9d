"""The method: RVSM fine-tuning under the sparse group penalty, in one package.

* :mod:`~compressor.method.penalties` — elementwise proximal operators (pure functions);
* :mod:`~compressor.method.group_terms` — the group terms and their registry;
* :mod:`~compressor.method.kernels` — fused (``torch.compile``) coupling and TL1 prox;
* :mod:`~compressor.method.splitting` — the RVSM state ``u`` and ``beta``;
* :mod:`~compressor.method.strength` — ``lambda`` from the recipe, ``mu = lambda / beta``;
* :mod:`~compressor.method.budget` — targets as the group prox's thresholds;
* :mod:`~compressor.method.seeker` — the accuracy seeker (sets the budget);
* :mod:`~compressor.method.training` — :class:`SparseTraining`, the one object the
  training loop calls.

:func:`build` makes that object from the typed recipe; adding a penalty is one
class and one registry entry (``@register_group_term``) plus a recipe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compressor.errors import BadInputError
from compressor.groups import ChannelGroups
from compressor.method.budget import MIN_KEEP_FRACTION, BudgetController, Target, resolve_balance
from compressor.method.group_terms import GROUP_TERMS, group_term
from compressor.method.seeker import AccuracySeeker, Reading
from compressor.method.splitting import RVSM
from compressor.method.strength import (
    Lambdas,
    group_weights,
    pull_budget,
    reference_norms,
    resolve_group_weighting,
)
from compressor.method.training import SparseTraining

__all__ = ["Reading", "SeekHooks", "SparseTraining", "Target", "build", "targets_from_recipe"]

# The accuracy seeker's stages span at least this share of training: each stage needs
# steps for the network to adapt before its accuracy check.
SEEK_MIN_FRACTION = 0.6
SEEK_STAGES = 8


@dataclass(frozen=True)
class SeekHooks:
    """What the accuracy seeker needs from the pipeline: the sparse model's accuracy, the
    baseline's, and a way to save and put back the model's and the optimizer's state."""

    evaluate: Callable[[], Reading]  # the sparse model's score and its drop's stderr
    baseline_accuracy: float
    snapshot: Callable[[], dict]
    restore: Callable[..., object]  # (saved) or, rollback "channels", (saved, unit masks)


def targets_from_recipe(target, baseline: dict, latency=None) -> list[Target]:
    """The recipe's targets (``target.macs``, ``.params``, ``.size``, ``.latency``); a size in
    bytes is costed in params, as the factor of the baseline's ONNX bytes over it; a latency
    in ms as the factor of the baseline's measured latency (``latency``, the calibrated
    :class:`compressor.latency_model.LatencyModel`) over it."""
    targets = []
    if target.macs is not None:
        targets.append(Target("macs", float(target.macs), float(target.macs)))
    if target.params is not None:
        targets.append(Target("params", float(target.params), float(target.params)))
    if target.size is not None:
        base_bytes = baseline.get("onnx_bytes") or 4 * baseline["params"]
        factor = max(1.0 + 1e-9, base_bytes / float(target.size))
        targets.append(Target("size", factor, float(target.size)))
    if target.latency is not None:
        if latency is None:
            raise ValueError("target.latency needs the calibrated latency model")
        factor = max(1.0 + 1e-9, latency.base_ms / float(target.latency))
        targets.append(Target("latency", factor, float(target.latency)))
    return targets


def unreachable_message(budget: BudgetController, baseline: dict) -> str:
    """Exit 2 before training: which target removing channels cannot reach, and what can be."""
    most = budget.floor_factors()
    parts = []
    for t in budget.unreachable:
        if t.kind == "size":
            base_bytes = baseline.get("onnx_bytes") or 4 * baseline["params"]
            smallest = math.ceil(base_bytes / most["params"])
            parts.append(
                f"--target-size {t.asked:g} (target.size, bytes) asks for a {t.factor:.2f}x smaller "
                f"model, but removing channels reaches at most {most['params']:.2f}x fewer params "
                f"here, about {smallest} bytes: pass --target-size {smallest} or more"
            )
        elif t.kind == "latency":
            fastest = budget.base["latency"] / most["latency"]
            parts.append(
                f"--target-latency {t.asked:g} (target.latency, ms) asks for {t.factor:.2f}x the "
                f"speed of the baseline's {budget.base['latency']:.3g} ms here, but removing "
                f"channels reaches about {fastest:.3g} ms (the latency model calibrated on "
                f"this machine): pass --target-latency {math.ceil(fastest * 1.05 * 100) / 100:g} "
                "or more"
            )
        else:
            words = "MACs" if t.kind == "macs" else "params"
            parts.append(
                f"--target-{t.kind} {t.asked:g} (target.{t.kind}) asks for {t.factor:.2f}x fewer "
                f"{words}, but removing channels reaches at most {most[t.cost]:.2f}x here: pass "
                f"--target-{t.kind} {math.floor(most[t.cost] * 100) / 100:g} or less"
            )
    return (
        "; ".join(parts) + f". (Every layer keeps at least {MIN_KEEP_FRACTION:.0%} of its "
        "channels, and prune.keep layers keep all.) Nothing was trained."
    )


def build(
    recipe,
    model: nn.Module,
    groups: ChannelGroups,
    *,
    total_steps: int,
    baseline: dict,
    seek: SeekHooks | None = None,
    latency=None,
    latency_probe=None,
    round_to: int = 1,
    sensitivity=None,
) -> SparseTraining:
    """The :class:`SparseTraining` of a run, with ``u0 = prox(w0)`` computed.

    ``recipe`` is the typed recipe (:class:`compressor.config.Recipe`). With targets,
    a budget sets the group thresholds; without, and with ``seek`` and
    ``target.seek_accuracy_drop``, the accuracy seeker sets the budget's MACs
    target; otherwise ``lambda / beta`` alone does. ``sensitivity`` (a
    :class:`~compressor.method.allocation.Sensitivity`, ``target.allocation:
    sensitivity``) caps how many units the budget takes from each group. Raises ``BadInputError``
    (exit 2) when a target is beyond what removing channels can reach.
    """
    pen, tgt = recipe.penalty, recipe.target
    rvsm = _splitting(recipe, model, groups)
    targets = targets_from_recipe(tgt, baseline, latency)
    weighting = resolve_group_weighting(
        pen.group.weighting,
        macs_target=any(t.kind == "macs" for t in targets),
        raw_lambda=pen.group.lam is not None,
    )
    weights = group_weights(groups, weighting)
    lambdas = _lambdas(recipe, model, groups, rvsm, weights, total_steps)
    scale = weights * reference_norms(groups, dict(model.named_parameters()))
    budget = seeker = None
    if targets:
        budget = BudgetController(
            targets,
            groups,
            scale,
            total_steps=total_steps,
            reach_fraction=tgt.reach_fraction,
            balance=resolve_balance(tgt.balance, seeking=False),
            round_to=round_to,
            latency=latency,
            latency_probe=latency_probe,
            sensitivity=sensitivity,
        )
        if budget.unreachable:
            raise BadInputError(unreachable_message(budget, baseline))
    elif seek is not None and tgt.seek_accuracy_drop is not None and len(groups) > 0:
        seeker = _seeker(
            recipe, groups, scale, seek, total_steps=total_steps, round_to=round_to,
            sensitivity=sensitivity,
        )  # fmt: skip
        budget = seeker.budget
    term = GROUP_TERMS[pen.group.kind]
    term_params = {name: getattr(pen.group, name) for name in term.parameters}
    method = SparseTraining(
        model,
        groups,
        rvsm,
        lambdas,
        group_term(pen.group.kind, **term_params),
        scale=scale,
        budget=budget,
        seeker=seeker,
        weighting=weighting,
    )
    with torch.no_grad():
        method.prox(0)  # u0 = prox(w0)
    return method


def _splitting(recipe, model: nn.Module, groups: ChannelGroups) -> RVSM:
    """The RVSM state (``u``, ``beta`` and its growth) the recipe's penalty and splitting name."""
    pen, spl = recipe.penalty, recipe.splitting
    return RVSM(
        model,
        groups,
        individual_kind=pen.individual.kind,
        alpha=pen.individual.alpha,
        beta=spl.beta,
        beta_growth=spl.beta_growth,
        beta_every=spl.beta_every,
        prox_every=spl.prox_every,
        fused=spl.fused,
    )


def _lambdas(recipe, model, groups, rvsm: RVSM, weights, total_steps: int) -> Lambdas:
    """``lambda`` of the individual and group terms, from the recipe's strengths and the pull
    the training schedule can exert (:func:`~compressor.method.strength.pull_budget`)."""
    tcfg = recipe.train
    return Lambdas.from_recipe(
        recipe.penalty,
        model=model,
        groups=groups,
        individual_names=rvsm.individual_names,
        weights=weights,
        budget=pull_budget(
            lr=tcfg.lr,
            momentum=tcfg.momentum,
            schedule=tcfg.schedule,
            total_steps=total_steps,
            optimizer=tcfg.optimizer,
        ),
    )


def _seeker(
    recipe, groups, scale, seek: SeekHooks, *, total_steps: int, round_to: int, sensitivity=None
) -> AccuracySeeker:
    """The accuracy seeker and the MACs budget it sets (no target given, an allowance given).

    With binarized activations the stages start once the activation switch ends (t = 1;
    :class:`compressor.activations.ActivationSwitch`, same step count), so every check
    judges the quantised model; they span the reach share of what is left."""
    tgt, act = recipe.target, recipe.activations
    start = round(act.switch_fraction * total_steps) if act.binarize else 0
    reach = max(tgt.reach_fraction, SEEK_MIN_FRACTION)
    budget = BudgetController(
        [Target("macs", 1.0, 1.0)],  # nothing until the seeker begins (after any switch)
        groups,
        scale,
        total_steps=total_steps,
        reach_fraction=(start + reach * (total_steps - start)) / total_steps,
        balance=resolve_balance(tgt.balance, seeking=True),
        round_to=round_to,
        schedule="immediate",
        sensitivity=sensitivity,
    )
    return AccuracySeeker(
        budget,
        stages=SEEK_STAGES,
        evaluate=seek.evaluate,
        baseline_accuracy=seek.baseline_accuracy,
        max_drop=tgt.seek_accuracy_drop,
        snapshot=seek.snapshot,
        restore=seek.restore,
        start_step=start,
        margin=tgt.seek_margin,
        rollback=tgt.seek_rollback,
    )
