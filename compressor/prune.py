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
def _outputs(model: nn.Module, inputs: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([model(inputs[i : i + batch]) for i in range(0, len(inputs), batch)])


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
    reference = _outputs(model, sample_inputs)

    plan = {
        g.root: g.root_channels(units_to_remove(mask, round_to))
        for g, mask in zip(groups, masks, strict=True)
    }
    removed: dict[str, list[int]] = {}
    if any(plan.values()):
        with traceable():
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=sample_inputs[:1], verbose=False
            )
        for group in groups:
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

    after = _outputs(model, sample_inputs)
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
