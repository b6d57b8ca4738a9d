"""Whole attention heads as removable units: timm's ``Attention``, torchvision's
``nn.MultiheadAttention`` (vit_b_16) and Swin's ``ShiftedWindowAttention`` (swin_t) and
``ShiftedWindowAttentionV2`` (swin_v2_t).

A head ``h`` of an attention module is ``head_dim`` rows of each of q, k and v in the packed
input projection (weight and bias), and the same ``head_dim`` input columns of the output
projection. When the head's v rows are exactly zero its output ``softmax(q k^T + bias) v`` is
exactly zero whatever q, k and the bias are (a per-head ``q_norm``/``k_norm``, Swin's relative
position bias included), so the output projection reads zeros there and removing the head
changes no output.

One :class:`HeadsKind` per supported module says where its heads are (``rows``,
``columns``), whether they are removable (``reason``) and removes them (``remove``):

* timm's ``timm.layers.attention.Attention`` (``qkv``, optional ``gate``, ``proj``) reshapes by
  ``self.num_heads``, ``self.head_dim`` and ``self.attn_dim``, never by the input width:
  removal slices in place and sets ``num_heads``/``attn_dim``. Only modules whose forward is
  timm's own are trusted; a ``norm`` over the whole ``attn_dim`` (``scale_norm``) mixes the
  heads: then they stay whole.
* ``nn.MultiheadAttention`` (packed ``in_proj_weight``/``in_proj_bias``, ``out_proj``) and
  torchvision's ``ShiftedWindowAttention`` and ``ShiftedWindowAttentionV2`` tie the q/k/v
  width to the input width (``embed_dim``; Swin's functional reshapes by ``C // num_heads``),
  so heads cannot go in place: the module is replaced by :class:`PrunedMultiheadAttention` /
  :class:`PrunedShiftedWindowAttention` / :class:`PrunedShiftedWindowAttentionV2`, which hold
  ``num_heads`` and ``head_dim`` explicitly, keep the original's parameter names (a compact
  file has the same keys) and compute the original's function for the kept heads with the
  same call signature and return type. Swin V2's per-head parts (``logit_scale``, the last
  row of ``cpb_mlp`` per head) go with their head.

Any other module with ``num_heads`` and projections (a subclass overriding a trusted
forward included) keeps its heads whole with a reason.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

MHA_REASON = (
    "nn.MultiheadAttention with separate q/k/v weights, bias_k/bias_v or add_zero_attn: "
    "heads stay whole"
)
ATTENTION_REASON = (
    "attention module whose forward is not known to reshape by num_heads: heads stay whole"
)
SCALE_NORM_REASON = "attention output norm (scale_norm) normalises over all heads: heads stay whole"


def _timm_attention() -> type | None:
    """timm's ``Attention`` class where timm is already imported (never imports it)."""
    mod = sys.modules.get("timm.layers.attention")
    return getattr(mod, "Attention", None) if mod is not None else None


def _swin_classes() -> tuple[type | None, type | None]:
    """torchvision's ``ShiftedWindowAttention`` and its V2 where already imported."""
    mod = sys.modules.get("torchvision.models.swin_transformer")
    if mod is None:
        return None, None
    return getattr(mod, "ShiftedWindowAttention", None), getattr(
        mod, "ShiftedWindowAttentionV2", None
    )


def is_attention(module: nn.Module) -> bool:
    """An attention module: ``nn.MultiheadAttention``, or a module with ``num_heads`` and a
    conv/linear child (timm's, torchvision's Swin attention, compressor's pruned ones).

    The one predicate for "this module computes attention": the groups (whose heads are
    units, or stay whole) and the cost model (its MACs outside conv/linear children are the
    attention products) both use it."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    return hasattr(module, "num_heads") and any(
        isinstance(sub, nn.Linear | nn.modules.conv._ConvNd) for sub in module.children()
    )


def _empty_like(cls: type, source: nn.Module) -> nn.Module:
    """An instance of ``cls`` with no parameters yet, in ``source``'s train/eval mode: the
    pruned modules take over the tensors of the module they replace."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.train(source.training)
    return new


def _keep_index(
    n: int, head_dim: int, heads: list[int]
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The heads of ``n`` that stay when ``heads`` go, their positions in the attention width
    (the output projection's columns) and their q, k and v rows of the packed projection."""
    drop = set(heads)
    keep = [h for h in range(n) if h not in drop]
    if not keep:
        raise ValueError("an attention module keeps at least one head")
    cols = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in keep])
    rows = torch.cat([cols + s * n * head_dim for s in range(3)])
    return keep, cols, rows


def _slice(param: nn.Parameter, index: torch.Tensor, dim: int = 0) -> nn.Parameter:
    return nn.Parameter(
        param.detach().index_select(dim, index.to(param.device)).clone(),
        requires_grad=param.requires_grad,
    )


def _slice_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = _slice(linear.weight, rows)
    if linear.bias is not None:
        linear.bias = _slice(linear.bias, rows)
    linear.out_features = len(rows)


def _slice_columns(linear: nn.Linear, cols: torch.Tensor) -> None:
    linear.weight = _slice(linear.weight, cols, 1)
    linear.in_features = len(cols)


class _ModuleKind:
    """A kind of removable unit inside one kind of module: built on the module, and
    :meth:`matches` says which modules it applies to (subclasses: one per supported kind)."""

    def __init__(self, module: nn.Module):
        self.module = module

    @staticmethod
    def matches(module: nn.Module) -> bool:
        raise NotImplementedError


