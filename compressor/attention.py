"""Whole attention heads as removable units (timm's ``Attention``).

timm's ``timm.layers.attention.Attention`` computes ``qkv = Linear(dim, 3 * attn_dim)``,
reshapes it to ``(B, N, 3, num_heads, head_dim)`` and, after the attention products, back to
``(B, N, attn_dim)`` for ``proj = Linear(attn_dim, dim)``: every reshape reads
``self.num_heads``, ``self.head_dim`` and ``self.attn_dim``, never the input's width. A head
``h`` is then rows ``[s*attn_dim + h*head_dim, s*attn_dim + (h+1)*head_dim)`` of ``qkv``
(``s`` = 0, 1, 2 for q, k, v; weight and bias), the same rows of the optional ``gate``
Linear, and the same ``head_dim`` input columns of ``proj``. When the head's v rows are
exactly zero its output ``softmax(q k^T) v`` is exactly zero whatever q and k are (a
per-head ``q_norm``/``k_norm`` included), so ``proj`` reads zeros there and removing the head
changes no output. Only a ``norm`` over the whole ``attn_dim`` (timm's ``scale_norm``) mixes
the heads: then they stay whole.

Only modules whose forward is timm's own ``Attention.forward`` are trusted (a subclass that
overrides it might reshape by the input's width); any other module with ``num_heads`` and
projections stays whole with a reason.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

MHA_REASON = "nn.MultiheadAttention ties q/k/v width to embed_dim; heads stay whole"
ATTENTION_REASON = (
    "attention module whose forward is not known to reshape by num_heads: heads stay whole"
)
SCALE_NORM_REASON = "attention output norm (scale_norm) normalises over all heads: heads stay whole"


def _timm_attention() -> type | None:
    """timm's ``Attention`` class where timm is already imported (never imports it)."""
    mod = sys.modules.get("timm.layers.attention")
    return getattr(mod, "Attention", None) if mod is not None else None


def is_attention(module: nn.Module) -> bool:
    """An attention module: ``nn.MultiheadAttention``, or a module with ``num_heads`` and a
    conv/linear child (timm's, torchvision's Swin attention)."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    return hasattr(module, "num_heads") and any(
        isinstance(sub, nn.Linear | nn.modules.conv._ConvNd) for sub in module.children()
    )


def heads_reason(module: nn.Module) -> str | None:
    """None where the heads of attention ``module`` are removable exactly, else why not."""
    if isinstance(module, nn.MultiheadAttention):
        return MHA_REASON
    cls = _timm_attention()
    if cls is None or not isinstance(module, cls) or type(module).forward is not cls.forward:
        return ATTENTION_REASON
    if not isinstance(getattr(module, "norm", None), nn.Identity):
        return SCALE_NORM_REASON
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    gate = getattr(module, "gate", None)
    heads, head_dim = int(module.num_heads), int(module.head_dim)
    attn_dim = heads * head_dim
    if (
        not isinstance(qkv, nn.Linear)
        or not isinstance(proj, nn.Linear)
        or qkv.out_features != 3 * attn_dim
        or proj.in_features != attn_dim
        or int(module.attn_dim) != attn_dim
        or (gate is not None and (not isinstance(gate, nn.Linear) or gate.out_features != attn_dim))
    ):
        return ATTENTION_REASON
    return None


def head_rows(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, head)``: every row of ``qkv`` in order and the head it belongs to."""
    heads, head_dim = int(module.num_heads), int(module.head_dim)
    rows = torch.arange(3 * heads * head_dim)
    return rows, (rows % (heads * head_dim)) // head_dim


def head_columns(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(columns, head)``: every ``attn_dim`` position (``proj`` input, ``gate`` row) and its head."""
    cols = torch.arange(int(module.num_heads) * int(module.head_dim))
    return cols, cols // int(module.head_dim)


@torch.no_grad()
def remove_heads(module: nn.Module, heads: list[int]) -> None:
    """Remove ``heads`` from a timm ``Attention`` (at least one head always stays)."""
    n, head_dim = int(module.num_heads), int(module.head_dim)
    drop = set(heads)
    keep = [h for h in range(n) if h not in drop]
    if not keep:
        raise ValueError("an attention module keeps at least one head")
    if len(keep) == n:
        return
    attn_dim = n * head_dim
    keep_cols = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in keep])
    keep_rows = torch.cat([keep_cols + s * attn_dim for s in range(3)])
    _slice_rows(module.qkv, keep_rows)
    if module.gate is not None:
        _slice_rows(module.gate, keep_cols)
    proj = module.proj
    proj.weight = nn.Parameter(
        proj.weight.index_select(1, keep_cols.to(proj.weight.device)).clone(),
        requires_grad=proj.weight.requires_grad,
    )
    proj.in_features = len(keep_cols)
    set_heads(module)


def _slice_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(linear.weight.device)
    linear.weight = nn.Parameter(
        linear.weight.index_select(0, rows).clone(), requires_grad=linear.weight.requires_grad
    )
    if linear.bias is not None:
        linear.bias = nn.Parameter(
            linear.bias.index_select(0, rows).clone(), requires_grad=linear.bias.requires_grad
        )
    linear.out_features = len(rows)


def set_heads(module: nn.Module) -> None:
    """Set ``num_heads`` and ``attn_dim`` from ``qkv``'s rows (``head_dim`` never changes)."""
    head_dim = int(module.head_dim)
    rows = int(module.qkv.out_features)
    if rows % (3 * head_dim) or rows == 0:
        raise ValueError(f"qkv has {rows} rows, not a multiple of 3 x head_dim ({head_dim})")
    module.num_heads = rows // (3 * head_dim)
    module.attn_dim = module.num_heads * head_dim


def sync_heads(model: nn.Module) -> list[str]:
    """After a compact model's Linear sizes are restored, give every timm ``Attention`` whose
    ``qkv`` is narrower than built its ``num_heads`` and ``attn_dim`` (names returned)."""
    cls = _timm_attention()
    if cls is None:
        return []
    changed = []
    for name, module in model.named_modules():
        if not isinstance(module, cls) or type(module).forward is not cls.forward:
            continue
        qkv = getattr(module, "qkv", None)
        if isinstance(qkv, nn.Linear) and qkv.out_features != 3 * int(module.attn_dim):
            set_heads(module)
            changed.append(name)
    return changed
