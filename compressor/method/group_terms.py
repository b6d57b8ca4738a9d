"""Group terms of the sparse group penalty: ``sum_g c_g phi(||x_g||_2)``.

Every term here is a function of the group's Euclidean norm alone, so its prox
keeps each group's direction and maps its norm through the scalar prox of
``phi``::

    prox_{phi(||.||), mu}(y_g) = y_g * r(||y_g||) / ||y_g||,
    r(n) = argmin_{r >= 0} phi(r) + 1/(2 mu) (r - n)^2

(the minimiser lies on the ray of ``y_g``: moving ``x`` toward that ray keeps
``||x||`` and shortens ``||x - y||``). A group is zeroed exactly when its norm is
at most the term's threshold ``t(mu)``; a budget acts by choosing that
threshold (:meth:`GroupTerm.mu_for_threshold`).

Terms are registered classes (``GROUP_TERMS``); adding one is a subclass with
``factor``/``threshold``/``mu_for_threshold``/``value`` and a
``@register_group_term("name")`` line. Sources: group lasso, Yuan & Lin
(JRSS-B 2006); sparse group composition, Simon et al. (JCGS 2013); the
nonconvex group terms, Bui, Park, Zhang, Qi & Xin, "Structured sparsity of
convolutional neural networks via nonconvex sparse group regularization"
(Front. Appl. Math. Stat. 2021).
"""

from __future__ import annotations

import difflib
import math
from typing import ClassVar

import torch

from compressor.errors import BadInputError
from compressor.method import penalties
from compressor.registry import registrar

GROUP_TERMS: dict[str, type[GroupTerm]] = {}


register_group_term = registrar(
    GROUP_TERMS, "group term",
    doc="Class decorator: make a :class:`GroupTerm` available to recipes as ``penalty.group.kind: name``.",
)  # fmt: skip


def group_term(name: str, **params: float) -> GroupTerm:
    """The registered group term ``name`` with its parameters (``a`` for tl1)."""
    if name not in GROUP_TERMS:
        close = difflib.get_close_matches(str(name), list(GROUP_TERMS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BadInputError(
            f"penalty.group.kind must be one of {', '.join(sorted(GROUP_TERMS))}. "
            f"Got {name!r} instead.{hint}"
        )
    return GROUP_TERMS[name](**params)


class GroupTerm:
    """``phi`` of a group's norm; subclasses give its prox as a factor on the group."""

    name: ClassVar[str] = ""
    parameters: ClassVar[tuple[str, ...]] = ()  # recipe keys of penalty.group it takes

    def __init__(self, **params: float):
        if params:
            raise BadInputError(
                f"the group term {self.name!r} takes no parameters. Got {sorted(params)}."
            )

    def factor(self, norms: torch.Tensor, mu: torch.Tensor | float) -> torch.Tensor:
        """``r(n) / n`` per group (0 where ``n <= threshold(mu)`` or ``n == 0``)."""
        raise NotImplementedError

    def threshold(self, mu: float) -> float:
        """The largest norm the prox with ``mu`` zeroes."""
        raise NotImplementedError

    def mu_for_threshold(self, threshold: float) -> float:
        """The ``mu`` whose prox zeroes exactly the groups with norm ``<= threshold``."""
        raise NotImplementedError

    def value(self, norms: torch.Tensor) -> torch.Tensor:
        """``phi`` of each norm."""
        raise NotImplementedError

    @staticmethod
    def _ratio(radius: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        return torch.where(norms > 0, radius / safe, torch.zeros_like(norms))


@register_group_term("l1")
class GroupLasso(GroupTerm):
    """``phi(r) = r`` (the L2,1 group lasso): ``r(n) = max(n - mu, 0)``, threshold ``mu``."""

    def factor(self, norms, mu):
        return penalties.group_shrink_factor(norms, mu)

    def threshold(self, mu):
        return float(mu)

    def mu_for_threshold(self, threshold):
        return float(threshold)

    def value(self, norms):
        return norms.clone()


@register_group_term("l0")
class GroupL0(GroupTerm):
    """``phi(r) = 1{r != 0}`` (group hard threshold): keep ``y_g`` if ``n > sqrt(2 mu)``, else 0."""

    def factor(self, norms, mu):
        thr = torch.sqrt(2.0 * torch.as_tensor(mu, dtype=norms.dtype, device=norms.device))
        return (norms > thr).to(norms.dtype)

    def threshold(self, mu):
        return math.sqrt(2.0 * float(mu))

    def mu_for_threshold(self, threshold):
        return float(threshold) ** 2 / 2.0

    def value(self, norms):
        return (norms != 0).to(norms.dtype)


@register_group_term("tl1")
class GroupTL1(GroupTerm):
    """``phi(r) = (a+1) r / (a + r)`` (transformed L1 of the norm, Zhang & Xin 2018).

    ``r(n)`` is the scalar TL1 prox (:func:`compressor.method.penalties.prox_tl1`) of
    the norm: it shrinks large groups less than the group lasso does (``a``
    small: near L0, ``a`` large: near L1).
    """

    parameters = ("a",)

    def __init__(self, a: float = 1.0):
        if not (isinstance(a, int | float) and math.isfinite(a) and a > 0):
            raise BadInputError(f"penalty.group.a must be a finite float > 0. Got {a!r}.")
        self.a = float(a)

    def factor(self, norms, mu):
        return self._ratio(penalties.prox_tl1(norms, mu, self.a), norms)

    def threshold(self, mu):
        return float(penalties.tl1_threshold(float(mu), self.a))

    def mu_for_threshold(self, threshold):
        t, a = float(threshold), self.a
        mu = t * a / (a + 1)
        if mu <= a * a / (2 * (a + 1)):
            return mu
        return (t + a / 2) ** 2 / (2 * (a + 1))

    def value(self, norms):
        return (self.a + 1.0) * norms / (self.a + norms)
