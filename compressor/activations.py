"""Binarised and k-bit quantised activations trained by coarse gradient, and swapping them in.

Forward pass: ``sigma(x) = 1{x > 0}`` (binary) or ``alpha * clamp(round(x/alpha), 0, 2^k - 1)``
(k-bit). Both are piecewise constant, so the backward pass uses a coarse gradient,
a straight-through estimator (STE) chosen by name:

=============== ============================ ===================================
``ste``         binary: dsigma/dx            k-bit: dsigma/dx
=============== ============================ ===================================
``clipped_relu`` ``1{0 < x < 1}`` (default)  ``1{0 < x < (2^k - 1) alpha}``
``relu``        ``1{x > 0}``                 ``1{x > 0}``
``identity``    ``1`` (known unstable)       ``1``
=============== ============================ ===================================

Yin et al., "Understanding straight-through estimator in training activation
quantized neural nets", ICLR 2019, found the clipped ReLU STE best and the
identity STE unstable.

The ONNX exporters (TorchScript and dynamo) inline the forward: a binary
activation exports as ``Greater`` + ``Cast``, a k-bit one as ``Div``, ``Round``,
``Clip``, ``Mul``; both map 0 to 0, so exact channel removal stays exact.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from compressor.errors import BadInputError

__all__ = [
    "STE_CHOICES",
    "BinaryActivation",
    "QuantizedActivation",
    "SwapReport",
    "activation_configs",
    "activation_from_config",
    "describe_activation_config",
    "make_activation",
    "swap_activations",
]

logger = logging.getLogger(__name__)

STE_CHOICES = ("clipped_relu", "relu", "identity")
MAX_BITS = 8
_ALPHA_FLOOR = 1e-8


def _check_ste(ste: str) -> str:
    if ste not in STE_CHOICES:
        close = difflib.get_close_matches(str(ste), STE_CHOICES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BadInputError(
            f"`ste` must be one of {', '.join(STE_CHOICES)}. Got {ste!r} instead.{hint}"
        )
    return ste


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise BadInputError(
            f"`bits` must be an integer in [1, {MAX_BITS}] (1 = binary). Got {bits!r} instead."
        )
    return bits


def _ste_mask(x: torch.Tensor, ste: str, upper: float | torch.Tensor) -> torch.Tensor | None:
    """Where the coarse derivative is 1 (bool tensor), or None for the identity STE."""
    if ste == "identity":
        return None
    if ste == "relu":
        return x > 0
    return (x > 0) & (x < upper)


# --------------------------------------------------------------------------- binary


class _BinarySTE(torch.autograd.Function):
    """``1{x > 0}`` forward, coarse gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ste: str) -> torch.Tensor:
        mask = _ste_mask(x, ste, 1.0)
        ctx.has_mask = mask is not None
        if mask is not None:
            ctx.save_for_backward(mask)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.has_mask:
            return grad, None
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype), None


class _ActivationBase(nn.Module):
    bits: int
    ste: str

    def config(self) -> dict[str, Any]:
        """JSON-able description; :func:`activation_from_config` rebuilds the module."""
        return describe_activation_config(self.bits, self.ste)


class BinaryActivation(_ActivationBase):
    """``sigma(x) = 1{x > 0}`` with a straight-through estimator ``ste`` for the backward pass.

    ``clipped_relu``: ``grad * 1{0 < x < 1}``; ``relu``: ``grad * 1{x > 0}``;
    ``identity``: ``grad``. Output dtype is the input dtype.
    """

    bits = 1

    def __init__(self, ste: str = "clipped_relu"):
        super().__init__()
        self.ste = _check_ste(ste)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() or not (torch.is_grad_enabled() and x.requires_grad):
            return (x > 0).to(x.dtype)
        return _BinarySTE.apply(x, self.ste)

    def extra_repr(self) -> str:
        return f"ste={self.ste!r}"


# --------------------------------------------------------------------------- k-bit