class HeadsKind(_ModuleKind):
    """The heads of one kind of attention module (subclasses: one per supported kind).

    ``packed`` names the parameters (below the module) whose rows are q, k, v in order,
    ``root`` the group's root (below the module), ``consumer`` the Linear whose input columns
    read the heads' outputs, ``layers`` the module's conv/linear children that the group owns
    (their outputs, except ``consumer``'s, are the heads), ``pruned`` the compressor module that
    replaces one whose forward cannot lose heads in place (None: heads go in place)."""

    packed: tuple[str, ...] = ()
    root = ""
    consumer = ""
    layers: tuple[str, ...] = ()
    pruned: type[nn.Module] | None = None

    @property
    def num_heads(self) -> int:
        return int(self.module.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self.module.head_dim)

    def reason(self) -> str | None:
        """None where the heads are removable exactly, else why not."""
        raise NotImplementedError

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, head)``: every row of the packed q/k/v projection in order and its head."""
        attn_dim = self.num_heads * self.head_dim
        rows = torch.arange(3 * attn_dim)
        return rows, (rows % attn_dim) // self.head_dim

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(columns, head)``: every input column of the output projection and its head."""
        cols = torch.arange(self.num_heads * self.head_dim)
        return cols, cols // self.head_dim

    def present_layers(self) -> list[str]:
        """The names in ``layers`` that this module has (timm's ``gate`` is optional)."""
        present = []
        for name in self.layers:
            try:
                self.module.get_submodule(name)
            except AttributeError:
                continue
            present.append(name)
        return present

    def members(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(param, rows, head)`` for every parameter whose rows belong to the heads."""
        rows, head = self.rows()
        out = []
        for name in self.packed:
            if _param(self.module, name) is not None:
                out.append((name, rows, head))
        return out

    def other_params(self) -> int:
        """Parameters one head holds outside the conv/linear layers of the cost model."""
        return 0

    @torch.no_grad()
    def remove(self, heads: list[int]) -> nn.Module:
        """Remove ``heads`` (at least one stays); the module to put in the original's place.

        Every kind loses the same things: the heads' q, k and v rows of the packed projection
        and their input columns of ``consumer``; a kind adds what else is per head
        (:meth:`_slice_extra`) and says which module holds the kept heads
        (:meth:`_replacement`)."""
        head_dim = self.head_dim
        keep, cols, rows = _keep_index(self.num_heads, head_dim, heads)
        if len(keep) < self.num_heads:
            self._slice_packed(rows)
            _slice_columns(self.module.get_submodule(self.consumer), cols)
            self._slice_extra(keep, cols, rows)
        return self._replacement(len(keep), head_dim)

    def _slice_packed(self, rows: torch.Tensor) -> None:
        """Keep ``rows`` of the packed q/k/v projection (by default the Linear ``root``)."""
        _slice_rows(self.module.get_submodule(self.root), rows)

    def _slice_extra(self, keep: list[int], cols: torch.Tensor, rows: torch.Tensor) -> None:
        """Keep the kept heads' share of what else the kind holds per head (default: nothing).
        ``keep`` are the kept heads, ``cols`` their positions in the attention width, ``rows``
        their packed q/k/v rows."""

    def _replacement(self, num_heads: int, head_dim: int) -> nn.Module:
        """The module that holds the ``num_heads`` kept heads: a :attr:`pruned` module (the
        original's tensors adopted, or the pruned module itself with its count updated)."""
        if isinstance(self.module, self.pruned):
            self.module.num_heads = num_heads
            return self.module
        return self.pruned.adopt(self.module, num_heads, head_dim)

    def sync(self) -> nn.Module | None:
        """After a compact file's shapes are restored: the module with its saved number of
        heads, where the packed projection is narrower than built (else None)."""
        return None

    def keep_all(self) -> nn.Module | None:
        """The module as a compact file saves one pruned with every head kept, where that
        differs from the module as built (else None)."""
        return None


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr, None)


class TimmHeads(HeadsKind):
    packed = ("qkv.weight", "qkv.bias")
    root = "qkv"
    consumer = "proj"
    layers = ("qkv", "gate", "proj")

    @staticmethod
    def matches(module):
        cls = _timm_attention()
        return cls is not None and isinstance(module, cls)

    def reason(self):
        module, cls = self.module, _timm_attention()
        if type(module).forward is not cls.forward:
            return ATTENTION_REASON
        if not isinstance(getattr(module, "norm", None), nn.Identity):
            return SCALE_NORM_REASON
        qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
        gate = getattr(module, "gate", None)
        attn_dim = self.num_heads * self.head_dim
        if (
            not isinstance(qkv, nn.Linear)
            or not isinstance(proj, nn.Linear)
            or qkv.out_features != 3 * attn_dim
            or proj.in_features != attn_dim
            or int(module.attn_dim) != attn_dim
            or (
                gate is not None
                and (not isinstance(gate, nn.Linear) or gate.out_features != attn_dim)
            )
        ):
            return ATTENTION_REASON
        return None

    def members(self):
        out = super().members()
        if self.module.gate is not None:
            cols, head = self.columns()
            out += [
                (f"gate.{p}", cols, head)
                for p in ("weight", "bias")
                if getattr(self.module.gate, p) is not None
            ]
        return out

    def _slice_extra(self, keep, cols, rows):
        if self.module.gate is not None:  # one gate row per attention-width position
            _slice_rows(self.module.gate, cols)

    def _replacement(self, num_heads, head_dim):
        """The module itself: timm's forward reshapes by ``num_heads`` and ``attn_dim``."""
        self._set_heads()
        return self.module

    def _set_heads(self) -> None:
        """``num_heads`` and ``attn_dim`` from ``qkv``'s rows (``head_dim`` never changes)."""
        module, head_dim = self.module, self.head_dim
        module.num_heads = _heads_from_rows(int(module.qkv.out_features), head_dim, "qkv")
        module.attn_dim = module.num_heads * head_dim

    def sync(self):
        module = self.module
        if type(module).forward is not _timm_attention().forward:
            return None
        qkv = getattr(module, "qkv", None)
        if isinstance(qkv, nn.Linear) and qkv.out_features != 3 * int(module.attn_dim):
            self._set_heads()
            return module
        return None


def _heads_from_rows(rows: int, head_dim: int, what: str) -> int:
    if rows % (3 * head_dim) or rows == 0:
        raise ValueError(f"{what} has {rows} rows, not a multiple of 3 x head_dim ({head_dim})")
    return rows // (3 * head_dim)


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (packed q/k/v, ``kdim == vdim == embed_dim``) with heads
    removed: ``num_heads`` heads of ``head_dim`` each, the original's ``embed_dim`` in and out.

    The parameters keep ``nn.MultiheadAttention``'s names (``in_proj_weight`` of
    ``3 * num_heads * head_dim`` rows, ``in_proj_bias``, ``out_proj`` reading
    ``num_heads * head_dim`` columns), and ``forward`` has its signature and returns
    ``(output, weights)``. The output is the original's for the kept heads (a removed head
    output exactly zero), masks included, with ``nn.MultiheadAttention``'s semantics: a bool
    mask is True where attention is not allowed, a float mask is added to the logits;
    ``key_padding_mask`` is ``(N, S)``, ``attn_mask`` ``(L, S)`` or ``(N * heads, L, S)`` with
    one slice per head of the ORIGINAL module (the slices of the removed heads are dropped),
    and ``is_causal`` is the hint that ``attn_mask`` is causal (it needs ``attn_mask``).

    ``kept_heads`` (int64, one per head) are the original's heads this module computes, in
    order, and ``original_heads`` (an int64 scalar) how many the original had: persistent
    buffers, so a compact file carries them as data and a loaded module matches a 3-D
    ``attn_mask`` to its heads as before saving. Where they are not known (None: a compact
    file written before they were saved) a 3-D ``attn_mask`` is refused, as it cannot be
    matched to heads.

    The weights, where asked for, are those of the kept heads only. With
    ``average_attn_weights`` (the default) they are averaged over the KEPT heads: the original
    averages over all its heads, the removed ones too, so its average differs; per head
    (``average_attn_weights=False``) they are the original's weights of the kept heads."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
    ):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * num_heads * head_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * num_heads * head_dim)) if bias else None
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)
        self.set_kept_heads(range(num_heads), num_heads)

    @classmethod
    def adopt(cls, mha: nn.Module, num_heads: int, head_dim: int) -> PrunedMultiheadAttention:
        """A module holding ``mha``'s own parameters and ``out_proj`` (already sliced to
        ``num_heads`` heads of ``head_dim``), with its dropout and layout."""
        new = _empty_like(cls, mha)
        new.embed_dim, new.num_heads = int(mha.embed_dim), int(num_heads)
        new.head_dim = int(head_dim)
        new.dropout, new.batch_first = float(mha.dropout), bool(mha.batch_first)
        new.in_proj_weight, new.in_proj_bias = mha.in_proj_weight, mha.in_proj_bias
        new.out_proj = mha.out_proj
        new.set_kept_heads(None, None)  # the caller knows them, where anyone does
        return new

    def set_kept_heads(self, kept: Iterable[int] | None, original: int | None) -> None:
        """Record that this module computes heads ``kept`` of an original with ``original``
        heads (None: not known), as the persistent buffers ``kept_heads``/``original_heads``.
        Raises ``ValueError`` naming the problem where they cannot describe its heads."""
        if kept is None or original is None:
            self.register_buffer("kept_heads", None)
            self.register_buffer("original_heads", None)
            return
        kept_t = torch.tensor(list(kept), dtype=torch.int64)
        original_t = torch.tensor(int(original), dtype=torch.int64)
        problem = kept_heads_problem(kept_t, original_t, self.num_heads)
        if problem is not None:
            raise ValueError(problem)
        device = self.in_proj_weight.device
        self.register_buffer("kept_heads", kept_t.to(device))
        self.register_buffer("original_heads", original_t.to(device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """As ``nn.Module``'s, and refuses kept heads that cannot be this module's (what any
        ``load_state_dict`` copies in is checked as :meth:`set_kept_heads` checks)."""
        kept = state_dict.get(f"{prefix}kept_heads")
        original = state_dict.get(f"{prefix}original_heads")
        if kept is not None and original is not None and self.kept_heads is not None:
            problem = kept_heads_problem(kept, original, self.num_heads)
            if problem is not None:
                raise ValueError(f"{prefix}kept_heads: {problem}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"batch_first={self.batch_first}"
        )

    def _logit_mask(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        q: torch.Tensor,
        source: int,
    ) -> torch.Tensor | None:
        """What to add to the kept heads' logits ``(batch, heads, length, source)``, broadcast:
        ``attn_mask`` (a 3-D one's slices of the kept heads) plus ``key_padding_mask``."""
        batch, length = q.shape[0], q.shape[2]
        attn_mask = _float_mask(attn_mask, "attn_mask", q.dtype)
        padding = _float_mask(key_padding_mask, "key_padding_mask", q.dtype)
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (length, source):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, but should "
                        f"be {(length, source)}."
                    )
                attn_mask = attn_mask.view(1, 1, length, source)
            elif attn_mask.dim() == 3:
                attn_mask = self._kept_slices(attn_mask, batch, length, source)
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if padding is not None:
            if padding.shape != (batch, source):
                raise RuntimeError(
                    f"key_padding_mask has shape {tuple(padding.shape)}, expected {(batch, source)}"
                )
            padding = padding.view(batch, 1, 1, source)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        return attn_mask

    def _kept_slices(
        self, attn_mask: torch.Tensor, batch: int, length: int, source: int
    ) -> torch.Tensor:
        """A 3-D ``attn_mask`` of the original's heads ``(batch * original_heads, L, S)`` as
        ``(batch, kept heads, L, S)``."""
        if self.kept_heads is None or self.original_heads is None:
            raise RuntimeError(
                "a 3-D attn_mask has one slice per head of the original nn.MultiheadAttention, "
                "but this PrunedMultiheadAttention does not know which of those heads it kept "
                "(it was loaded from a compact file written before compressor saved them); "
                "pass a 2-D (L, S) attn_mask, or prune and save the model again"
            )
        original = int(self.original_heads)
        expected = (batch * original, length, source)
        if attn_mask.shape != expected:
            raise RuntimeError(
                f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, but should be "
                f"{expected} (one slice per head of the original module)."
            )
        kept = self.kept_heads.to(attn_mask.device)
        return attn_mask.view(batch, original, length, source).index_select(1, kept)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self_attention = query is key and key is value
        unbatched = query.dim() == 2
        if unbatched:
            dim = 0 if self.batch_first else 1
            query, key, value = query.unsqueeze(dim), key.unsqueeze(dim), value.unsqueeze(dim)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        w, b = self.in_proj_weight, self.in_proj_bias
        if self_attention:
            q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
        else:
            wq, wk, wv = w.chunk(3)
            bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
            q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        batch, length, source = q.shape[0], q.shape[1], k.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        q = q.reshape(batch, length, heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, source, heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, source, heads, head_dim).transpose(1, 2)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)"
            )
        # as nn.MultiheadAttention: the hint alone decides where nothing else is merged in
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None if causal else self._logit_mask(attn_mask, key_padding_mask, q, source)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            logits = (q * head_dim**-0.5) @ k.transpose(-2, -1)
            attn = torch.softmax(logits if mask is None else logits + mask, dim=-1)
            out = F.dropout(attn, p=dropout, training=self.training) @ v
            weights = attn.mean(dim=1) if average_attn_weights else attn
            if unbatched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal
            )
        out = out.transpose(1, 2).reshape(batch, length, heads * head_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1 if not self.batch_first else 0)
        return out, weights


