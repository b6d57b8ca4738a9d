"""Binarised and k-bit activations with a learned per-channel scale, trained by coarse gradient.

Forward pass, per channel ``c`` (dim 1 of the input):

* binary (``bits = 1``): ``sigma(x) = alpha_c * 1{x > theta_c}``;
* k-bit: ``sigma(x) = alpha_c * clamp(round(x / alpha_c), 0, 2^k - 1)``.

The scale ``alpha_c`` (the step between levels) and the threshold ``theta_c``
are learned. ``theta_c`` is clamped at 0 in the forward pass, so ``sigma(0) = 0``:
a removed (all-zero) channel outputs exactly 0 and channel removal stays exact.
``alpha_c`` is floored at 1e-8.

``sigma`` is piecewise constant, so the backward pass in ``x`` is a coarse
gradient: the derivative of a proxy chosen by ``ste``. Yin et al.,
"Understanding straight-through estimator in training activation quantized
neural nets", ICLR 2019, found the clipped ReLU proxy best and the identity
unstable:

================ ============================================ ==============================
``ste``          binary: dsigma/dx                            k-bit: dsigma/dx
================ ============================================ ==============================
``clipped_relu`` ``1{theta - b < x < theta - b + alpha}``      ``1{0 < x < (2^k - 1) alpha}``
``relu``         ``1{x > theta}``                             ``1{x > 0}``
``identity``     ``1`` (known unstable)                       ``1``
================ ============================================ ==============================

The binary clipped-ReLU proxy is the ramp ``clamp(x - theta + b, 0, alpha)``,
``b = min(theta, alpha/2)``: of width ``alpha`` around ``theta``, kept where
``x > 0`` (the ReLU it replaces is flat below 0). For ``theta <= alpha/2``,
the calibrated ``theta = alpha/2`` included, it is Yin et al.'s clipped ReLU
``clamp(x, 0, alpha)`` (``1{0 < x < 1}`` for the bare ``1{x > 0}``). ``theta`` gets the proxy's
gradient too (``dsigma/dtheta = -dsigma/dx``). ``alpha`` gets the a.e. exact
derivative, the level index (``1{x > theta}``, ``clamp(round(x/alpha), 0, 2^k - 1)``),
as in Yin et al., "Blended coarse gradient descent for full quantization of
deep neural networks", Res. Math. Sci. 2019. The weights meanwhile follow RVSM
(Dinh & Xin, "Convergence of a relaxed variable splitting coarse gradient
descent method for learning sparse weight binarized activation neural
network", Front. Appl. Math. Stat. 2020): sparse weights and binary activations
trained together by coarse gradient.

A pretrained network keeps its accuracy through three steps (docs/design.md,
"Binarized activations"):

1. :func:`calibrate` sets ``alpha_c``, ``theta_c`` from a few training batches:
   the 2-level Lloyd-Max quantiser of the ReLU output (binary) or the MSE-best
   ``alpha_c`` (k-bit);
2. :class:`ActivationSwitch` blends ``(1 - t) relu(x) + t sigma(x)`` with ``t``
   going from 0 to 1 over the first part of fine-tuning;
3. BatchNorm statistics are re-estimated when the switch completes.

The ONNX exporters inline the forward: a binary activation exports as ``Sub``,
``Greater``, ``Cast``, ``Mul``, a k-bit one as ``Div``, ``Round``, ``Clip``,
``Mul``; both map 0 to 0.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from compressor.errors import BadInputError

__all__ = [
    "STE_CHOICES",
    "ActivationSwitch",
    "SWITCH_ORDERS",
    "switch_blends",
    "BinaryActivation",
    "ChannelScale",
    "ChannelThreshold",
    "QuantizedActivation",
    "SwapReport",
    "activation_configs",
    "activation_from_config",
    "calibrate",
    "describe_activation_config",
    "make_activation",
    "summarize",
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


# --------------------------------------------------------------------------- per-channel values


class _ChannelParameter(nn.PReLU):
    """One learnable value per channel (``weight``, shape ``[C]``), or one for all (``[1]``).

    It subclasses ``nn.PReLU`` for the storage only (``forward`` is its own): a
    per-channel PReLU slope is what Torch-Pruning removes together with its
    channel (its PReLU pruner slices ``weight``), what
    :func:`compressor.groups.build_groups` lets a channel group pass through,
    and what :mod:`compressor.checkpoint` resizes (``num_parameters``) when it
    loads a compact model. So the values go when their channel is removed, and
    no other module needs a special case.
    """

    def __init__(self, value: float):
        super().__init__(num_parameters=1, init=float(value))

    def set_values(self, values: torch.Tensor) -> None:
        """Replace the values: ``[C]``, or ``[1]`` for one value shared by all channels."""
        values = values.detach().flatten().to(self.weight)
        self.num_parameters = values.numel()
        self.weight = nn.Parameter(values.clone())

    def per_channel(self, x: torch.Tensor, floor: float) -> torch.Tensor:
        """The values, at least ``floor``, shaped to broadcast along dim 1 of ``x``."""
        w = self.weight.clamp_min(floor).to(x.dtype)
        if w.numel() == 1:
            return w.reshape(())
        return w.view(1, -1, *([1] * (x.dim() - 2)))


class ChannelThreshold(_ChannelParameter):
    """``x - theta_c``, with ``theta_c`` clamped at 0 (an all-zero channel stays <= 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.per_channel(x, 0.0)


class ChannelScale(_ChannelParameter):
    """``alpha_c * s``, with ``alpha_c`` floored at 1e-8."""

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return s * self.per_channel(s, _ALPHA_FLOOR)


# --------------------------------------------------------------------------- the step


def _level_index(h: torch.Tensor, alpha: torch.Tensor, levels: int) -> torch.Tensor:
    """``1{h > 0}`` (binary, ``h = x - theta``) or ``clamp(round(h/alpha), 0, levels)`` (``h = x``)."""
    if levels == 1:
        return (h > 0).to(h.dtype)
    return torch.clamp(torch.round(h / alpha), 0, levels)


def _proxy_mask(h: torch.Tensor, alpha: torch.Tensor, b: torch.Tensor, levels: int, ste: str):
    """Where the proxy's slope is 1 (bool tensor), or None for the identity STE.

    Binary: ``h = x - theta``, the ramp is ``-b < h < alpha - b``, ``b = min(theta, alpha/2)``.
    """
    if ste == "identity":
        return None
    if ste == "relu":
        return h > 0
    if levels == 1:
        return (h > -b) & (h < alpha - b)
    return (h > 0) & (h < levels * alpha)


class _LevelSTE(torch.autograd.Function):
    """The level index forward; the coarse gradient ``proxy'(h) / alpha`` backward.

    Dividing by ``alpha`` makes ``d(alpha * index)/dx`` the proxy's slope (0 or
    1). ``alpha`` comes in detached: it gets its gradient, the level index,
    from the :class:`ChannelScale` multiplication that follows.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, alpha: torch.Tensor, b: torch.Tensor, levels: int, ste: str):
        mask = _proxy_mask(h, alpha, b, levels, ste)
        ctx.has_mask = mask is not None
        ctx.save_for_backward(alpha, *(() if mask is None else (mask,)))
        return _level_index(h, alpha, levels)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        alpha, *mask = ctx.saved_tensors
        grad_h = grad / alpha
        if ctx.has_mask:
            grad_h = grad_h * mask[0].to(grad.dtype)
        return grad_h, None, None, None, None


class _ActivationBase(nn.Module):
    """``(1 - t) relu(x) + t sigma(x)`` with ``t = blend`` (1 except during a switch)."""

    bits: int
    ste: str

    def __init__(self, ste: str, alpha: float):
        super().__init__()
        self.ste = _check_ste(ste)
        if not alpha > 0:
            raise BadInputError(f"`alpha` must be a float > 0. Got {alpha!r} instead.")
        self.alpha = ChannelScale(alpha)
        self.theta: ChannelThreshold | None = None  # binary only
        self.blend = 1.0  # t of the ActivationSwitch; not saved: 1 once trained

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def config(self) -> dict[str, Any]:
        """JSON-able description; :func:`activation_from_config` rebuilds the module."""
        return describe_activation_config(self.bits, self.ste)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``sigma(x)``: the scaled level index, coarse gradient when training."""
        h = x if self.theta is None else self.theta(x)
        alpha = self.alpha.per_channel(x, _ALPHA_FLOOR).detach()
        exporting = torch.onnx.is_in_onnx_export()
        if exporting or not (torch.is_grad_enabled() and h.requires_grad):
            index = _level_index(h, alpha, self.levels)
        else:
            theta = alpha * 0 if self.theta is None else self.theta.per_channel(x, 0.0).detach()
            index = _LevelSTE.apply(
                h, alpha, torch.minimum(theta, alpha / 2), self.levels, self.ste
            )
        return self.alpha(index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.blend
        if torch.onnx.is_in_onnx_export() and t != 1:
            raise RuntimeError(
                f"exporting an activation half switched (t = {t}); finish the switch"
            )
        q = self.quantize(x)  # always run: Torch-Pruning must see alpha and theta in the graph
        return q if t >= 1 else (1 - t) * F.relu(x) + t * q

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ste={self.ste!r}"


class BinaryActivation(_ActivationBase):
    """``alpha_c * 1{x > theta_c}`` with the coarse gradient ``ste`` (module docstring).

    ``alpha`` (:class:`ChannelScale`) and ``theta`` (:class:`ChannelThreshold`)
    start as one value shared by all channels (``1{x > 0}`` by default);
    :func:`calibrate` makes them per channel.
    """

    bits = 1

    def __init__(self, ste: str = "clipped_relu", alpha: float = 1.0, theta: float = 0.0):
        super().__init__(ste, alpha)
        self.theta = ChannelThreshold(theta)


class QuantizedActivation(_ActivationBase):
    """Uniform k-bit ``alpha_c * clamp(round(x / alpha_c), 0, 2^k - 1)`` (module docstring).

    ``alpha`` (:class:`ChannelScale`) starts as one value shared by all
    channels; :func:`calibrate` makes it per channel. In ``alpha`` the backward
    is the a.e. exact derivative, the level index (PACT, Choi et al. 2018,
    instead uses the two-valued ``1{x >= (2^k - 1) alpha}`` up to scale).
    """

    def __init__(self, bits: int = 2, ste: str = "clipped_relu", alpha: float = 1.0):
        if _check_bits(bits) == 1:
            raise BadInputError("`bits` = 1 is the binary activation: use BinaryActivation.")
        super().__init__(ste, alpha)
        self.bits = bits


# --------------------------------------------------------------------------- configs


def describe_activation_config(bits: int = 1, ste: str = "clipped_relu") -> dict[str, Any]:
    """JSON-able description of the activation that ``bits`` and ``ste`` select.

    ``{"type": "binary" | "quantized", "bits": int, "ste": str}``. The learned
    ``alpha`` (and binary ``theta``) live in the model's ``state_dict``.
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
    functional: bool = True  # functional ReLUs were looked for (False: nn.ReLU modules only)
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
        if cls.__module__.startswith("torch.nn") or issubclass(cls, _ActivationBase):
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

    report = SwapReport(activation=config, functional=functional)
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
                f"in {suspects[0]} so they can be swapped, or keep the functional ReLUs full "
                f"precision: --set activations.functional=false "
                f"(swap_activations(..., functional=False))."
            ) from err
        logger.debug("torch.fx cannot trace %s (%s); swapping modules only", type(model), err)
        return None
    if not any(_is_functional_relu(n) for n in graph.nodes):
        return None
    name = type(model).__name__
    return fx.GraphModule(model, graph, class_name=name)


# --------------------------------------------------------------------------- calibration


def _activations(model: nn.Module) -> dict[str, _ActivationBase]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _ActivationBase)}


def _channel_rows(x: torch.Tensor, keep: int, gen: torch.Generator) -> torch.Tensor:
    """``relu(x)`` as ``[C, keep]`` (a random sample of each channel's values), on the CPU.

    Channels are dim 1 of inputs with 2 dims (``[N, C]``) or 4 or more
    (``[N, C, H, W]``); other inputs (``[N, L, C]`` is ambiguous) give one row.
    """
    x = x.detach().float().relu()
    rows = x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() in (2, 4, 5) else x.reshape(1, -1)
    pick = torch.randperm(rows.shape[1], generator=gen)[:keep]
    return rows[:, pick.to(rows.device)].cpu()


def lloyd_max_binary(r: torch.Tensor, iterations: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``r >= 0``: the 2-level Lloyd-Max quantiser with levels ``{0, alpha}``.

    Alternates ``theta = alpha / 2`` (the midpoint: the nearest level) and
    ``alpha = E[r | r > theta]`` (the centroid), from ``alpha = E[r | r > 0]``.
    Rows with no positive value get the median of the other rows' alpha.
    """
    alpha = torch.zeros(r.shape[0])
    live = torch.ones(r.shape[0], dtype=torch.bool)
    for i in range(iterations + 1):
        above = r > (alpha / 2)[:, None]
        count = above.sum(1)
        if i == 0:
            live = count > 0
        alpha = torch.where(count > 0, (r * above).sum(1) / count.clamp_min(1), alpha)
    fallback = alpha[live].median() if live.any() else torch.tensor(1.0)
    alpha = torch.where(live, alpha, fallback)
    return alpha, alpha / 2


def mse_best_alpha(r: torch.Tensor, levels: int, grid: int = 64) -> torch.Tensor:
    """Per row of ``r >= 0``: the ``alpha`` of least ``E[(r - alpha clamp(round(r/alpha), 0, L))^2]``,
    searched on ``grid`` points that put the top level between 5% and 100% of the row's max."""
    top = r.amax(1).clamp_min(1e-6)
    best = top / levels
    best_err = torch.full_like(top, float("inf"))
    for frac in torch.linspace(0.05, 1.0, grid):
        alpha = (frac * top / levels)[:, None]
        err = (r - alpha * torch.clamp(torch.round(r / alpha), 0, levels)).pow(2).mean(1)
        better = err < best_err
        best = torch.where(better, alpha[:, 0], best)
        best_err = torch.where(better, err, best_err)
    return best


@torch.no_grad()
def calibrate(
    model: nn.Module, loader: Iterable, device: torch.device, batches: int = 10, samples: int = 4096
) -> dict[str, int]:
    """Set every activation's ``alpha`` (and ``theta``) from ``batches`` training batches.

    Runs the batches through the model in eval mode with full-precision
    activations (``t = 0``, the start of the switch), samples up to ``samples``
    values of each channel's ReLU output, and sets per channel the 2-level
    Lloyd-Max quantiser (binary: :func:`lloyd_max_binary`) or the MSE-best
    ``alpha`` (k-bit: :func:`mse_best_alpha`). An activation called more than
    once per forward (one module shared by several places) gets one value for
    all its channels. Returns ``{name: channels}`` (1 where shared).
    """
    acts = _activations(model)
    if not acts or batches <= 0:
        return {}
    gen = torch.Generator().manual_seed(0)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in acts}
    keep = max(1, samples // batches)
    hooks = [
        act.register_forward_pre_hook(
            lambda m, inputs, n=name: seen[n].append(_channel_rows(inputs[0], keep, gen))
        )
        for name, act in acts.items()
    ]
    blends = {name: act.blend for name, act in acts.items()}
    was_training = model.training
    model.eval()
    ran = 0
    try:
        for act in acts.values():
            act.blend = 0.0
        for x, _ in loader:
            if ran >= batches:
                break
            model(x.to(device))
            ran += 1
    finally:
        for h in hooks:
            h.remove()
        for name, act in acts.items():
            act.blend = blends[name]
        model.train(was_training)
    channels = {}
    for name, act in acts.items():
        rows = seen[name]
        if not rows:
            continue
        shared = len(rows) > ran or len({r.shape[0] for r in rows}) > 1
        r = torch.cat([row.reshape(1, -1) for row in rows], 1) if shared else torch.cat(rows, 1)
        if act.theta is not None:
            alpha, theta = lloyd_max_binary(r)
            act.theta.set_values(theta)
        else:
            alpha = mse_best_alpha(r, act.levels)
        act.alpha.set_values(alpha)
        channels[name] = len(alpha)
    logger.info("calibrated %d activations on %d batches", len(channels), ran)
    return channels


# --------------------------------------------------------------------------- the switch


SWITCH_ORDERS = ("together", "input_first")


def switch_blends(t: float, n: int, order: str) -> list[float]:
    """The blend of each of ``n`` activations (input side first) at switch progress ``t``.

    ``together``: all at ``t``. ``input_first``: one after another, activation
    ``i`` ramps over ``t`` in ``[i/n, (i+1)/n]`` (``clamp(n t - i, 0, 1)``), so the
    layers after it train on its quantised output before they are switched
    themselves (progressive quantisation from the input side, as in Zhuang et
    al., "Towards Effective Low-bitwidth Convolutional Neural Networks", CVPR 2018).
    """
    if order == "together":
        return [t] * n
    if order == "input_first":
        return [min(1.0, max(0.0, n * t - i)) for i in range(n)]
    raise ValueError(f"switch order {order!r}: one of {', '.join(SWITCH_ORDERS)}")


class ActivationSwitch:
    """From full precision to quantised: every activation outputs ``(1 - t_i) relu(x) + t_i sigma(x)``.

    ``t`` rises linearly from 0 to 1 over the first ``fraction`` of the
    ``total_steps`` training steps, then stays 1 (``fraction = 0``: 1 from the
    start); ``order`` maps it to each activation's ``t_i`` (:func:`switch_blends`;
    activations in the order the model registers them, which for a sequential
    network is from the input side). Call it after every optimizer step
    (:meth:`compressor.method.SparseTraining.after_step` does). When ``t``
    reaches 1, ``recalibrate()`` re-estimates the BatchNorm statistics for the
    quantised activations. ``evaluate()`` (the sparse model's accuracy) is
    recorded at ``t = 0, 0.25, 0.5, 0.75`` and after ``t`` reaches 1, for the
    report. :meth:`finish` sets ``t = 1`` for good (the final model, export).
    """

    POINTS = (0.25, 0.5, 0.75)

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        fraction: float,
        *,
        order: str = "together",
        evaluate: Callable[[], float] | None = None,
        recalibrate: Callable[[], None] | None = None,
    ):
        self.model = model
        self.modules = list(_activations(model).values())
        self.fraction = fraction
        self.order = order
        switch_blends(0.0, 0, order)  # an unknown order fails here, not mid-training
        self.ramp_steps = round(fraction * total_steps)
        self.evaluate, self.recalibrate = evaluate, recalibrate
        self.step = 0
        self.trace: list[dict] = []  # {step, t, sparse_accuracy}
        self._apply()

    @property
    def t(self) -> float:
        return 1.0 if self.ramp_steps <= 0 else min(1.0, self.step / self.ramp_steps)

    def _apply(self) -> None:
        blends = switch_blends(self.t, len(self.modules), self.order)
        for m, blend in zip(self.modules, blends, strict=True):
            m.blend = blend

    def _record(self) -> None:
        if self.evaluate is not None:
            self.trace.append({"step": self.step, "t": self.t, "sparse_accuracy": self.evaluate()})

    def __call__(self) -> None:
        """One optimizer step done: advance ``t``."""
        if self.t >= 1:
            return
        if self.step == 0:
            self._record()  # before the switch: t = 0
        before = self.t
        self.step += 1
        self._apply()
        if self.t >= 1:
            self._complete()
        elif any(before < p <= self.t for p in self.POINTS):
            self._record()

    def _complete(self) -> None:
        if self.recalibrate is not None:
            was_training = self.model.training
            self.recalibrate()
            self.model.train(was_training)
        self._record()
        logger.info("activation switch complete at step %d", self.step)

    def finish(self) -> None:
        """``t = 1`` from now on: the final model is the quantised one."""
        self.step = max(self.step, self.ramp_steps)
        self._apply()
        assert all(m.blend == 1 for m in self.modules)

    def state_dict(self) -> dict:
        return {"step": self.step, "trace": list(self.trace)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.trace = list(state["trace"])
        self._apply()

    def summary(self) -> dict:
        """For the report: the schedule and the sparse model's accuracy over the switch."""
        done = [row for row in self.trace if row["t"] >= 1]
        return {
            "fraction": self.fraction,
            "steps": self.ramp_steps,
            "trace": list(self.trace),
            "sparse_accuracy_before": self.trace[0]["sparse_accuracy"]
            if self.trace and self.trace[0]["t"] == 0
            else None,
            "sparse_accuracy_after": done[0]["sparse_accuracy"] if done else None,
        }


def summarize(model: nn.Module) -> dict[str, dict]:
    """Per activation: kind, bits, channels, and the learned ``alpha`` / ``theta``
    (min, median, max, as used: ``theta >= 0``)."""

    def stats(values: torch.Tensor) -> dict[str, float]:
        v = values.detach().float().cpu()
        return {"min": float(v.min()), "median": float(v.median()), "max": float(v.max())}

    out = {}
    for name, act in _activations(model).items():
        row = {**act.config(), "channels": act.alpha.num_parameters}
        row["alpha"] = stats(act.alpha.weight.clamp_min(_ALPHA_FLOOR))
        if act.theta is not None:
            row["theta"] = stats(act.theta.weight.clamp_min(0))
        out[name] = row
    return out