class _QuantSTE(torch.autograd.Function):
    """``alpha * clamp(round(x/alpha), 0, L)`` forward; coarse gradient in x, a.e. exact in alpha."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, levels: int, ste: str):
        q = torch.clamp(torch.round(x / alpha), 0, levels)
        mask = _ste_mask(x, ste, levels * alpha)
        ctx.has_mask = mask is not None
        ctx.save_for_backward(q, *(() if mask is None else (mask,)))
        return alpha * q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, *rest = ctx.saved_tensors
        grad_x = grad * rest[0].to(grad.dtype) if ctx.has_mask else grad
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = (grad * q).sum()
        return grad_x, grad_alpha, None, None


class QuantizedActivation(_ActivationBase):
    """Uniform k-bit activation ``alpha * clamp(round(x / alpha), 0, 2^k - 1)``.

    ``alpha`` (the resolution, the step between levels) is a learnable scalar
    ``nn.Parameter``. Backward in ``x``: the STE named by ``ste``
    (``clipped_relu``: ``1{0 < x < (2^k - 1) alpha}``, ``relu``: ``1{x > 0}``,
    ``identity``: 1). Backward in ``alpha``: the a.e. exact partial derivative
    ``dsigma/dalpha = clamp(round(x/alpha), 0, 2^k - 1)`` (the level index) of
    Yin et al., "Blended coarse gradient descent for full quantization of deep
    neural networks", Res. Math. Sci. 2019 (PACT, Choi et al. 2018, instead uses
    the two-valued ``1{x >= (2^k - 1) alpha}`` up to scale). ``alpha`` is floored
    at 1e-8 in the forward pass.
    """

    def __init__(self, bits: int = 2, ste: str = "clipped_relu", alpha: float = 1.0):
        super().__init__()
        if _check_bits(bits) == 1:
            raise BadInputError("`bits` = 1 is the binary activation: use BinaryActivation.")
        self.bits = bits
        self.ste = _check_ste(ste)
        if not alpha > 0:
            raise BadInputError(f"`alpha` must be a float > 0. Got {alpha!r} instead.")
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.clamp_min(_ALPHA_FLOOR).to(x.dtype)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad)
        if torch.onnx.is_in_onnx_export() or not needs_grad:
            return alpha * torch.clamp(torch.round(x / alpha), 0, self.levels)
        return _QuantSTE.apply(x, alpha, self.levels, self.ste)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ste={self.ste!r}"


# --------------------------------------------------------------------------- configs


def describe_activation_config(bits: int = 1, ste: str = "clipped_relu") -> dict[str, Any]:
    """JSON-able description of the activation that ``bits`` and ``ste`` select.

    ``{"type": "binary" | "quantized", "bits": int, "ste": str}``. The learned
    ``alpha`` of a quantized activation lives in the model's ``state_dict``.
    """
    _check_bits(bits)
    _check_ste(ste)
    return {"type": "binary" if bits == 1 else "quantized", "bits": bits, "ste": ste}


def make_activation(bits: int = 1, ste: str = "clipped_relu") -> _ActivationBase:
    """A fresh :class:`BinaryActivation` (``bits == 1``) or :class:`QuantizedActivation`."""
    if _check_bits(bits) == 1:
        return BinaryActivation(ste)
    return QuantizedActivation(bits, ste)


def activation_from_config(config: dict[str, Any]) -> _ActivationBase:
    """Rebuild the module that :func:`describe_activation_config` described."""
    if not isinstance(config, dict):
        raise BadInputError(
            f"an activation config must be a dict. Got {type(config).__name__} instead."
        )
    unknown = set(config) - {"type", "bits", "ste"}
    if unknown:
        raise BadInputError(
            f"unknown activation config keys {sorted(unknown)}; allowed: type, bits, ste."
        )
    bits = config.get("bits", 1)
    ste = config.get("ste", "clipped_relu")
    expect = describe_activation_config(bits, ste)
    if "type" in config and config["type"] != expect["type"]:
        raise BadInputError(
            f"activation config type {config['type']!r} does not match bits={bits} "
            f"(expected {expect['type']!r})."
        )
    return make_activation(bits, ste)


def activation_configs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{qualified name: config}`` of every binary/quantized activation in ``model``."""
    return {name: m.config() for name, m in model.named_modules() if isinstance(m, _ActivationBase)}


