"""The accuracy seeker: the largest MACs reduction whose sparse model stays within a budget.

It only sets the budget's MACs target (:class:`BudgetController`), which only
sets the group prox's thresholds: the channels that die are still the prox's.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch

from compressor.method.budget import BudgetController, Target

log = logging.getLogger(__name__)

ROLLBACKS = ("model", "channels")


class Reading(NamedTuple):
    """One check of the sparse model: its score (higher is better) and the standard error of
    its drop from the input model (0: the task has no per-sample scores)."""

    score: float
    stderr: float = 0.0


class AccuracySeeker:
    """Raises the MACs reduction in stages while the sparse model stays within ``max_drop``.

    The reach part of training is split into ``stages``; each stage asks the
    budget for ``growth`` times the last good stage's reduction. At the end of
    a stage the sparse model is evaluated (``evaluate()``, after BatchNorm
    recalibration): within ``max_drop`` points of the baseline, ``margin`` standard
    errors of the measured drop included, the zero set is
    kept (and the model state saved with ``snapshot()``) and the next stage
    begins; over budget, the model is put back to the last state within budget
    (``restore(saved)``) and the next stage tries half the step (in log scale:
    ``growth`` becomes its square root), a bisection between the last good
    reduction and the failed one. A check comes soon after the zero set changed,
    before the network has adapted to it, so a stage over budget first gets
    ``patience`` more stages at the same reduction before it counts as failed. Once the step is below ``min_growth`` or the
    reach part of training is over, the last good zero set is frozen, so the
    rest of training recovers accuracy.

    ``rollback`` says what going back to the last state within budget means:
    ``"model"`` restores the whole saved state (every weight as it was at that check);
    ``"channels"`` calls ``restore(saved, units)`` with the units zeroed since that check
    and puts back only their slices, so the rest of the network keeps what it learned
    since (with a quantised model most of that is adapting to the quantised activations,
    which a whole-model rollback throws away).

    ``evaluate()`` returns a :class:`Reading`: the score and the standard error of
    the drop measured on the validation split (paired per sample with the input model,
    :func:`compressor.metrics.paired_mean_and_stderr`). A check within the allowance by
    less than its own noise would often be over it on new data: a stage counts as within
    when ``drop + margin * stderr <= max_drop`` (a one-sided bound at about 84% for
    ``margin = 1``).

    The stages span the steps after ``start_step`` up to the budget's
    ``reach_step``. With binarized activations ``start_step`` is the step at
    which the activation switch ends (``t = 1``, BatchNorm recalibrated): until
    then the model is part full precision, and a check would judge a model that
    is not the one that ships. The seeker begins (first ask, first snapshot) at
    the first step after ``start_step``; ``start_step = 0``: at construction.

    A model that begins after ``start_step`` is not the input model (its activations
    are quantised), so the seeker first checks it. Over the allowance, there is no room
    to prune yet: the seeker asks for nothing and saves nothing, and checks again at
    the end of each stage while training recovers from the switch; the first check
    within it begins the raising. (Asking anyway would have every check fail on the
    quantisation's own cost, and each rollback would throw away the recovery trained
    since the switch.) ``start_step = 0``: the input model, within by definition.
    """

    def __init__(
        self, budget: BudgetController, *, stages, evaluate, baseline_accuracy, max_drop,
        growth=1.3, min_growth=1.05, snapshot=None, restore=None, patience=1, start_step=0,
        margin=0.0, rollback="model",
    ):  # fmt: skip
        if rollback not in ROLLBACKS:
            raise ValueError(f"rollback must be one of {ROLLBACKS}, not {rollback!r}")
        self.rollback = rollback
        self.budget = budget
        self.snapshot, self.restore = snapshot, restore
        self.saved = None
        self.start_step = int(start_step)
        # the step it begins at: the first after start_step (0: at construction)
        self.begin_step = self.start_step + 1 if self.start_step > 0 else 0
        self.every = max(1, (budget.reach_step - self.begin_step) // stages)
        self.evaluate = evaluate
        self.baseline_accuracy = baseline_accuracy
        self.max_drop = max_drop
        self.margin = float(margin)
        self.growth, self.min_growth = growth, min_growth
        self.ceiling = budget.floor_factors()["macs"]
        self.factor = 1.0  # the asked reduction of the running stage
        self.good_factor = 1.0  # the asked reduction of the last stage within budget
        self.last_good: list[torch.Tensor] | None = None
        self.patience = patience
        self.waited = 0  # stages this reduction has been over budget in a row
        self.log: list[dict] = []
        self.started = False
        self.waiting = False  # begun over the allowance: no ask until a check is within
        if self.begin_step == 0:
            self._begin(0)

    def _begin(self, step: int) -> None:
        """The first stage: the model as it is now is the fallback, then ask for ``growth``;
        after ``start_step`` only if that model is within the allowance (else wait)."""
        self.started = True
        if self.start_step > 0 and not self._judge(step):
            self.waiting = True
            log.info("seek: the model at the switch's end is over the allowance; no pruning yet")
            return
        self._start_raising()

    def _start_raising(self) -> None:
        self.waiting = False
        self.saved = self.snapshot() if self.snapshot is not None else None
        self._ask(min(self.growth, self.ceiling))

    def _judge(self, step: int) -> bool:
        """Evaluate the sparse model and log the check: is it within the allowance?"""
        acc, stderr = self.evaluate()
        ok = self.baseline_accuracy - acc + self.margin * stderr <= self.max_drop
        reached = self.budget.reached["macs"]
        self.log.append(
            {"step": step, "macs_x": reached, "accuracy": acc, "stderr": stderr, "within": ok}
        )
        log.info(
            "seek: step %d, %.2fx MACs, sparse accuracy %.2f%% (drop's standard error %.2f; %s)",
            step, reached, acc, stderr, "ok" if ok else "over budget",
        )  # fmt: skip
        return ok

    def _ask(self, factor: float) -> None:
        self.factor = factor
        self.budget.ask([Target("macs", factor, factor)])

    def state_dict(self) -> dict:
        return {
            "factor": self.factor,
            "growth": self.growth,
            "good_factor": self.good_factor,
            "last_good": self.last_good,
            "saved": self.saved,
            "log": self.log,
            "waited": self.waited,
            "started": self.started,
            "waiting": self.waiting,
        }

    def load_state_dict(self, state: dict) -> None:
        self.started = state.get("started", True)
        self.waiting = state.get("waiting", False)
        if self.started and not self.waiting:
            self._ask(state["factor"])
        self.growth, self.good_factor = state["growth"], state["good_factor"]
        self.last_good, self.saved, self.log = state["last_good"], state["saved"], state["log"]
        self.waited = state.get("waited", 0)

    def check(self, step: int) -> None:
        """At the end of each stage: keep and go on, or roll back and bisect, or freeze."""
        budget = self.budget
        if step < self.begin_step:
            return
        if not self.started:
            self._begin(step)
        if step == self.begin_step or (step - self.begin_step) % self.every or budget.zero is None:
            return
        ok = self._judge(step)
        steps_left = step + self.every <= budget.reach_step
        if self.waiting:  # nothing asked yet: nothing to keep or put back
            if ok and steps_left:
                self._start_raising()
            elif not steps_left:
                budget.freeze()
                log.info("seek: no check within the allowance; froze the zero set at %.2fx MACs",
                         budget.reached["macs"])  # fmt: skip
            return
        if not ok and self.waited < self.patience and steps_left:
            self.waited += 1  # give the network a stage to adapt before judging
            return
        self.waited = 0
        if ok:
            self.good_factor = self.factor
            self.last_good = [m.clone() for m in budget.zero]
            if self.snapshot is not None:
                self.saved = self.snapshot()
            if steps_left and self.factor < self.ceiling:
                self._ask(min(self.factor * self.growth, self.ceiling))
                return
            budget.freeze()
        else:
            masks = self.last_good or [torch.zeros_like(m) for m in budget.zero]
            if self.restore is not None and self.saved is not None:
                if self.rollback == "channels":  # the units zeroed since the last good check
                    self.restore(
                        self.saved, [z & ~g for z, g in zip(budget.zero, masks, strict=True)]
                    )
                else:
                    self.restore(self.saved)  # the channels zeroed since then come back
            self.growth = math.sqrt(self.growth)
            if steps_left and self.growth >= self.min_growth:
                self._ask(min(self.good_factor * self.growth, self.ceiling))
                return
            budget.freeze(masks)
        log.info("seek: froze the zero set at %.2fx MACs", budget.reached["macs"])
