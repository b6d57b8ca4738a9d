"""Coupled channel groups, built from Torch-Pruning's ``DependencyGraph``.

A channel cannot be removed from one layer alone: a residual add, a concat, a
depthwise conv or a norm layer ties it to other layers. Torch-Pruning finds
these couplings; this module turns each coupled set into a ``ChannelGroup``:
every parameter slice that *produces* one removable channel (conv/linear output
rows and biases, BatchNorm gamma and beta, depthwise conv rows), across all the
layers the coupling ties together. Groups do not overlap, so the group prox is
exact and separable (docs/design.md, "Exact removal").

When every member slice of a channel is exactly zero, the channel is zero, and
removing it (and the consumers' input slices that read it) changes no output,
provided every op on the way maps 0 to 0. ``build_groups`` checks this with a
probe (all groups zeroed at once, consumers' inputs must read exact zeros) and
leaves out any group where it does not hold.

All heavy work is vectorised per member tensor (a handful per group), never a
Python loop per channel.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch_pruning as tp
from torch import nn

from compressor import attention as _attention
from compressor.attention import ATTENTION_REASON, MHA_REASON, SCALE_NORM_REASON
from compressor.errors import BadInputError

__all__ = [
    "ATTENTION_REASON",
    "MHA_REASON",
    "NORM_STREAM_REASON",
    "SCALE_NORM_REASON",
    "SHUFFLE_REASON",
    "ChannelGroup",
    "ChannelGroups",
    "build_groups",
]

log = logging.getLogger(__name__)

_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
# Norms whose statistics mix channels: a zero channel changes the others' output.
_CHANNEL_MIXING_NORMS = (nn.LayerNorm,)
# GroupNorm mixes the channels of one of its groups only: a whole group (its producers'
# rows, gamma and beta zero) normalises to exact zeros and leaves the other groups' mean and
# variance alone, so it is one removable unit (FCOS's head towers). With one group it is a
# LayerNorm over the channels: nothing to remove.


# Norms whose per-channel gamma and beta are member slices of a channel's group.
_AFFINE_NORMS = (*_NORM_LAYERS, nn.GroupNorm)


def _mixes_all_channels(module: nn.Module) -> bool:
    return isinstance(module, _CHANNEL_MIXING_NORMS) or (
        isinstance(module, nn.GroupNorm) and module.num_groups == 1
    )


NORM_STREAM_REASON = (
    "{kind} normalises over these channels: removing one changes the mean and variance"
)
SHUFFLE_REASON = (
    "channel shuffle interleaves two branches' channels: removal through it is not supported yet"
)


@dataclass(frozen=True)
class Slice:
    """Rows ``index`` (along dim 0) of parameter ``param``; row i belongs to group channel ``channel[i]``."""

    param: str
    index: torch.Tensor
    channel: torch.Tensor

    @cached_property
    def span(self) -> tuple[int, int] | None:
        """``(start, length)`` when ``index`` is ``start, start+1, ...`` in order, else None.

        Such rows are the view ``t.narrow(0, start, length)``: the group norms and
        the shrink then read and scale the tensor in place, with no gather and
        scatter copies (every member of resnet18's groups is its whole tensor).
        Computed once, on first use.
        """
        n = len(self.index)
        if n == 0:
            return None
        start = int(self.index[0])
        ok = torch.equal(self.index.cpu(), torch.arange(start, start + n, dtype=self.index.dtype))
        return (start, n) if ok else None

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The member rows of ``t`` (a view when :attr:`span` is set, else a gathered copy)."""
        if self.span is not None:
            return t.narrow(0, *self.span)
        return t.index_select(0, self.index.to(t.device))


@dataclass(frozen=True)
class Consumer:
    """Input positions ``index`` (dim 1 of a conv/linear weight) of ``module`` that read group channels."""

    module: str
    index: torch.Tensor
    channel: torch.Tensor


@dataclass(frozen=True)
class ChannelGroup:
    """All producer slices of ``size`` coupled channels, rooted at ``root`` (a conv or linear).

    A grouped convolution (not depthwise) can only lose the same positions in
    every one of its conv groups, so the channels it ties are merged into one
    unit: then ``root_unit[c]`` is the unit of root channel ``c`` and ``size``
    counts units. Slices' ``channel`` tensors always index units.

    A group of attention heads (``attention`` names the module, ``root`` its packed q/k/v
    projection: ``qkv`` or ``in_proj_weight``) has one unit per head: its q, k and v rows
    of that projection (and of ``gate``), weights and biases, and its ``head_dim`` input
    columns of the output projection (compressor/attention.py).
    A group of hidden units (``hidden`` names the module, ``root`` the Linear whose output
    rows they are) holds the units of a small MLP inside a module that Torch-Pruning does not
    trace, such as Swin V2's position bias MLP (:class:`compressor.attention.HiddenUnitsKind`).
    ``other_macs`` are the MACs one unit costs outside conv/linear layers (a head's
    attention products, and projections applied functionally), which removing it saves too;
    ``other_params`` likewise its parameters outside conv/linear layers (``in_proj_weight``
    rows, a relative position bias column).
    """

    root: str
    size: int
    members: tuple[Slice, ...]
    consumers: tuple[Consumer, ...]
    weights_per_channel: int  # |g|: scalars in one unit's norm slices
    root_unit: torch.Tensor | None = None
    norm_params: frozenset[str] | None = None  # members that measure a unit (None: all)
    attention: str | None = None  # the attention module whose heads are the units
    hidden: str | None = None  # the module whose inner MLP's hidden units are the units
    other_macs: float = 0.0  # MACs per unit outside conv/linear layers
    other_params: float = 0.0  # parameters per unit outside conv/linear layers

    @property
    def norm_members(self) -> tuple[Slice, ...]:
        """The slices whose norm measures a unit.

        A conv or linear layer followed by BatchNorm is scale-invariant: its rows
        can shrink without changing the network, so the loss does not defend
        their norm, and a penalty on it would zero channels the network needs.
        Where a group has norm-layer entries, they (gamma and beta, the
        channel's real output scale and offset) measure the unit; the group
        shrink still scales and zeroes every member slice.
        """
        if self.norm_params is None:
            return self.members
        return tuple(m for m in self.members if m.param in self.norm_params)

    def root_channels(self, unit_mask: torch.Tensor) -> list[int]:
        """Root-layer channel indices of the units where ``unit_mask`` is True."""
        if self.root_unit is None:
            return torch.nonzero(unit_mask.cpu()).flatten().tolist()
        return torch.nonzero(unit_mask.cpu()[self.root_unit]).flatten().tolist()

    @property
    def params(self) -> list[str]:
        return sorted({m.param for m in self.members})


@dataclass(frozen=True)
class LayerInfo:
    """A conv or linear layer as the cost model sees it."""

    name: str
    kind: str  # "conv" | "linear"
    in_channels: int
    out_channels: int
    groups: int
    macs: int
    params: int  # weight and bias
    bias: int = 0  # of params: one per output channel, whatever the inputs kept

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels


@dataclass
class ChannelGroups:
    """The groups of one model plus what is needed to cost a zero pattern."""

    groups: list[ChannelGroup]
    layers: dict[str, LayerInfo]
    total_macs: int
    total_params: int
    # Layers whose output channels stay whole, with the reason (layer name -> reason).
    # The classifier and the layers ``keep`` names are not listed: they are kept on request.
    excluded: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)

    @property
    def params(self) -> list[str]:
        """Names of every parameter that some group touches."""
        return sorted({p for g in self.groups for p in g.params})

    @property
    def total_channels(self) -> int:
        return sum(g.size for g in self.groups)

    @staticmethod
    def _unit_sums(group: ChannelGroup, members, row_values) -> torch.Tensor:
        """Per unit of ``group``, the sum of ``row_values(member)`` (one value per member row).

        ``row_values`` may return None for a member that adds nothing; a unit
        no member adds to sums to 0.
        """
        total = None
        for member in members:
            contrib = row_values(member)
            if contrib is None:
                continue
            if total is None:
                total = torch.zeros(group.size, dtype=contrib.dtype, device=contrib.device)
            total.index_add_(0, member.channel.to(total.device), contrib)
        return total if total is not None else torch.zeros(group.size)

    def channel_norms(
        self, tensors: Mapping[str, torch.Tensor], *, all_members: bool = False
    ) -> list[torch.Tensor]:
        """L2 norm of every unit's norm slices (``all_members``: of all its slices), per group."""

        def squared_row_norms(member: Slice) -> torch.Tensor:
            rows = member.rows(tensors[member.param].detach())
            # Row norms without a full-size squared copy, then squared back.
            return torch.linalg.vector_norm(rows.reshape(len(member.index), -1), dim=1).square_()

        return [
            self._unit_sums(
                group, group.members if all_members else group.norm_members, squared_row_norms
            ).sqrt_()
            for group in self.groups
        ]

    @torch.no_grad()
    def channel_taylor(
        self, tensors: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor | None]
    ) -> list[torch.Tensor]:
        """Per group, each unit's ``sum(w * dL/dw)`` over its norm slices.

        Zeroing a unit's norm slices (its BatchNorm gamma and beta, or all its
        slices where it has none) removes the channel, so minus this sum is the
        first-order change of the loss that removal causes (Molchanov et al.,
        "Importance estimation for neural network pruning", CVPR 2019, eq. 4
        and the BatchNorm variant of section 3). A slice with no gradient adds 0.
        """

        def row_products(member: Slice) -> torch.Tensor | None:
            grad = grads.get(member.param)
            if grad is None:
                return None
            w = member.rows(tensors[member.param].detach())
            return (w * member.rows(grad)).reshape(len(member.index), -1).sum(dim=1)

        return [self._unit_sums(group, group.norm_members, row_products) for group in self.groups]

    def zero_masks(self, tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """True where every member slice of the channel is exactly zero."""
        return [n == 0 for n in self.channel_norms(tensors, all_members=True)]

    @torch.no_grad()
    def scale_(
        self, tensors: Mapping[str, torch.Tensor], factors: Sequence[torch.Tensor | None]
    ) -> None:
        """Multiply every member slice of channel c of group g by ``factors[g][c]``, in place;
        a group whose factor is None is left alone."""
        for group, factor in zip(self.groups, factors, strict=True):
            if factor is None:
                continue
            for member in group.members:
                t = tensors[member.param]
                f = factor.to(t.device, t.dtype).index_select(0, member.channel.to(t.device))
                f = f.view(-1, *([1] * (t.dim() - 1)))
                if member.span is not None:
                    t.narrow(0, *member.span).mul_(f)
                else:
                    index = member.index.to(t.device)
                    t.index_copy_(0, index, t.index_select(0, index) * f)

    def copy_units_(
        self,
        dst: Mapping[str, torch.Tensor],
        src: Mapping[str, torch.Tensor],
        masks: Sequence[torch.Tensor],
        *,
        skip_missing: bool = False,
    ) -> None:
        """Copy every member slice of the units where ``masks[g]`` is True from ``src`` into
        ``dst``, in place (the accuracy seeker's rollback of the channels it zeroed).
        ``skip_missing``: members whose tensor ``dst`` lacks are left out (an optimizer's
        buffers, which frozen parameters have none of)."""
        for group, mask in zip(self.groups, masks, strict=True):
            if not bool(mask.any()):
                continue
            for member in group.members:
                if skip_missing and member.param not in dst:
                    continue
                t = dst[member.param]
                chosen = mask.to(member.channel.device).index_select(0, member.channel)
                rows = member.index[chosen].to(t.device)
                t.index_copy_(0, rows, src[member.param].to(t.device).index_select(0, rows))

    def row_factor_index(self, rows: Mapping[str, int]) -> torch.Tensor:
        """Where each row's shrink factor sits in ``cat(factors + [1])``, for tensors ``rows``.

        ``rows`` maps tensor names to their row counts (dim 0), in the order the
        rows are laid out; a row outside every group points at the final 1.
        :meth:`row_factors` then gives every row's factor with one gather, so a
        fused loop can scale all member slices at once (the same products as
        :meth:`scale_`).
        """
        offsets, total = {}, 0
        for name, n in rows.items():
            offsets[name] = total
            total += n
        group_offset, units = [], 0
        for group in self.groups:
            group_offset.append(units)
            units += group.size
        index = torch.full((total,), units, dtype=torch.long)  # the trailing 1
        for group, start in zip(self.groups, group_offset, strict=True):
            for member in group.members:
                if member.param in offsets:
                    positions = offsets[member.param] + member.index.cpu()
                    index[positions] = start + member.channel.cpu()
        return index

    @staticmethod
    def row_factors(factors: Sequence[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """Every row's factor (``index`` from :meth:`row_factor_index`); factors per group and unit."""
        dtype, device = (factors[0].dtype, factors[0].device) if factors else (None, index.device)
        flat = torch.cat([*factors, torch.ones(1, dtype=dtype, device=device)])
        return flat.index_select(0, index.to(device))

    def layer_keep(self, zero_masks: Sequence[torch.Tensor]) -> dict[str, tuple[float, float]]:
        """Per conv/linear layer, the shares ``(keep_in, keep_out)`` of its input and output
        channels left once the masked units are removed (a depthwise conv's input follows
        its output: ``keep_in`` is 1, its cost scales with ``keep_out`` alone)."""
        out_zero: dict[str, float] = {}
        in_zero: dict[str, float] = {}
        for group, mask in zip(self.groups, zero_masks, strict=True):
            maskf = mask.float().cpu()
            for member in group.members:
                layer = member.param.rsplit(".", 1)[0]
                if member.param.endswith(".weight") and layer in self.layers:
                    out_zero[layer] = out_zero.get(layer, 0.0) + float(
                        maskf.index_select(0, member.channel.cpu()).sum()
                    )
            for consumer in group.consumers:
                in_zero[consumer.module] = in_zero.get(consumer.module, 0.0) + float(
                    maskf.index_select(0, consumer.channel.cpu()).sum()
                )
        keep = {}
        for name, info in self.layers.items():
            keep_out = 1.0 - out_zero.get(name, 0.0) / info.out_channels
            keep_in = 1.0 if info.depthwise else 1.0 - in_zero.get(name, 0.0) / info.in_channels
            keep[name] = (keep_in, keep_out)
        return keep

    def estimate_cost(self, zero_masks: Sequence[torch.Tensor]) -> tuple[float, float]:
        """MACs and params of the model once the masked channels are removed.

        Exact for conv and linear layers (their MACs are in*out*k*k*H*W/groups; a bias
        shrinks with the outputs only) and for the attention products of removed heads; other ops keep their cost
        (``torch.utils.flop_counter`` does not count them).
        BatchNorm parameters are ignored (a rounding error on any real CNN).
        """
        macs, params = float(self.total_macs), float(self.total_params)
        for name, (keep_in, keep_out) in self.layer_keep(zero_masks).items():
            info = self.layers[name]
            fraction = keep_out * keep_in
            macs -= info.macs * (1.0 - fraction)
            params -= (info.params - info.bias) * (1.0 - fraction) + info.bias * (1.0 - keep_out)
        for group, mask in zip(self.groups, zero_masks, strict=True):
            if group.other_macs or group.other_params:
                macs -= group.other_macs * float(mask.sum())
                params -= group.other_params * float(mask.sum())
        return macs, params

    def _saved_per_unit(self, cost: str) -> list[float]:
        """Per group, the ``cost`` (``macs`` or ``params`` of conv/linear layers) that removing
        one unit saves, first-order (nothing else removed): its rows in every member layer
        (bias included) and its input columns in every consumer (bias excluded)."""
        out = []
        for group in self.groups:
            saved = 0.0
            for member in group.members:
                layer = member.param.rsplit(".", 1)[0]
                info = self.layers.get(layer)
                if info is not None and member.param.endswith(".weight"):
                    saved += (
                        getattr(info, cost) * len(member.index) / info.out_channels / group.size
                    )
            for consumer in group.consumers:
                info = self.layers[consumer.module]
                # a consumer's bias stays: it belongs to its outputs, not to its inputs' columns
                whole = info.macs if cost == "macs" else info.params - info.bias
                saved += whole * len(consumer.index) / info.in_channels / group.size
            saved += group.other_macs if cost == "macs" else group.other_params
            out.append(saved)
        return out

    def unit_blocks(self, block: int) -> list[int]:
        """Per group, the multiple of units it keeps so that its root layer keeps a multiple
        of ``block`` channels (``prune.round_to``; the runtime's channel block): ``block /
        gcd(block, w)`` for units of ``w`` channels (1 for single channels; a grouped conv's
        or a GroupNorm's groups: fewer units than channels). 1 for attention heads: they
        run in matrix products, which have no channel block."""
        block = max(1, int(block))
        blocks = []
        for g in self.groups:
            width = 1 if g.root_unit is None else len(g.root_unit) // g.size
            blocks.append(1 if g.attention is not None else block // math.gcd(block, width))
        return blocks

    def macs_per_channel(self) -> list[float]:
        """MACs saved by removing one unit of each group (first-order, nothing else removed)."""
        return self._saved_per_unit("macs")

    def weights_removed_per_unit(self) -> list[float]:
        """``|g|``: the conv/linear weights that removing one unit of each group removes."""
        return self._saved_per_unit("params")


def _dim_name(module: nn.Module) -> str:
    return "conv" if isinstance(module, nn.modules.conv._ConvNd) else "linear"


def find_classifier(model: nn.Module, example_input: torch.Tensor) -> str | None:
    """Name of the last conv/linear layer executed: the classifier, whose outputs are never pruned."""
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
            handles.append(module.register_forward_hook(lambda m, i, o, n=name: order.append(n)))
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            model(example_input)
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return order[-1] if order else None


def layer_costs(
    model: nn.Module, example_input: torch.Tensor, *, other: Mapping[str, int] | None = None
) -> tuple[dict[str, LayerInfo], int]:
    """Per conv/linear layer MACs (from ``torch.utils.flop_counter``) and the model's total MACs.

    ``other``, where given, is filled with the MACs of every attention module
    (:func:`compressor.attention.is_attention`) spent outside its conv/linear children's own
    forward calls: its attention products, and the projections it applies functionally
    (``nn.MultiheadAttention``'s and Swin's call ``F.linear`` on their weights).
    """
    from compressor.metrics import count_macs_per_module

    attention = tuple(n for n, m in model.named_modules() if n and _attention.is_attention(m))
    per_module, total = count_macs_per_module(model, example_input, also=attention)
    if other is not None:
        for name in attention:
            inner = sum(
                per_module.get(f"{name}.{child}", 0)
                for child, sub in model.get_submodule(name).named_modules()
                if child and isinstance(sub, nn.modules.conv._ConvNd | nn.Linear)
            )
            other[name] = max(per_module.pop(name, 0) - inner, 0)
    else:
        for name in attention:
            per_module.pop(name, None)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            in_ch, out_ch, groups = module.in_channels, module.out_channels, module.groups
        elif isinstance(module, nn.Linear):
            in_ch, out_ch, groups = module.in_features, module.out_features, 1
        else:
            continue
        params = sum(p.numel() for p in module.parameters(recurse=False))
        bias = module.bias.numel() if module.bias is not None else 0
        layers[name] = LayerInfo(
            name, _dim_name(module), in_ch, out_ch, groups, per_module.get(name, 0), params, bias
        )
    return layers, total


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def build_groups(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    keep: Sequence[str] = (),
    keep_classifier: bool = True,
    check_exactness: bool = True,
) -> ChannelGroups:
    """Find the coupled channel groups of ``model``.

    Parameters
    ----------
    model:
        Any module Torch-Pruning can trace with ``example_input``.
    keep:
        fnmatch patterns of module names whose output channels are never removed
        (their whole coupled group is kept).
    keep_classifier:
        Keep the outputs of the last conv/linear layer executed (the classifier).
    check_exactness:
        Zero every group at once on a copy of the model and drop the groups whose
        consumers then read anything but exact zeros (a sigmoid or softplus on
        the channel path): removing those channels would change the output.
    """
    model_device = next(model.parameters()).device
    example_input = example_input.to(model_device)
    name_of = {m: n for n, m in model.named_modules()}
    ignored = _kept_modules(model, example_input, keep, keep_classifier, name_of)
    kept = {name_of[m] for m in ignored}

    was_training = model.training
    model.eval()
    with traceable():
        dg = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_input, verbose=False
        )
    excluded, head_modules, head_layers = _left_whole_before_tracing(model, dg, name_of)
    # the attention modules too: Torch-Pruning would prune nn.MultiheadAttention by embed_dim
    ignored += [model.get_submodule(n) for n in {*excluded, *head_layers, *head_modules}]

    groups: list[ChannelGroup] = []
    for tp_group in dg.get_all_groups(ignored_layers=ignored):
        group, reason = _channel_group(model, tp_group, name_of, dg)
        if reason is not None:
            root = name_of[tp_group[0].dep.target.module]
            for layer in [root, *_producers(tp_group, name_of, dg)]:
                excluded.setdefault(layer, reason)
        else:
            groups.append(group)

    other_macs: dict[str, int] = {}
    layers, total_macs = layer_costs(model, example_input, other=other_macs)
    for name in head_modules:
        if _matches(name, keep) or any(
            _matches(layer, keep) for layer in head_layers if layer.startswith(f"{name}.")
        ):
            continue  # kept on request (prune.keep): not explained, like the classifier
        groups.append(_head_group(model, name, other_macs.get(name, 0)))
    for name, kind in _hidden_kinds(model, head_modules):
        if not (_matches(name, keep) or _matches(f"{name}.{kind.producer}", keep)):
            groups.append(_hidden_group(model, name, kind))
    total_params = sum(p.numel() for p in model.parameters())
    result = ChannelGroups(groups, layers, total_macs, total_params, excluded)
    if check_exactness and groups:
        _drop_inexact_groups(model, result, example_input)
    _explain_the_rest(result, dg, name_of, kept)
    model.train(was_training)
    for layer, why in excluded.items():
        log.info("layer %s is left whole: %s", layer, why)
    return result


def _kept_modules(model, example_input, keep, keep_classifier, name_of) -> list[nn.Module]:
    """The modules whose outputs stay: those ``prune.keep`` names, and the classifier."""
    ignored = [m for n, m in model.named_modules() if n and keep and _matches(n, keep)]
    classifier = find_classifier(model, example_input) if keep_classifier else None
    if classifier is not None:
        ignored.append(model.get_submodule(classifier))
    unknown = [p for p in keep if not any(fnmatch.fnmatchcase(n, p) for n in name_of.values())]
    if unknown:
        raise BadInputError(
            f"prune.keep pattern(s) {unknown} match no module of the model. "
            f"Module names look like: {[n for n in list(name_of.values())[1:6]]}."
        )
    return ignored


def _left_whole_before_tracing(model, dg, name_of) -> tuple[dict[str, str], list[str], list[str]]:
    """Layers left whole before any group is traced (layer -> reason), the attention modules
    whose heads are units, and their layers. Torch-Pruning would trace the LayerNorm-normalised
    streams as huge groups only for them to be dropped (Swin: minutes), and fails on a channel
    shuffle's or an attention's reshapes."""
    whole_attention, head_modules = _attention_layers(model)
    excluded: dict[str, str] = {**whole_attention, **_stream_reasons(dg, name_of)}
    head_layers, consumers_of_heads = [], set()
    for name in head_modules:
        kind = _attention.heads_kind(model.get_submodule(name))
        consumers_of_heads.add(f"{name}.{kind.consumer}")
        head_layers += [f"{name}.{child}" for child in kind.present_layers()]
    for layer in head_layers:  # heads are their units; proj's outputs keep their own reason
        if layer not in consumers_of_heads:
            excluded.pop(layer, None)
    return excluded, head_modules, head_layers


def _channel_group(model, tp_group, name_of, dg) -> tuple[ChannelGroup | None, str | None]:
    """One Torch-Pruning group as a :class:`ChannelGroup` (its member slices and consumers,
    units tied by grouped convs and GroupNorm), or why its channels cannot be removed."""
    root = name_of[tp_group[0].dep.target.module]
    size = len(tp_group[0].idxs)
    members: list[Slice] = []
    consumers: list[Consumer] = []
    for item in tp_group:
        module, handler = item.dep.target.module, item.dep.handler
        if type(item.dep.target.grad_fn).__name__ == _ShuffleBarrier.__name__ + "Backward":
            return None, SHUFFLE_REASON
        if not isinstance(module, nn.Module):
            return None, "a bare nn.Parameter is coupled to it"
        if module not in name_of:
            continue  # Torch-Pruning's placeholder for a functional op (add, cat, flatten ...)
        mname = name_of[module]
        idx = torch.as_tensor(item.idxs, dtype=torch.long)
        ch = torch.as_tensor(item.root_idxs, dtype=torch.long)
        if _mixes_all_channels(module):
            return None, NORM_STREAM_REASON.format(kind=type(module).__name__)
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                return None, f"transposed conv `{mname}` is not supported"
            if dg.is_out_channel_pruning_fn(handler) or _depthwise(module):
                members.append(Slice(f"{mname}.weight", idx, ch))
                if module.bias is not None:
                    members.append(Slice(f"{mname}.bias", idx, ch))
            else:
                consumers.append(Consumer(mname, idx, ch))
        elif isinstance(module, _AFFINE_NORMS) and module.affine:
            members.append(Slice(f"{mname}.weight", idx, ch))
            members.append(Slice(f"{mname}.bias", idx, ch))
        # a PReLU's slope slice goes with its channel and need not be zero: prelu(0) = 0
    if not members:
        return None, "no parameter produces its channels"
    members, consumers, size, root_unit = _tie_grouped_convs(model, members, consumers, size)
    # A module listed twice (e.g. root and member) would double count; merge by param.
    members = _merge_slices(members)
    norm_params = (
        frozenset(
            m.param
            for m in members
            if isinstance(model.get_submodule(m.param.rsplit(".", 1)[0]), _AFFINE_NORMS)
        )
        or None
    )
    measured = [m for m in members if norm_params is None or m.param in norm_params]
    per_channel = sum(len(m.index) * _row_numel(model, m.param) for m in measured) // size
    group = ChannelGroup(
        root, size, tuple(members), tuple(consumers), per_channel, root_unit, norm_params
    )
    return group, None


def _drop_inexact_groups(model, result: ChannelGroups, example_input) -> None:
    """Drop the groups whose consumers read anything but exact zeros once every group is
    zeroed (a sigmoid or softplus on the channel path), with their reason."""
    inexact = set(_inexact_groups(model, result, example_input))
    for group in result.groups:
        if group.root in inexact:
            for layer in [group.root, *_member_layers(group, result.layers)]:
                result.excluded.setdefault(
                    layer,
                    "an op on its path maps 0 to non-zero (e.g. sigmoid), removal would not be exact",
                )
    result.groups = [g for g in result.groups if g.root not in inexact]


class _ShuffleBarrier(torch.autograd.Function):
    """Stands in for a channel shuffle while Torch-Pruning traces: an identity whose node
    :func:`build_groups` recognises, so every group through a shuffle is left whole (the
    shuffle's view-transpose-view cannot be traced: Torch-Pruning fails on it)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


@contextmanager
def traceable():
    """Make the graph of the loaded models traceable by Torch-Pruning, for the duration.

    torchvision's ShuffleNetV2 calls its module-level ``channel_shuffle``; it is replaced by
    :class:`_ShuffleBarrier`. Torch-Pruning's graphs (here and in ``prune.py``) are built
    inside this context; the model's own forward outside it is untouched.
    """
    shufflenet = sys.modules.get("torchvision.models.shufflenetv2")
    original = getattr(shufflenet, "channel_shuffle", None)
    if original is not None:
        shufflenet.channel_shuffle = lambda x, groups: _ShuffleBarrier.apply(x)
    try:
        yield
    finally:
        if original is not None:
            shufflenet.channel_shuffle = original


def _attention_layers(model: nn.Module) -> tuple[dict[str, str], list[str]]:
    """The attention modules whose heads stay whole, with their projections (layer ->
    reason), and the names of those whose heads are removable units.

    An attention module (``nn.MultiheadAttention``, or any module with ``num_heads``, as
    timm's and torchvision's Swin attention have) reshapes its q, k, v rows into heads with a
    fixed head width, so its projections cannot lose rows one by one; whole heads can go
    where the forward is known to follow ``num_heads`` (compressor/attention.py).
    """
    out: dict[str, str] = {}
    heads: list[str] = []
    for name, module in model.named_modules():
        if not _attention.is_attention(module):
            continue
        reason = _attention.heads_reason(module)
        if reason is None:
            heads.append(name)
            continue
        projections = [
            f"{name}.{child}"
            for child, sub in module.named_children()
            if isinstance(sub, nn.Linear | nn.modules.conv._ConvNd)
        ]
        out.update(dict.fromkeys([name, *projections], reason))
    return out, heads


def _head_group(model: nn.Module, name: str, other_macs: int) -> ChannelGroup:
    """The group whose units are the heads of attention module ``name`` (the module's
    :class:`compressor.attention.HeadsKind` says where they are)."""
    kind = _attention.heads_kind(model.get_submodule(name))
    heads = kind.num_heads
    members = [Slice(f"{name}.{param}", rows, head) for param, rows, head in kind.members()]
    cols, col_head = kind.columns()
    per_unit = sum(len(m.index) * _row_numel(model, m.param) for m in members) // heads
    return ChannelGroup(
        f"{name}.{kind.root}",
        heads,
        tuple(members),
        (Consumer(f"{name}.{kind.consumer}", cols, col_head),),
        per_unit,
        attention=name,
        other_macs=other_macs / heads,
        other_params=kind.other_params(),
    )


def _hidden_kinds(
    model: nn.Module, modules: Iterable[str]
) -> list[tuple[str, _attention.HiddenUnitsKind]]:
    """The ``modules`` that hold hidden units Torch-Pruning does not trace, with their kind."""
    found = []
    for name in modules:
        kind = _attention.hidden_units_kind(model.get_submodule(name))
        if kind is not None:
            found.append((name, kind))
    return found


def _hidden_group(model: nn.Module, name: str, kind: _attention.HiddenUnitsKind) -> ChannelGroup:
    """The group whose units are the hidden units of module ``name``'s inner MLP."""
    members = [Slice(f"{name}.{param}", rows, unit) for param, rows, unit in kind.members()]
    cols, col_unit = kind.columns()
    per_unit = sum(len(m.index) * _row_numel(model, m.param) for m in members) // kind.size
    return ChannelGroup(
        f"{name}.{kind.producer}",
        kind.size,
        tuple(members),
        (Consumer(f"{name}.{kind.consumer}", cols, col_unit),),
        per_unit,
        hidden=name,
    )


def _stream_reasons(dg, name_of: Mapping[nn.Module, str]) -> dict[str, str]:
    """Conv/linear layers whose channels a LayerNorm (or a one-group GroupNorm) or a channel
    shuffle couples (layer -> reason).

    From each layer's output the coupled ops are followed as Torch-Pruning would, without
    its index bookkeeping: through every op that keeps channels apart (elementwise ops, adds,
    concats, reshapes, depthwise convs, BatchNorm, GroupNorm) both ways, stopping at the layers that mix
    them (conv, linear, attention). A LayerNorm on the way normalises the channel together
    with the others, so a zero channel changes their output; a shuffle is not traced. Either
    way the whole stream stays whole, and is never handed to Torch-Pruning's group tracing.
    """
    out = {}
    for module, node in dg.module2node.items():
        if not isinstance(module, nn.modules.conv._ConvNd | nn.Linear) or module not in name_of:
            continue
        stack = list(node.outputs) + (list(node.inputs) if _depthwise(module) else [])
        seen = {id(node)}
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            m = n.module
            if _mixes_all_channels(m):
                out[name_of[module]] = NORM_STREAM_REASON.format(kind=type(m).__name__)
                break
            if type(n.grad_fn).__name__ == _ShuffleBarrier.__name__ + "Backward":
                out[name_of[module]] = SHUFFLE_REASON
                break
            mixes = isinstance(m, nn.modules.conv._ConvNd | nn.Linear | nn.MultiheadAttention)
            if not (mixes and not _depthwise(m)):
                stack.extend(n.outputs)
                stack.extend(n.inputs)
    return out


def _depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def _producers(tp_group, name_of, dg) -> list[str]:
    """Conv/linear layers whose output channels a Torch-Pruning group removes."""
    return [
        name_of[item.dep.target.module]
        for item in tp_group
        if isinstance(item.dep.target.module, nn.modules.conv._ConvNd | nn.Linear)
        and item.dep.target.module in name_of
        and dg.is_out_channel_pruning_fn(item.dep.handler)
    ]


def _member_layers(group: ChannelGroup, layers: Mapping[str, LayerInfo]) -> list[str]:
    names = {m.param.rsplit(".", 1)[0] for m in group.members}
    return sorted(n for n in names if n in layers)


def _explain_the_rest(result: ChannelGroups, dg, name_of, kept: set[str]) -> None:
    """Give a reason to every conv/linear layer no group thins and none explains yet."""
    thinned = {layer for g in result.groups for layer in _member_layers(g, result.layers)}
    traced = {name_of[m] for m in dg.module2node if m in name_of}
    for name in result.layers:
        if name in thinned or name in kept or name in result.excluded:
            continue
        result.excluded[name] = (
            "coupled to a layer kept whole (prune.keep or the classifier)"
            if name in traced
            else "not traced as a module from the model's input (its weight is used "
            "functionally, or it runs on a constant such as a position-bias table)"
        )


def _grouped_conv(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and not (module.groups == module.in_channels == module.out_channels)
    )


def _tie_grouped_convs(model, members, consumers, size):
    """Merge channels that a grouped conv ties (same position in each conv group), or that a
    GroupNorm normalises together (one of its groups), into units."""
    parent = list(range(size))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    tied = False
    pairs = [(m.param.rsplit(".", 1)[0], m.index, m.channel, "out") for m in members]
    pairs += [(c.module, c.index, c.channel, "in") for c in consumers]
    for module_name, index, channel, side in pairs:
        module = model.get_submodule(module_name)
        if isinstance(module, nn.GroupNorm):  # a norm group's channels: one unit
            position = index // (module.num_channels // module.num_groups)
        elif _grouped_conv(module):  # the same position in every conv group: one unit
            width = (module.out_channels if side == "out" else module.in_channels) // module.groups
            position = index % width
        else:
            continue
        tied = True
        first_at: dict[int, int] = {}
        for pos, ch in zip(position.tolist(), channel.tolist(), strict=True):
            if pos in first_at:
                a, b = find(first_at[pos]), find(ch)
                if a != b:
                    parent[b] = a
            else:
                first_at[pos] = ch
    if not tied:
        return members, consumers, size, None
    roots = torch.tensor([find(i) for i in range(size)])
    _, root_unit = torch.unique(roots, return_inverse=True)
    n_units = int(root_unit.max()) + 1
    members = [Slice(m.param, m.index, root_unit[m.channel]) for m in members]
    consumers = [Consumer(c.module, c.index, root_unit[c.channel]) for c in consumers]
    return members, consumers, n_units, root_unit


def _row_numel(model: nn.Module, param: str) -> int:
    t = model.get_parameter(param)
    return t[0].numel() if t.dim() > 1 else 1


def _merge_slices(slices: list[Slice]) -> list[Slice]:
    by_param: dict[str, list[Slice]] = {}
    for s in slices:
        by_param.setdefault(s.param, []).append(s)
    merged = []
    for param, parts in by_param.items():
        index = torch.cat([p.index for p in parts])
        channel = torch.cat([p.channel for p in parts])
        index, order = torch.unique(index, return_inverse=True)
        first = torch.full((len(index),), -1, dtype=torch.long)
        first.scatter_(0, order, channel)
        merged.append(Slice(param, index, first))
    return merged


@torch.no_grad()
def _inexact_groups(
    model: nn.Module, groups: ChannelGroups, example_input: torch.Tensor
) -> list[str]:
    """Roots of groups whose consumers do not read exact zeros once every group is zeroed."""
    probe = copy.deepcopy(model).eval()
    tensors = dict(probe.named_parameters())
    groups.scale_(tensors, [torch.zeros(g.size) for g in groups.groups])
    seen: dict[str, torch.Tensor] = {}
    handles = []
    watched = {c.module for g in groups.groups for c in g.consumers}
    for name, module in probe.named_modules():
        if name in watched:

            def hook(m, inputs, n=name):
                x = inputs[0]
                if isinstance(m, nn.Linear):  # features last, any leading dims
                    x = x.reshape(-1, x.shape[-1]).t()
                else:  # channels at dim 1
                    x = x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() > 2 else x.t()
                seen[n] = x.abs().amax(dim=1)

            handles.append(module.register_forward_pre_hook(hook))
    try:
        probe(example_input)
    finally:
        for h in handles:
            h.remove()
    bad = []
    for group in groups.groups:
        for consumer in group.consumers:
            if consumer.module in seen and bool(
                (
                    seen[consumer.module].index_select(
                        0, consumer.index.to(seen[consumer.module].device)
                    )
                    != 0
                ).any()
            ):
                bad.append(group.root)
                break
    return bad
