"""Remove exactly-zero channel groups, through Torch-Pruning, and prove nothing changed.

A channel whose producer slices are all exactly zero outputs zero, so removing
it and the consumers' input slices that read it leaves the model's function
unchanged (docs/math.md, "Why removal is exact"). This module
does the removal and then measures the difference on sample inputs; a
difference above the tolerance raises ``VerificationError`` instead of shipping
a model that changed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from compressor.attention import remove_heads, remove_hidden_units
from compressor.errors import VerificationError
from compressor.groups import ChannelGroups, traceable

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """What ``prune_zero_channels`` removed and how far the outputs moved."""

    removed: dict[str, list[int]]  # group root -> removed channel indices
    kept: dict[str, int]  # group root -> channels left
    layers: dict[str, dict] = field(default_factory=dict)  # module -> shape before/after
    max_abs_diff: float = 0.0
    relative_diff: float = 0.0  # max abs diff / max abs output

    @property
    def channels_removed(self) -> int:
        return sum(len(v) for v in self.removed.values())


def units_to_remove(zero_mask: torch.Tensor, round_to: int = 1) -> torch.Tensor:
    """Mask of the zero units to remove so that the kept count is a multiple of ``round_to``.

    At least one channel (``round_to`` channels where the group has that many)
    is always kept, so no layer is emptied. Extra channels kept for rounding are
    taken among the zero ones (they stay exactly zero, so outputs do not change).
    """
    size = len(zero_mask)
    zero = torch.nonzero(zero_mask.cpu(), as_tuple=False).flatten().tolist()
    keep = size - len(zero)
    min_keep = min(round_to, size)
    keep = max(keep, min_keep)
    keep = min(size, int(math.ceil(keep / round_to) * round_to))
    n_remove = size - keep
    remove = torch.zeros(size, dtype=torch.bool)
    if n_remove > 0:
        remove[zero[len(zero) - n_remove :]] = True
    return remove


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {
        name: list(m.weight.shape)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)
        or (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None)
    }


@torch.no_grad()
def _outputs(
    model: nn.Module, inputs: torch.Tensor, precise: bool = True, batch: int = 64
) -> tuple[torch.Tensor, bool]:
    """The model's outputs on ``inputs``, computed in float64 (``precise``), and whether
    they were: a model that cannot run in float64 (an op that builds float32 tensors, a
    device without float64) is run as it is.

    Removing zero input channels changes the order a convolution sums its terms in, which
    moves float32 results by ~1e-6; a quantized activation (``round``, ``1{x > theta}``)
    turns such a move at a level's edge into a whole level (measured: 0.66 on a 2-bit
    ResNet-20, 2% of the output scale). In float64 the move is ~1e-15 and no edge is
    crossed, so the comparison sees only what the removal itself changed. The model's
    tensors go back to their own dtypes (float32 -> float64 -> float32 is exact)."""
    dtypes = [
        (module, table, name, t.dtype)
        for module in model.modules()
        for table in (module._parameters, module._buffers)
        for name, t in table.items()
        if t is not None and t.is_floating_point()
    ]
    if precise:
        model.to(torch.float64)
        try:
            x = inputs.to(torch.float64)
            return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)]), True
        except (RuntimeError, TypeError) as exc:
            log.info("removal check in the model's own dtype (float64: %s)", exc)
        finally:
            for module, table, name, dtype in dtypes:  # parameters stay the same objects
                t = table[name]
                if table is module._parameters:
                    t.data = t.data.to(dtype)
                    if t.grad is not None:  # model.to converted a left-over gradient too
                        t.grad = t.grad.to(dtype)
                else:
                    table[name] = t.to(dtype)
    x = inputs
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)]), False


def prune_zero_channels(
    model: nn.Module,
    groups: ChannelGroups,
    sample_inputs: torch.Tensor,
    *,
    round_to: int = 1,
    tolerance: float = 1e-4,
) -> PruneResult:
    """Remove, in place, every channel of ``groups`` whose member slices are all exactly zero.

    ``sample_inputs`` (a batch on the model's device) are used to trace the
    model and to compare outputs before and after removal; the relative
    difference (max abs diff / max abs output) must be <= ``tolerance``.
    """
    was_training = model.training
    model.eval()
    tensors = dict(model.named_parameters())
    masks = groups.zero_masks(tensors)
    before_shapes = _shapes(model)
    reference, precise = _outputs(model, sample_inputs)

    # in units: a multiple of round_to channels (ChannelGroups.unit_blocks; heads: 1)
    blocks = groups.unit_blocks(round_to)
    plan = {
        g.root: g.root_channels(units_to_remove(mask, block))
        for g, mask, block in zip(groups, masks, blocks, strict=True)
    }
    removed: dict[str, list[int]] = {}
    for group in groups:  # heads first: a module may be replaced, its inner MLP adopted
        if group.attention is not None and plan[group.root]:
            remove_heads(model, group.attention, plan[group.root])
            removed[group.root] = plan[group.root]
    for group in groups:  # hidden units Torch-Pruning does not trace: sliced in place
        if group.hidden is not None and plan[group.root]:
            remove_hidden_units(model, group.hidden, plan[group.root])
            removed[group.root] = plan[group.root]
    traced = [g for g in groups if g.attention is None and g.hidden is None]
    # Torch-Pruning removes a GroupNorm's channels but keeps its num_groups; the groups
    # remove whole norm groups (compressor.groups), so the norm keeps its group width
    norm_width = {
        m: m.num_channels // m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)
    }
    if any(plan[g.root] for g in traced):
        with traceable():
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=sample_inputs[:1], verbose=False
            )
        for group in traced:
            idxs = plan[group.root]
            if not idxs:
                continue
            root = model.get_submodule(group.root)
            handler = dg.get_pruner_of_module(root).prune_out_channels
            tp_group = dg.get_pruning_group(root, handler, idxs)
            if not dg.check_pruning_group(tp_group):
                log.warning("Torch-Pruning refused to prune group %s; kept whole", group.root)
                continue
            tp_group.prune()
            removed[group.root] = idxs
    for norm, width in norm_width.items():
        norm.num_groups = norm.num_channels // width

    after, _ = _outputs(model, sample_inputs, precise)
    diff = float((after - reference).abs().max()) if after.numel() else 0.0
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    relative = diff / scale if scale > 0 else diff
    after_shapes = _shapes(model)
    layers = {
        name: {"shape_before": shape, "shape_after": after_shapes.get(name, shape)}
        for name, shape in before_shapes.items()
    }
    kept = {
        g.root: (len(g.root_unit) if g.root_unit is not None else g.size)
        - len(removed.get(g.root, []))
        for g in groups
    }
    model.train(was_training)
    result = PruneResult(removed, kept, layers, diff, relative)
    if not math.isfinite(relative) or relative > tolerance:
        raise VerificationError(
            f"Removing the zero channels changed the model output: max abs difference {diff:.3g} "
            f"({relative:.3g} of the output scale {scale:.3g}, tolerance {tolerance:g}). "
            "Some op on a removed channel's path maps 0 to a non-zero value; "
            "keep that layer with `prune.keep` or report the architecture."
        )
    return result