# --------------------------------------------------------------------------- swapping


@dataclass
class SwapReport:
    """What :func:`swap_activations` did.

    ``model`` is the model to use from now on: the input object (changed in
    place) or, where functional ReLUs were replaced, a ``torch.fx.GraphModule``.
    """

    swapped: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unmatched_skip: list[str] = field(default_factory=list)
    traced: bool = False
    activation: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def counts(self) -> dict[str, int]:
        return {"swapped": self.num_swapped, "skipped": self.num_skipped}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the model)."""
        return {
            "swapped": list(self.swapped),
            "skipped": list(self.skipped),
            "unmatched_skip": list(self.unmatched_skip),
            "traced": self.traced,
            "activation": dict(self.activation),
            **{f"num_{k}": v for k, v in self.counts().items()},
        }


_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = {F.relu, F.relu6, torch.relu, torch.relu_, torch.nn.functional.relu_}
_RELU_METHODS = {"relu", "relu_"}
_RELU_SOURCE = re.compile(
    r"\b(?:F|functional|torch)\.relu6?_?\s*\(|(?<![\w.])relu6?_?\s*\(|\.relu_?\(\s*\)"
)


class _Tracer(fx.Tracer):
    """Keeps our activations (and torch.nn modules) as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _ActivationBase) or super().is_leaf_module(m, qualname)