def kept_heads_problem(kept: torch.Tensor, original: torch.Tensor, num_heads: int) -> str | None:
    """Why ``kept`` (the original heads a pruned module computes) and ``original`` (how many
    the original had) cannot describe a module of ``num_heads`` heads, or None where they can:
    integer tensors, ``kept`` 1-D with ``num_heads`` entries strictly increasing in
    ``[0, original)``, ``original`` one number. They come from files: read as data only."""
    for name, t in (("kept_heads", kept), ("original_heads", original)):
        if not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.is_floating_point():
            return f"{name} must be an integer tensor, not {getattr(t, 'dtype', type(t))}"
        if t.is_complex():
            return f"{name} must be an integer tensor, not {t.dtype}"
    if original.dim() != 0:
        return f"original_heads must be one number, not of shape {tuple(original.shape)}"
    if kept.dim() != 1 or kept.numel() != num_heads:
        return (
            f"kept_heads has shape {tuple(kept.shape)}, but the module has {num_heads} heads "
            f"(expected ({num_heads},))"
        )
    count, values = int(original), [int(h) for h in kept]
    if any(h < 0 or h >= count for h in values):
        return f"kept_heads {values[:16]} are not all in [0, original_heads={count})"
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        return f"kept_heads {values[:16]} are not strictly increasing"
    return None


