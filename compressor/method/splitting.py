"""Relaxed variable splitting (RVSM): the sparse copy ``u`` of the penalised weights.

RVSM minimises ``L_beta(w, u) = f(w) + lambda P(u) + beta/2 ||w - u||^2`` by
alternating (Dinh & Xin, "Convergence of a relaxed variable splitting method
for learning sparse neural networks via L1, L0 and transformed-L1 penalties"):

1. a gradient step on ``w`` with ``grad f(w) + beta (w - u)`` (any torch optimizer);
2. ``u = prox_{P, lambda/beta}(w)``, here the sparse group composition
   ``group_shrink(individual_prox(w))`` (Bui et al., Frontiers 2021);
3. ``beta *= growth`` every ``beta_every`` epochs.

The sparse model is ``u``: evaluation swaps it in, and the end of training sets
``w := u``. Under DDP every rank holds the same ``w`` after the all-reduce, so
every rank computes the same ``u`` with no communication.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compressor.groups import ChannelGroups
from compressor.method import kernels, penalties

FUSED_MIN_ELEMENTS = 1 << 20
"""``fused="auto"`` compiles the fused kernels from this many penalised weights on:
below it, the eager step is already cheap and the compile (seconds) would not pay off."""


@dataclass(frozen=True)
class Thresholds:
    """Prox parameters of one step: ``mu`` per individual tensor and per group unit."""

    individual: Mapping[str, float]  # param name -> mu (only tensors with an individual penalty)
    individual_a: Mapping[str, float]  # param name -> TL1 ``a``
    group: Sequence[torch.Tensor]  # per group: mu per unit (inf forces zero, 0 leaves it)
    individual_scale: Mapping[str, float] | None = None  # param name -> s (default 1)


class RVSM:
    """The RVSM state for one model: ``u``, ``beta``, and the step counter.

    Parameters
    ----------
    model:
        The model being trained (``w`` are its parameters).
    groups:
        Coupled channel groups; their member tensors get the group penalty.
    individual_kind:
        ``"none"``, ``"l1"``, ``"l0"``, ``"tl1"`` or ``"l1-l2"``: the elementwise
        penalty on every conv and linear weight.
    alpha:
        The L1-L2 parameter.
    fused:
        ``"on"``: the coupling and the TL1 prox run as fused ``torch.compile``
        loops (:mod:`compressor.kernels`; they fall back to eager by themselves
        where compiling fails); ``"off"``: eager; ``"auto"``: on from
        ``FUSED_MIN_ELEMENTS`` penalised weights.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: ChannelGroups,
        *,
        individual_kind: str = "none",
        alpha: float = 1.0,
        beta: float = 1.0,
        beta_growth: float = 1.0,
        beta_every: int = 1,
        prox_every: int = 1,
        fused: str = "auto",
    ):
        if fused not in ("auto", "on", "off"):
            raise ValueError(f"fused must be 'auto', 'on' or 'off', got {fused!r}")
        self.model = model
        self.groups = groups
        self.individual_kind = individual_kind
        self.alpha = alpha
        self.beta = float(beta)
        self.beta_growth = float(beta_growth)
        self.beta_every = int(beta_every)
        self.prox_every = int(prox_every)
        self.step_count = 0
        params = dict(model.named_parameters())
        names = set(groups.params)
        if individual_kind != "none":
            names |= set(individual_targets(model))
        self.names = sorted(names)
        self.params = [params[n] for n in self.names]
        self.param_by_name = dict(zip(self.names, self.params, strict=True))
        self.u = {n: params[n].detach().clone() for n in self.names}
        # Params whose entries measure a group unit (its BatchNorm gamma and beta, if any).
        self._norm_params = {m.param for g in groups.groups for m in g.norm_members}
        self._row_index: torch.Tensor | None = None  # see sparse_group_pass_
        elements = sum(p.numel() for p in self.params)
        self.fused = fused == "on" or (fused == "auto" and elements >= FUSED_MIN_ELEMENTS)
        # Units held at zero in ``w`` itself (see ``hold_zero``): per group, True = zero.
        self.held_zero: list[torch.Tensor] | None = None

    @property
    def individual_names(self) -> list[str]:
        return individual_targets(self.model) if self.individual_kind != "none" else []

    @torch.no_grad()
    def add_coupling_grad(self) -> None:
        """``grad w += beta (w - u)``: call after ``loss.backward()``, before ``optimizer.step()``."""
        pairs = [
            (p, self.u[n])
            for n, p in zip(self.names, self.params, strict=True)
            if p.grad is not None
        ]
        if not pairs:
            return
        grads = [p.grad for p, _ in pairs]
        ws = [p.detach() for p, _ in pairs]
        us = [u for _, u in pairs]
        if self.fused and kernels.add_coupling_grad_(grads, ws, us, self.beta):
            return
        # Two in-place passes (+beta w, then -beta u) instead of allocating w - u.
        torch._foreach_add_(grads, ws, alpha=self.beta)
        torch._foreach_add_(grads, us, alpha=-self.beta)

    @torch.no_grad()
    def prox(self, thresholds: Thresholds) -> None:
        """``u = group_shrink(individual_prox(w))`` with the given thresholds.

        With a per-tensor scale ``s`` the individual penalty is ``P(w / s)``,
        whose prox is ``s * prox_{P, mu / s^2}(w / s)``; ``thresholds.individual``
        then holds ``mu / s^2`` (the penalty acts on weights measured in units of
        their tensor's typical size, see ``strength.py``).

        The individual prox writes straight into ``u`` (``mu = 0``: a copy of
        ``w``), and the group shrink scales ``u`` in place; with fused kernels
        and units measured by entries with no individual penalty, both are one
        pass (:meth:`sparse_group_pass_`).
        """
        if self.fused and self.can_fuse_prox(thresholds):
            if self.sparse_group_pass_(
                thresholds, self.group_factors(self.param_by_name, thresholds)
            ):
                return
        self.individual_prox_(thresholds)
        self.groups.scale_(self.u, self.group_factors(self.u, thresholds))

    @torch.no_grad()
    def group_factors(
        self, tensors: Mapping[str, torch.Tensor], thresholds: Thresholds
    ) -> list[torch.Tensor]:
        """Per group, the shrink factor of each unit from the unit norms in ``tensors``."""
        return [
            penalties.group_shrink_factor(n, mu.to(n.device, n.dtype))
            for n, mu in zip(self.groups.channel_norms(tensors), thresholds.group, strict=True)
        ]

    def can_fuse_prox(self, thresholds: Thresholds) -> bool:
        """Whether :meth:`prox` can be the one pass of :meth:`sparse_group_pass_`.

        It can for TL1 (or no individual penalty) when the entries that measure
        the units (BatchNorm gamma and beta) have no individual penalty: their
        prox is then the identity, so the group norms, and with them the
        shrink factors, are those of ``w``, known before the individual prox runs.
        """
        return self.individual_kind in ("tl1", "none") and not any(
            thresholds.individual.get(n) for n in self._norm_params
        )

    @torch.no_grad()
    def sparse_group_pass_(self, thresholds: Thresholds, factors: Sequence[torch.Tensor]) -> bool:
        """``u = f * prox_tl1(w)`` in one fused pass (:func:`compressor.method.kernels.sparse_group_prox_`).

        ``factors`` are the group shrink factors (:meth:`group_factors` of ``w``);
        False, with nothing written, where the fused kernel cannot run.
        """
        device = self.params[0].device if self.params else torch.device("cpu")
        if self._row_index is None or self._row_index.device != device:
            self._row_index = self.groups.row_factor_index(
                {n: kernels.row_count(p) for n, p in self.param_by_name.items()}
            ).to(device)
        mus, as_ = [], []
        for name in self.names:
            mu, a = (
                self._tl1_params(name, thresholds)
                if thresholds.individual.get(name)
                else (None, 1.0)
            )
            mus.append(mu)
            as_.append(a)
        return kernels.sparse_group_prox_(
            [p.detach() for p in self.params],
            [self.u[n] for n in self.names],
            mus,
            as_,
            self.groups.row_factors(factors, self._row_index),
        )

    @torch.no_grad()
    def individual_prox_(self, thresholds: Thresholds) -> None:
        """The first half of :meth:`prox`: ``u = individual_prox(w)`` (a copy of ``w`` where no mu)."""
        scales = thresholds.individual_scale or {}
        fused_tl1 = []  # (w, u, mu, a), all in one fused call
        for name, p in zip(self.names, self.params, strict=True):
            mu = thresholds.individual.get(name)
            if mu is None:
                self.u[name].copy_(p)
                continue
            if self.fused and self.individual_kind == "tl1":
                fused_tl1.append((p.detach(), self.u[name], *self._tl1_params(name, thresholds)))
                continue
            penalties.individual_prox(
                self.individual_kind,
                p.detach(),
                mu,
                a=thresholds.individual_a.get(name, 1.0),
                alpha=self.alpha,
                scale=scales.get(name, 1.0),
                out=self.u[name],
            )
        if fused_tl1:
            kernels.prox_tl1_many_(*zip(*fused_tl1, strict=True))

    @staticmethod
    def _tl1_params(name: str, thresholds: Thresholds) -> tuple[float, float]:
        """``(mu, a)`` of ``name``'s TL1 prox on the weights themselves (its scale folded in)."""
        scale = (thresholds.individual_scale or {}).get(name, 1.0)
        a = thresholds.individual_a.get(name, 1.0)
        mu_s, a_s = penalties.tl1_scaled_params(thresholds.individual[name], a, scale)
        return float(mu_s), float(a_s)

    @torch.no_grad()
    def hold_zero(self, masks: Sequence[torch.Tensor] | None) -> None:
        """Keep the units in ``masks`` (per group, True = zero) exactly zero in ``w`` from now on.

        This is the limit ``beta -> inf`` of the coupling on a zero set that will
        no longer change (the target controller's frozen set): training then
        fine-tunes the network that will be shipped, instead of a dense ``w``
        whose removed channels the coupling only pulls toward zero. ``None``
        releases the hold.
        """
        self.held_zero = None if masks is None else [m.clone() for m in masks]
        self._project_held()

    @torch.no_grad()
    def _project_held(self) -> None:
        if self.held_zero is None:
            return
        factors = [(~m).to(torch.float32) for m in self.held_zero]
        self.groups.scale_(self.param_by_name, factors)

    def advance(self) -> int:
        """After ``optimizer.step()``: hold the held zero set in ``w``, count the step; its number."""
        self._project_held()
        self.step_count += 1
        return self.step_count

    def after_optimizer_step(self, thresholds_fn) -> None:
        """:meth:`advance`, and refresh ``u`` every ``prox_every`` steps with fixed thresholds
        (``thresholds_fn()`` is lazy): the plain RVSM loop, without a budget."""
        if self.advance() % self.prox_every == 0:
            self.prox(thresholds_fn())

    def end_epoch(self, epoch: int) -> None:
        """Beta schedule: ``beta *= growth`` after every ``beta_every``-th epoch (0-based ``epoch``)."""
        if (epoch + 1) % self.beta_every == 0:
            self.beta *= self.beta_growth

    @contextlib.contextmanager
    def sparse_weights(self) -> Iterator[None]:
        """Temporarily load ``u`` into the model (to evaluate the sparse model), then restore ``w``."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for n, p in zip(self.names, self.params, strict=True):
                p.copy_(self.u[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, saved, strict=True):
                    p.copy_(w)

    @torch.no_grad()
    def finalize(self) -> None:
        """``w := u``: the model becomes the sparse model."""
        for n, p in zip(self.names, self.params, strict=True):
            p.copy_(self.u[n])

    def state_dict(self) -> dict:
        return {
            "u": {n: t.detach().cpu().clone() for n, t in self.u.items()},
            "beta": self.beta,
            "step_count": self.step_count,
            "held_zero": self.held_zero,
        }

    def load_state_dict(self, state: Mapping) -> None:
        if set(state["u"]) != set(self.u):
            raise ValueError("RVSM state does not match the model's penalised tensors")
        for n, t in state["u"].items():
            self.u[n].copy_(t)
        self.beta = float(state["beta"])
        self.step_count = int(state["step_count"])
        self.held_zero = state.get("held_zero")


def individual_targets(model: nn.Module) -> list[str]:
    """Weights that get the elementwise penalty: every conv and linear weight."""
    return [
        f"{name}.weight" if name else "weight"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)
    ]