def _is_functional_relu(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _node_scope(gm: fx.GraphModule, node: fx.Node) -> str:
    """Qualified name of the module whose forward made this call ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    scope = last[0] if isinstance(last, tuple) and last and isinstance(last[0], str) else ""
    try:
        gm.get_submodule(scope)
    except AttributeError:
        return ""
    return scope


def _classes_calling_relu(model: nn.Module) -> list[str]:
    """Names of model classes whose forward source looks like it calls a functional ReLU."""
    found = []
    for cls in {type(m) for m in model.modules()}:
        if cls.__module__.startswith("torch.nn") or cls in (BinaryActivation, QuantizedActivation):
            continue
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        if _RELU_SOURCE.search(src):
            found.append(cls.__qualname__)
    return sorted(found)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def swap_activations(
    model: nn.Module,
    *,
    bits: int = 1,
    ste: str = "clipped_relu",
    skip: Iterable[str] | str = (),
    functional: bool = True,
) -> SwapReport:
    """Replace ReLUs in ``model`` by binary (``bits=1``) or k-bit activations.

    Use it as ``report = swap_activations(model, ...); model = report.model``.

    - ``nn.ReLU`` / ``nn.ReLU6`` modules are replaced in place, under their
      own qualified names (``layer1.0.relu1``).
    - Functional calls in ``forward`` (``F.relu``, ``F.relu6``, ``torch.relu``,
      ``x.relu()``) need a graph: the model is traced with ``torch.fx`` (symbolic tracing)
      and each call becomes a new submodule ``act_fx_<i>`` of the module whose
      ``forward`` made it (``layer1.0.act_fx_0``; ``<i>`` counts per module in
      call order). Then ``report.model`` is the traced ``GraphModule``: same
      parameter names, parameters shared with ``model`` (whose own modules stay
      unchanged), Python control flow frozen as traced. Where no functional ReLU
      is swapped, ``report.model is model``.
    - Names matching any fnmatch pattern in ``skip`` (module names, or the
      ``act_fx_<i>`` names) are left as they are and listed in ``report.skipped``.
    - ``functional=False`` leaves functional ReLUs alone and never traces.

    Raises :class:`~compressor.errors.BadInputError` when the model calls
    functional ReLUs but cannot be traced.
    """
    config = describe_activation_config(bits, ste)
    patterns = (skip,) if isinstance(skip, str) else tuple(skip)
    if not all(isinstance(p, str) for p in patterns):
        raise BadInputError(f"`skip` must be a list of fnmatch patterns. Got {skip!r} instead.")
    used: set[str] = set()

    def skipped(name: str) -> bool:
        hits = [p for p in patterns if fnmatch.fnmatchcase(name, p)]
        used.update(hits)
        return bool(hits)

    report = SwapReport(activation=config)
    if isinstance(model, _RELU_MODULES):
        if skipped(""):
            report.skipped.append("")
            report.model = model
        else:
            report.swapped.append("")
            report.model = make_activation(bits, ste)
        return _finish(report, patterns, used)

    # Functional ReLUs: name them in the traced graph, decide which to swap.
    graph_module = _trace_for_functional(model) if functional else None
    fx_swaps: list[tuple[fx.Node, str]] = []
    fx_skipped: list[str] = []
    if graph_module is not None:
        for node, name in _name_functional_relus(graph_module):
            if skipped(name):
                fx_skipped.append(name)
            else:
                fx_swaps.append((node, name))
        if not fx_swaps:
            graph_module = None
    target = model if graph_module is None else graph_module
    report.traced = graph_module is not None

    # Modules; every alias of a shared instance gets the same replacement.
    replacement: dict[int, nn.Module] = {}
    for name, module in list(target.named_modules(remove_duplicate=False)):
        if not name or not isinstance(module, _RELU_MODULES):
            continue
        if skipped(name):
            report.skipped.append(name)
            continue
        new = replacement.setdefault(id(module), make_activation(bits, ste))
        _set_submodule(target, name, new)
        report.swapped.append(name)

    if graph_module is not None:
        graph = graph_module.graph
        for node, name in fx_swaps:
            graph_module.add_submodule(name, make_activation(bits, ste))
            x = node.args[0] if node.args else next(iter(node.kwargs.values()))
            with graph.inserting_after(node):
                new_node = graph.call_module(name, (x,))
            node.replace_all_uses_with(new_node)
            graph.erase_node(node)
            report.swapped.append(name)
        graph.lint()
        graph_module.recompile()
    report.skipped.extend(fx_skipped)

    report.model = target
    return _finish(report, patterns, used)


def _name_functional_relus(gm: fx.GraphModule) -> list[tuple[fx.Node, str]]:
    """Each functional ReLU node with its new module name ``<scope>.act_fx_<i>``."""
    out = []
    counters: dict[str, int] = {}
    for node in gm.graph.nodes:
        if not _is_functional_relu(node):
            continue
        scope = _node_scope(gm, node)
        i = counters.get(scope, 0)
        while _has_submodule(gm, name := f"{scope}.act_fx_{i}" if scope else f"act_fx_{i}"):
            i += 1
        counters[scope] = i + 1
        out.append((node, name))
    return out


def _has_submodule(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
    except AttributeError:
        return False
    return True


def _finish(report: SwapReport, patterns: tuple[str, ...], used: set[str]) -> SwapReport:
    report.unmatched_skip = [p for p in patterns if p not in used]
    if report.unmatched_skip:
        logger.warning(
            "activation skip patterns matched nothing: %s", ", ".join(report.unmatched_skip)
        )
    logger.info(
        "swapped %d activations for %s (%d skipped)",
        report.num_swapped,
        report.activation.get("type"),
        report.num_skipped,
    )
    return report


def _trace_for_functional(model: nn.Module) -> fx.GraphModule | None:
    """A traced copy of ``model`` if its forward calls functional ReLUs, else None."""
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # any tracing failure means "cannot trace"
        suspects = _classes_calling_relu(model)
        if suspects:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BadInputError(
                f"{', '.join(suspects)} calls a functional ReLU (F.relu / torch.relu / "
                f"Tensor.relu) in forward(), and torch.fx cannot trace "
                f"{type(model).__qualname__} to replace it ({first}). Use nn.ReLU modules "
                f"in {suspects[0]} so they can be swapped, or skip the functional ReLUs "
                f"(swap_activations(..., functional=False) keeps them full precision)."
            ) from err
        logger.debug("torch.fx cannot trace %s (%s); swapping modules only", type(model), err)
        return None
    if not any(_is_functional_relu(n) for n in graph.nodes):
        return None
    name = type(model).__name__
    return fx.GraphModule(model, graph, class_name=name)