def _float_mask(mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """``mask`` as logits to add: a bool mask's True (not allowed) as -inf, a float one as is."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise RuntimeError(f"only bool and floating types of {name} are supported")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


class MultiheadAttentionHeads(HeadsKind):
    """``nn.MultiheadAttention`` with packed q/k/v (and :class:`PrunedMultiheadAttention`)."""

    packed = ("in_proj_weight", "in_proj_bias")
    root = "in_proj_weight"
    consumer = "out_proj"
    layers = ("out_proj",)
    pruned = PrunedMultiheadAttention

    @staticmethod
    def matches(module):
        return isinstance(module, nn.MultiheadAttention | PrunedMultiheadAttention)

    def reason(self):
        m = self.module
        if isinstance(m, PrunedMultiheadAttention):
            return None
        if (
            type(m).forward is not nn.MultiheadAttention.forward
            or not m._qkv_same_embed_dim
            or m.in_proj_weight is None
            or m.bias_k is not None
            or m.bias_v is not None
            or m.add_zero_attn
            or m.num_heads * m.head_dim != m.embed_dim
            or not isinstance(m.out_proj, nn.Linear)
        ):
            return MHA_REASON
        return None

    def other_params(self):
        per_row = self.module.in_proj_weight.shape[1] + (self.module.in_proj_bias is not None)
        return 3 * self.head_dim * per_row

    def remove(self, heads):
        """As :meth:`HeadsKind.remove`, and the pruned module learns which of the original's
        heads it keeps (a 3-D ``attn_mask`` has one slice per original head)."""
        m = self.module
        kept, original = list(range(self.num_heads)), self.num_heads
        if isinstance(m, PrunedMultiheadAttention):
            known = m.kept_heads is not None and m.original_heads is not None
            kept = m.kept_heads.tolist() if known else None
            original = int(m.original_heads) if known else None
        new = super().remove(heads)
        drop = set(heads)
        new.set_kept_heads(
            None if kept is None else [h for i, h in enumerate(kept) if i not in drop], original
        )
        return new

    def _slice_packed(self, rows):
        m = self.module
        m.in_proj_weight = _slice(m.in_proj_weight, rows)
        if m.in_proj_bias is not None:
            m.in_proj_bias = _slice(m.in_proj_bias, rows)

    def sync(self):
        m = self.module
        if self.reason() is not None:  # structure only: the shapes it checks do not change
            return None
        rows = int(m.in_proj_weight.shape[0])
        if rows == 3 * self.num_heads * self.head_dim:
            return None
        heads = _heads_from_rows(rows, self.head_dim, "in_proj_weight")
        new = self._replacement(heads, self.head_dim)
        new.set_kept_heads(None, None)  # the shapes alone do not say which heads stayed
        return new

    def keep_all(self):
        """The pruned module (it saves its kept heads, nn.MultiheadAttention has none)."""
        if self.reason() is not None or isinstance(self.module, PrunedMultiheadAttention):
            return None
        return self._replacement(self.num_heads, self.head_dim)


class PrunedShiftedWindowAttention(nn.Module):
    """torchvision's ``ShiftedWindowAttention`` (Swin V1) with heads removed: ``num_heads``
    heads of ``head_dim`` each (the original's ``dim // num_heads``), the original's ``dim``
    in and out. Same parameter and buffer names (``qkv``, ``proj``,
    ``relative_position_bias_table`` with one column per kept head,
    ``relative_position_index``) and the same forward, reshaping by ``num_heads`` and
    ``head_dim`` instead of the input width."""

    def __init__(
        self,
        dim: int,
        window_size: list[int],
        shift_size: list[int],
        num_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attention_dropout, self.dropout = attention_dropout, dropout
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=proj_bias)
        self.define_relative_position_bias_table()
        coords = torch.stack(
            torch.meshgrid(
                torch.arange(window_size[0]), torch.arange(window_size[1]), indexing="ij"
            )
        ).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        relative[:, :, 0] += window_size[0] - 1
        relative[:, :, 1] += window_size[1] - 1
        relative[:, :, 0] *= 2 * window_size[1] - 1
        self.register_buffer("relative_position_index", relative.sum(-1).flatten())

    def define_relative_position_bias_table(self) -> None:
        """The learned bias table: one column per head over the window's relative positions."""
        span = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(span, self.num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    @classmethod
    def adopt(cls, swin: nn.Module, num_heads: int, head_dim: int) -> PrunedShiftedWindowAttention:
        """A module holding ``swin``'s own tensors (already sliced to ``num_heads`` heads of
        ``head_dim``), with its windows, shifts and dropout."""
        new = _empty_like(cls, swin)
        new.window_size, new.shift_size = list(swin.window_size), list(swin.shift_size)
        new.num_heads, new.head_dim = int(num_heads), int(head_dim)
        new.attention_dropout, new.dropout = float(swin.attention_dropout), float(swin.dropout)
        new.qkv, new.proj = swin.qkv, swin.proj
        new._adopt_position_bias(swin)
        new.register_buffer("relative_position_index", swin.relative_position_index)
        return new

    def _adopt_position_bias(self, swin: nn.Module) -> None:
        self.relative_position_bias_table = swin.relative_position_bias_table

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"window_size={self.window_size}, shift_size={self.shift_size}"
        )

    def get_relative_position_bias(self) -> torch.Tensor:
        return _window_bias(
            self.relative_position_bias_table, self.relative_position_index, self.window_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _shifted_window_attention(
            x,
            self.qkv.weight,
            self.proj.weight,
            self.get_relative_position_bias(),
            self.window_size,
            self.num_heads,
            self.head_dim,
            list(self.shift_size),
            attention_dropout=self.attention_dropout,
            dropout=self.dropout,
            qkv_bias=self.qkv.bias,
            proj_bias=self.proj.bias,
            logit_scale=self._logit_scale(),
            training=self.training,
        )

    def _logit_scale(self) -> torch.Tensor | None:
        """Swin V2's per-head cosine-attention scale; V1 has none (scaled dot products)."""
        return None


class PrunedShiftedWindowAttentionV2(PrunedShiftedWindowAttention):
    """torchvision's ``ShiftedWindowAttentionV2`` (Swin V2) with heads removed, as
    :class:`PrunedShiftedWindowAttention` is V1's. Same parameter and buffer names: ``qkv``,
    ``proj``, ``logit_scale`` (one per kept head), ``cpb_mlp`` (the continuous position bias
    MLP, its last Linear one output per kept head), ``relative_coords_table`` and
    ``relative_position_index``. Same forward: cosine attention scaled per head, the bias
    ``16 sigmoid(cpb_mlp(...))``, and the k third of ``qkv``'s bias read as zero."""

    def __init__(
        self,
        dim: int,
        window_size: list[int],
        shift_size: list[int],
        num_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
    ):
        super().__init__(
            dim,
            window_size,
            shift_size,
            num_heads,
            head_dim,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            attention_dropout=attention_dropout,
            dropout=dropout,
        )
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
        )
        if qkv_bias:
            with torch.no_grad():
                length = self.qkv.bias.numel() // 3
                self.qkv.bias[length : 2 * length].zero_()

    def define_relative_position_bias_table(self) -> None:
        """The input of ``cpb_mlp``: every relative position in the window, log-spaced
        (torchvision's ``relative_coords_table``; no learned table)."""
        coords = [torch.arange(-(size - 1), size, dtype=torch.float32) for size in self.window_size]
        table = torch.stack(torch.meshgrid(coords, indexing="ij"))
        table = table.permute(1, 2, 0).contiguous().unsqueeze(0)
        table[:, :, :, 0] /= self.window_size[0] - 1
        table[:, :, :, 1] /= self.window_size[1] - 1
        table *= 8
        table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / 3.0
        self.register_buffer("relative_coords_table", table)

    def _adopt_position_bias(self, swin: nn.Module) -> None:
        self.logit_scale, self.cpb_mlp = swin.logit_scale, swin.cpb_mlp
        self.register_buffer("relative_coords_table", swin.relative_coords_table)

    def get_relative_position_bias(self) -> torch.Tensor:
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = _window_bias(table, self.relative_position_index, self.window_size)
        return 16 * torch.sigmoid(bias)

    def _logit_scale(self) -> torch.Tensor:
        return self.logit_scale


def _window_bias(table: torch.Tensor, index: torch.Tensor, window_size: list[int]) -> torch.Tensor:
    """The per-head bias of every (query, key) pair of a window, ``(1, heads, n, n)``, from a
    ``(relative positions, heads)`` table (torchvision's ``_get_relative_position_bias``)."""
    n = window_size[0] * window_size[1]
    return table[index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)


def _shifted_window_attention(
    input: torch.Tensor,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor,
    window_size: list[int],
    num_heads: int,
    head_dim: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
    training: bool = True,
) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` (V1; V2 with ``logit_scale``), the heads'
    reshapes by ``num_heads`` and ``head_dim`` rather than the input width ``C``."""
    B, H, W, C = input.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(
        B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C
    )
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)

    if logit_scale is not None and qkv_bias is not None:  # V2: the k bias reads as zero
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # V2: cosine attention, each head scaled by its own logit
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        q = q * head_dim**-0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias

    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        attn_mask = attn_mask.view(
            pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1]
        )
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(
            num_windows, window_size[0] * window_size[1]
        )
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, (-100.0)).masked_fill(attn_mask == 0, 0.0)
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))

    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), num_heads * head_dim)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    C = x.shape[-1]
    x = x.view(
        B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C
    )
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


class SwinHeads(HeadsKind):
    """torchvision's ``ShiftedWindowAttention`` (V1; and :class:`PrunedShiftedWindowAttention`).

    A head is its q, k, v rows of ``qkv``, its input columns of ``proj`` and its column of
    the relative position bias table."""

    packed = ("qkv.weight", "qkv.bias")
    root = "qkv"
    consumer = "proj"
    layers = ("qkv", "proj")
    pruned = PrunedShiftedWindowAttention
    version = 0  # V1: its index in _swin_classes()

    @classmethod
    def matches(cls, module):
        original = _swin_classes()[cls.version]
        return isinstance(module, cls.pruned) or (
            original is not None and isinstance(module, original)
        )

    @property
    def head_dim(self):
        if isinstance(self.module, self.pruned):
            return int(self.module.head_dim)
        return int(self.module.qkv.in_features) // int(self.module.num_heads)

    def _trusted(self) -> str | None:
        """Why the forward is not known to reshape as the :attr:`pruned` module's."""
        m = self.module
        if isinstance(m, self.pruned):
            return None
        original = _swin_classes()[self.version]
        if (
            type(m).forward is not original.forward
            or type(m).get_relative_position_bias is not original.get_relative_position_bias
            or not isinstance(getattr(m, "qkv", None), nn.Linear)
            or not isinstance(getattr(m, "proj", None), nn.Linear)
            or not self._has_position_bias()
        ):
            return ATTENTION_REASON
        return None

    def _has_position_bias(self) -> bool:
        """The module holds its per-head position bias where torchvision's forward reads it."""
        return isinstance(getattr(self.module, "relative_position_bias_table", None), nn.Parameter)

    def _head_counts(self) -> dict[str, int]:
        """How many heads each per-head tensor outside ``qkv`` and ``proj`` holds (by name;
        0 where its shape is not one torchvision's forward reads per head)."""
        table = self.module.relative_position_bias_table
        return {"relative_position_bias_table": int(table.shape[1]) if table.dim() == 2 else 0}

    def reason(self):
        why = self._trusted()
        if why is not None or isinstance(self.module, self.pruned):
            return why
        m = self.module
        dim, n = int(m.qkv.in_features), int(m.num_heads)
        if (
            dim % n
            or m.qkv.out_features != 3 * dim
            or m.proj.in_features != dim
            or any(count != n for count in self._head_counts().values())
        ):
            return ATTENTION_REASON
        return None

    def other_params(self):
        return int(self.module.relative_position_bias_table.shape[0])

    def _slice_extra(self, keep, cols, rows):
        m = self.module  # one bias table column per head
        m.relative_position_bias_table = _slice(
            m.relative_position_bias_table, torch.tensor(keep), 1
        )

    def sync(self):
        if self._trusted() is not None:
            return None
        rows = int(self.module.qkv.weight.shape[0])
        if rows == 3 * self.num_heads * self.head_dim:
            return None
        heads = _heads_from_rows(rows, self.head_dim, "qkv")
        for name, count in self._head_counts().items():
            if count != heads:
                raise ValueError(f"{name} has {count} heads, qkv {heads}")
        return self._replacement(heads, self.head_dim)


CPB_OUT = "cpb_mlp.2"  # Swin V2's last position-bias Linear: one output per head


class SwinV2Heads(SwinHeads):
    """torchvision's ``ShiftedWindowAttentionV2`` (V2; and
    :class:`PrunedShiftedWindowAttentionV2`).

    A head is its q, k, v rows of ``qkv``, its input columns of ``proj``, its ``logit_scale``
    and its output row of ``cpb_mlp``'s last Linear (the position bias MLP's hidden layer is
    shared by all heads: its units are a group of their own, :class:`SwinV2PositionBias`). Cosine attention normalises q and k within each head, and
    the k third of ``qkv``'s bias that the forward reads as zero is still the k third once
    heads go, so a head whose v rows are zero outputs zero and the kept heads compute what
    they did."""

    layers = ("qkv", "proj", CPB_OUT)
    pruned = PrunedShiftedWindowAttentionV2
    version = 1  # V2: its index in _swin_classes()

    def _has_position_bias(self):
        cpb = getattr(self.module, "cpb_mlp", None)
        return (
            isinstance(getattr(self.module, "logit_scale", None), nn.Parameter)
            and isinstance(cpb, nn.Sequential)
            and len(cpb) == 3
            and isinstance(cpb[2], nn.Linear)
        )

    def _head_counts(self):
        scale = self.module.logit_scale
        return {
            "logit_scale": int(scale.shape[0]) if scale.shape[1:] == (1, 1) else 0,
            f"{CPB_OUT}.weight": int(self.module.get_submodule(CPB_OUT).weight.shape[0]),
        }

    def members(self):
        heads = torch.arange(self.num_heads)
        cpb = self.module.get_submodule(CPB_OUT)
        return super().members() + [
            (f"{CPB_OUT}.{p}", heads, heads)
            for p in ("weight", "bias")
            if getattr(cpb, p) is not None
        ]

    def other_params(self):
        """Its ``logit_scale``; its ``cpb_mlp`` row is a Linear layer's, which the cost model
        counts."""
        return 1

    def _slice_extra(self, keep, cols, rows):
        index = torch.tensor(keep)
        self.module.logit_scale = _slice(self.module.logit_scale, index)
        _slice_rows(self.module.get_submodule(CPB_OUT), index)


# the first kind that matches: Swin V2's classes subclass V1's
KINDS: tuple[type[HeadsKind], ...] = (TimmHeads, MultiheadAttentionHeads, SwinV2Heads, SwinHeads)


class HiddenUnitsKind(_ModuleKind):
    """The hidden units of a small MLP inside an attention module that Torch-Pruning does not
    trace (it runs on a constant, not on the model's input), as removable units (subclasses:
    one per supported module).

    A unit is one output row of ``producer`` (weight and bias) and the same input column of
    ``consumer``; between them only ops that map 0 to 0 (a ReLU), so a unit whose rows are
    zero feeds ``consumer`` zeros and removing it changes no output. The module's forward
    does not depend on the hidden width: removal slices in place."""

    producer = ""
    consumer = ""

    @property
    def size(self) -> int:
        return int(self.module.get_submodule(self.producer).out_features)

    def members(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(param, rows, unit)`` for the producer's weight and bias: one row per unit."""
        units = torch.arange(self.size)
        producer = self.module.get_submodule(self.producer)
        return [
            (f"{self.producer}.{p}", units, units)
            for p in ("weight", "bias")
            if getattr(producer, p) is not None
        ]

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(columns, unit)``: every input column of ``consumer`` and its unit."""
        units = torch.arange(self.size)
        return units, units

    @torch.no_grad()
    def remove(self, units: list[int]) -> None:
        """Remove ``units`` (at least one stays): the producer's rows, the consumer's columns."""
        drop = set(units)
        keep = torch.tensor([u for u in range(self.size) if u not in drop], dtype=torch.long)
        if len(keep) == 0:
            raise ValueError("a hidden layer keeps at least one unit")
        _slice_rows(self.module.get_submodule(self.producer), keep)
        _slice_columns(self.module.get_submodule(self.consumer), keep)


class SwinV2PositionBias(HiddenUnitsKind):
    """Swin V2's continuous position bias MLP ``cpb_mlp``: ``Linear(2, 512) -> ReLU ->
    Linear(512, heads)`` on the constant ``relative_coords_table``; its 512 hidden units
    (rows of ``cpb_mlp.0``, columns of ``cpb_mlp.2``). The heads own ``cpb_mlp.2``'s rows
    (:class:`SwinV2Heads`): the two compose, as the units of a Linear's outputs and inputs.
    Only for a module whose heads :class:`SwinV2Heads` trusts (its forward is torchvision's
    or compressor's, which read ``cpb_mlp`` whatever its hidden width)."""

    producer = "cpb_mlp.0"
    consumer = CPB_OUT

    @staticmethod
    def matches(module):
        if not SwinV2Heads.matches(module) or SwinV2Heads(module).reason() is not None:
            return False
        cpb = module.cpb_mlp
        return isinstance(cpb[0], nn.Linear) and type(cpb[1]) is nn.ReLU


UNIT_KINDS: tuple[type[HiddenUnitsKind], ...] = (SwinV2PositionBias,)


def hidden_units_kind(module: nn.Module) -> HiddenUnitsKind | None:
    """The :class:`HiddenUnitsKind` of ``module``, or None where it holds no such units."""
    for kind in UNIT_KINDS:
        if kind.matches(module):
            return kind(module)
    return None


def remove_hidden_units(model: nn.Module, name: str, units: list[int]) -> None:
    """Remove hidden ``units`` of module ``name`` of ``model`` in place (at least one stays)."""
    kind = hidden_units_kind(model.get_submodule(name))
    if kind is None:
        raise ValueError(f"{name}: holds no removable hidden units")
    kind.remove(list(units))


def heads_kind(module: nn.Module) -> HeadsKind | None:
    """The :class:`HeadsKind` of attention ``module``, or None for an unknown kind."""
    for kind in KINDS:
        if kind.matches(module):
            return kind(module)
    return None


def heads_reason(module: nn.Module) -> str | None:
    """None where the heads of attention ``module`` are removable exactly, else why not."""
    kind = heads_kind(module)
    if kind is None:
        return MHA_REASON if isinstance(module, nn.MultiheadAttention) else ATTENTION_REASON
    return kind.reason()


def _kind(module: nn.Module) -> HeadsKind:
    kind = heads_kind(module)
    if kind is None or kind.reason() is not None:
        raise ValueError(f"{type(module).__name__}: heads are not removable")
    return kind


def head_rows(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, head)``: every row of the packed q/k/v projection in order and its head."""
    return _kind(module).rows()


def head_columns(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(columns, head)``: every input column of the output projection and its head."""
    return _kind(module).columns()


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if owner._modules.get(child) is not new:
        setattr(owner, child, new)


def remove_heads(model: nn.Module, name: str, heads: list[int]) -> nn.Module:
    """Remove ``heads`` from attention module ``name`` of ``model`` (at least one head always
    stays); where the module cannot lose heads in place it is replaced by a compressor one.
    Returns the module now at ``name``."""
    new = _kind(model.get_submodule(name)).remove(list(heads))
    _replace(model, name, new)
    return new


def sync_heads(model: nn.Module, saved: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """After a compact model's parameter shapes are restored, give every attention module
    whose packed q/k/v projection is narrower than built its saved number of heads (timm:
    ``num_heads``/``attn_dim``; ``nn.MultiheadAttention`` and Swin: replaced by the compressor
    module). Decided from tensor shapes alone; the names of the changed modules returned.

    ``saved`` (the file's tensors) gives each :class:`PrunedMultiheadAttention` the
    ``kept_heads``/``original_heads`` saved with it, checked (``ValueError`` naming the module
    and the problem); a file without them leaves them unknown."""
    changed = []
    for name, module in list(model.named_modules()):
        kind = heads_kind(module)
        if kind is None:
            continue
        new = kind.sync()
        if new is None and saved is not None and _saved_kept_heads(saved, name)[0] is not None:
            new = kind.keep_all()  # saved pruned with every head kept: pruned all the same
        if new is not None:
            _replace(model, name, new)
            changed.append(name)
    for name, module in model.named_modules():
        if saved is not None and isinstance(module, PrunedMultiheadAttention):
            _restore_kept_heads(module, name, saved)
    return changed


def _saved_kept_heads(
    saved: Mapping[str, torch.Tensor], name: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The saved ``kept_heads`` and ``original_heads`` of module ``name`` (None: not saved)."""
    prefix = f"{name}." if name else ""
    return saved.get(f"{prefix}kept_heads"), saved.get(f"{prefix}original_heads")


def _restore_kept_heads(
    module: PrunedMultiheadAttention, name: str, saved: Mapping[str, torch.Tensor]
) -> None:
    """``module``'s kept heads from the saved tensors ``{name}.kept_heads`` and
    ``{name}.original_heads``, where the file has them (both or neither)."""
    prefix = f"{name}." if name else ""
    kept, original = _saved_kept_heads(saved, name)
    if kept is None and original is None:
        return
    if kept is None or original is None:
        raise ValueError(f"{prefix}kept_heads and {prefix}original_heads: one without the other")
    problem = kept_heads_problem(kept, original, module.num_heads)
    if problem is not None:
        raise ValueError(f"attention module {name!r}: {problem}")
    module.set_kept_heads(kept.tolist(), int(original))
