"""The method in one object: RVSM under the sparse group penalty, with an optional budget.

:class:`SparseTraining` is what the training loop calls, through two hooks:
``after_backward()`` (add the coupling gradient ``beta (w - u)``) and
``after_step()`` (refresh the sparse copy ``u = prox(w)``). Everything that
decides which channels die lives behind it:

* the individual term (``compressor.penalties``, elementwise prox),
* the group term (:mod:`compressor.method.group_terms`, prox of the unit norms),
* the penalty weights ``lambda`` (:mod:`compressor.method.strength`; ``mu = lambda / beta``),
* the RVSM state ``u`` and ``beta`` (:mod:`compressor.splitting`),
* the budget (:mod:`compressor.method.budget`), which only sets the group
  term's thresholds, and the accuracy seeker (:mod:`compressor.method.seeker`),
  which only sets the budget.

The zero set of every step is the group prox's (a unit is zero in ``u``
exactly when the group term zeroed it); ``state_dict()`` holds all of it for
``--resume``, and :meth:`summary` says what happened for the report.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.groups import ChannelGroups
from compressor.method.budget import BudgetController
from compressor.method.group_terms import GroupTerm
from compressor.method.splitting import RVSM, Thresholds
from compressor.method.strength import Lambdas

log = logging.getLogger(__name__)

HISTORY_EVERY = 10  # steps between two rows of the training trace (||w - u||, threshold)


@dataclass
class Trace:
    """What the method did, step by step, for the report and its plots."""

    rows: list[dict] = field(default_factory=list)

    def add(self, **row) -> None:
        self.rows.append(row)


class SparseTraining:
    """RVSM fine-tuning under ``individual + group`` penalties; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        groups: ChannelGroups,
        rvsm: RVSM,
        lambdas: Lambdas,
        group_term: GroupTerm,
        *,
        scale: torch.Tensor,
        budget: BudgetController | None = None,
        seeker=None,
        weighting: str = "uniform",
    ):
        self.model, self.groups, self.rvsm = model, groups, rvsm
        self.lambdas, self.term = lambdas, group_term
        self.scale = scale  # c_g ref_g per group: the unit of the budget's thresholds
        self.budget = budget
        self.seeker = seeker
        self.weighting = weighting  # the c_g rule (strength.group_weights)
        self.trace = Trace()
        # compressor.activations.ActivationSwitch of binarized activations (set by the
        # pipeline), advanced after every step, finished by finalize()
        self.activation_switch = None

    # ------------------------------------------------------------------ hooks
    def after_backward(self) -> None:
        """``grad w += beta (w - u)``: after ``loss.backward()``, before ``optimizer.step()``."""
        self.rvsm.add_coupling_grad()

    def after_step(self) -> None:
        """After ``optimizer.step()``: hold the frozen zero set, count the step, refresh ``u``."""
        rvsm = self.rvsm
        step = rvsm.advance()
        if self.seeker is not None and not self.budget.frozen:
            self.seeker.check(step)
        if self.budget is not None and self.budget.frozen and rvsm.held_zero is None:
            rvsm.hold_zero(self.budget.zero)  # the beta -> inf limit on the frozen zero set
        if step % rvsm.prox_every == 0:
            self.prox(step)
        if step % HISTORY_EVERY == 0:
            self._trace(step)
        if self.activation_switch is not None:
            self.activation_switch()

    def end_epoch(self, epoch: int) -> None:
        self.rvsm.end_epoch(epoch)

    # ------------------------------------------------------------------- prox
    @torch.no_grad()
    def prox(self, step: int | None = None) -> None:
        """``u = group_prox(individual_prox(w))`` with this step's thresholds.

        The group term sees the unit norms of the individual prox's output (with
        fused kernels, those of ``w``: the entries that measure a unit, BatchNorm
        gamma and beta, have no individual penalty). With a budget, its
        thresholds come from those same norms, so the budget's zero set and the
        prox's are one set.
        """
        rvsm = self.rvsm
        step = rvsm.step_count if step is None else step
        ind = self.lambdas.individual_thresholds(rvsm.beta)
        thresholds = Thresholds(dict(ind.mu), dict(ind.a), [], dict(ind.scale))
        fused = rvsm.fused and rvsm.can_fuse_prox(thresholds)
        if not fused:
            rvsm.individual_prox_(thresholds)
        norms = self.groups.channel_norms(rvsm.param_by_name if fused else rvsm.u)
        factors = [f.float() for f in self._group_factors(step, norms)]
        if fused and rvsm.sparse_group_pass_(thresholds, factors):
            return
        if fused:
            rvsm.individual_prox_(thresholds)
        self.groups.scale_(rvsm.u, factors)

    def _group_factors(self, step: int, norms: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per group and unit, the group term's prox factor ``r(n) / n``.

        With a budget, norms are measured in units of ``scale_g`` (a typical unit of
        the group, so TL1's ``a`` means the same in every layer) and the threshold is
        the budget's; without, ``mu_g = lambda_g / beta`` on the norms themselves (the
        papers' parametrisation).
        """
        if self.budget is None:
            mu = self.lambdas.group_mu(self.rvsm.beta).tolist()
            return [self.term.factor(n.double(), m) for n, m in zip(norms, mu, strict=True)]
        thresholds = self.budget.thresholds(step, norms)  # on the scores ||w_gu|| / scale_g
        factors = []
        for n, tau, s in zip(norms, thresholds, self.scale.tolist(), strict=True):
            if tau <= 0:
                factors.append((n > 0).double())  # no shrink; exact zeros stay zero
                continue
            factors.append(self.term.factor(n.double() / s, self.term.mu_for_threshold(tau)))
        return factors

    # ---------------------------------------------------------------- state
    def zero_masks(self) -> list[torch.Tensor]:
        """Per group, the units that are zero in ``u`` (the prox's zero set)."""
        return self.groups.zero_masks(self.rvsm.u)

    @torch.no_grad()
    def gap(self) -> float:
        """``max |w - u|`` over the penalised tensors."""
        return max(
            (
                float((p.detach() - self.rvsm.u[n]).abs().max())
                for n, p in self.rvsm.param_by_name.items()
            ),
            default=0.0,
        )

    def _trace(self, step: int) -> None:
        zero = self.zero_masks()
        macs, params = self.groups.estimate_cost(zero)
        tau = self.budget.tau if self.budget is not None else None
        self.trace.add(
            step=step,
            w_minus_u=self.gap(),
            tau=tau,
            beta=self.rvsm.beta,
            zero_units=int(sum(int(z.sum()) for z in zero)),
            macs_x=self.groups.total_macs / max(macs, 1.0),
            params_x=self.groups.total_params / max(params, 1.0),
        )

    @contextlib.contextmanager
    def sparse_weights(self) -> Iterator[None]:
        with self.rvsm.sparse_weights():
            yield

    @property
    def trained(self) -> bool:
        """Whether any training step ran: only then did a prox choose a zero set."""
        return self.rvsm.step_count > 0

    def finalize(self) -> None:
        """``w := u``: the model becomes the sparse model (with quantised activations: t = 1).
        With no training step ``w`` stays: no penalty has chosen anything yet (``u_0`` is the
        prox of the untrained weights under the first step's thresholds)."""
        if self.trained:
            self.rvsm.finalize()
        if self.activation_switch is not None:
            self.activation_switch.finish()

    def state_dict(self) -> dict:
        return {
            "rvsm": self.rvsm.state_dict(),
            "budget": self.budget.state_dict() if self.budget is not None else None,
            "seeker": self.seeker.state_dict() if self.seeker is not None else None,
            "trace": list(self.trace.rows),
            "activation_switch": self.activation_switch.state_dict()
            if self.activation_switch is not None
            else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.rvsm.load_state_dict(state["rvsm"])
        if self.budget is not None and state.get("budget") is not None:
            self.budget.load_state_dict(state["budget"])
        if self.seeker is not None and state.get("seeker") is not None:
            self.seeker.load_state_dict(state["seeker"])
        self.trace.rows = list(state.get("trace", []))
        if self.activation_switch is not None and state.get("activation_switch") is not None:
            self.activation_switch.load_state_dict(state["activation_switch"])

    def summary(self) -> dict:
        """For the report: which penalty chose the zeros, and the trace."""
        return {
            "group_term": self.term.name,
            "group_weighting": self.weighting,
            "individual_term": self.lambdas.individual_kind,
            "zero_set_chosen_by": (
                "none: no training step ran, the input model's weights are kept"
                if not self.trained
                else "group prox threshold set by the budget"
                if self.budget is not None
                else "group prox with lambda / beta"
            ),
            "allocation": self.budget.allocation_summary() if self.budget is not None else None,
            "trace": list(self.trace.rows),
        }
