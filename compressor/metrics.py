"""Model cost and sparsity: params, MACs, exact-zero weights, channels kept.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2): it
counts matrix multiplies and convolutions, the ops that dominate a CNN's cost.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs_per_module(
    model: nn.Module, example_input: torch.Tensor, *, also: tuple[str, ...] = ()
) -> tuple[dict[str, int], int]:
    """MACs of one forward pass of ``example_input`` (batch 1 recommended), per module and in total.

    Per-module counts are for the leaf conv/linear modules (a parent module's
    count includes its children's), and for the modules named in ``also`` (whatever their
    kind: an attention module's count holds its projections and its attention products).
    ``nn.MultiheadAttention``'s inference fast path
    (one fused op the counter does not know) is off while counting, so its projections
    and attention products are counted as the ops they are (vit_b_16 at 64x64: 0.97 G
    MACs with it, 1.45 G without, 1.46 G by hand).
    """
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with counter:
            model(example_input)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    per_module = {}
    counts = counter.get_flop_counts()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear) or name in also:
            key = _counter_key(model, name)
            if key in counts:
                per_module[name] = int(sum(counts[key].values())) // 2
    total = int(sum(counts.get("Global", {}).values())) // 2
    return per_module, total


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU kernel of ``scaled_dot_product_attention`` (the flop counter knows only the
    CUDA ones): ``Q K^T`` and ``A V``."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
}


def _counter_key(model: nn.Module, name: str) -> str:
    # FlopCounterMode names modules by their path below the root module's class name.
    return f"{type(model).__name__}.{name}" if name else "Global"


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    return count_macs_per_module(model, example_input)[1]


def layer_sparsity(model: nn.Module) -> list[dict]:
    """Per conv/linear layer: name, type, weight shape, fraction of exactly-zero weights."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            w = module.weight.detach()
            rows.append(
                {
                    "name": name,
                    "type": type(module).__name__,
                    "shape": list(w.shape),
                    "sparsity": float((w == 0).sum()) / w.numel(),
                }
            )
    return rows


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries over all conv/linear weights."""
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total if total else 0.0


def channels_kept(groups, tensors) -> tuple[int, int]:
    """Channels with a non-zero slice, and all channels, over the model's groups."""
    masks = groups.zero_masks(tensors)
    total = sum(len(m) for m in masks)
    return total - sum(int(m.sum()) for m in masks), total


def _sum_over_ranks(values: list[float]) -> list[float]:
    """``values`` summed over DDP ranks (as they are without DDP)."""
    sums = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        sums = sums.to(device)
        torch.distributed.all_reduce(sums)
    return sums.tolist()


def mean_over_ranks(scores: torch.Tensor) -> float:
    """The mean of per-sample ``scores`` over every DDP rank's samples (nan when none)."""
    n, total = _sum_over_ranks([float(len(scores)), float(scores.to(torch.float64).sum())])
    return total / n if n else float("nan")


def paired_mean_and_stderr(scores: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """The mean of ``scores`` and the standard error of the mean of ``reference - scores``,
    over samples scored by both (the same images, the same order; summed over DDP ranks).

    The drop of a compressed model measured on a validation split is a paired difference:
    ``se = sqrt(var(d) / n)`` with ``d_i = reference_i - scores_i``; for top-1 in percent it
    is ``100 sqrt(q / n)`` when the models disagree on a share ``q`` of the images and the
    drop is small. It says how far the split's drop may sit from the drop on new images.
    """
    if scores.shape != reference.shape:
        raise ValueError(f"paired scores differ in shape: {scores.shape} vs {reference.shape}")
    s, d = scores.to(torch.float64), (reference - scores).to(torch.float64)
    n, s_sum, d_sum, d2_sum = _sum_over_ranks(
        [float(len(s)), float(s.sum()), float(d.sum()), float((d * d).sum())]
    )
    if n == 0:
        return float("nan"), float("nan")
    if n < 2:
        return s_sum / n, 0.0
    var = max(0.0, (d2_sum - d_sum * d_sum / n) / (n - 1))
    return s_sum / n, math.sqrt(var / n)
