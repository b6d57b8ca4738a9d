"""Whole attention heads as removable units (timm's ViTs, torchvision's vit_b_16, swin_t and
swin_v2_t):
zero half of each block's heads, remove them, and check parity, shapes, MACs, the compact
round trip and ONNX."""

from __future__ import annotations

import pytest
import torch
import torchvision

import compressor
from compressor import attention, export
from compressor import checkpoint as ckpt
from compressor.groups import build_groups
from compressor.metrics import count_macs, count_params
from compressor.prune import prune_zero_channels

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "vit_tiny_patch16_224"
KWARGS = {"num_classes": 10, "img_size": 32}


def _vit():
    torch.manual_seed(0)
    return timm.create_model(NAME, pretrained=False, **KWARGS).eval()


def _zero_heads(groups, model, fraction=0.5):
    """Zero the first ``int(fraction * heads)`` (at least one) heads of every head group, and
    every other hidden unit (the odd ones) of every hidden-units group (Swin V2's
    position bias MLP)."""
    factors = []
    for g in groups:
        f = torch.ones(g.size)
        if g.attention is not None:
            f[: max(1, int(fraction * g.size))] = 0
        if g.hidden is not None:
            f[1::2] = 0
        factors.append(f)
    groups.scale_(dict(model.named_parameters()), factors)


def test_heads_are_the_units_of_a_timm_attention_group():
    model = _vit()
    groups = build_groups(model, torch.randn(1, 3, 32, 32))
    heads = [g for g in groups if g.attention is not None]
    assert sorted(g.attention for g in heads) == sorted(f"blocks.{i}.attn" for i in range(12))
    dim, head_dim = 192, 64
    for g in heads:
        assert g.size == 3 and g.root == f"{g.attention}.qkv"
        # one head: its q, k, v rows (weights and biases) of qkv
        assert g.weights_per_channel == 3 * head_dim * (dim + 1)
        assert [c.module for c in g.consumers] == [f"{g.attention}.proj"]
        assert g.other_macs > 0  # its attention products
    for i in range(12):
        assert f"blocks.{i}.attn.qkv" not in groups.excluded
        assert f"blocks.{i}.attn" not in groups.excluded
    # the unit norm covers all of a head's weights
    params = dict(model.named_parameters())
    norms = groups.channel_norms(params)
    g0 = next(i for i, g in enumerate(groups) if g.attention == "blocks.0.attn")
    w, b = params["blocks.0.attn.qkv.weight"], params["blocks.0.attn.qkv.bias"]
    rows = torch.cat([torch.arange(s * 192 + 64, s * 192 + 128) for s in range(3)])
    expected = torch.cat([w[rows].flatten(), b[rows]]).norm()
    torch.testing.assert_close(norms[g0][1], expected.detach())


@pytest.mark.slow
def test_zero_heads_are_removed_exactly_and_the_compact_model_loads_back(tmp_path):
    model = _vit()
    x = torch.randn(4, 3, 32, 32)
    groups = build_groups(model, x[:1])
    _zero_heads(groups, model)
    masks = groups.zero_masks(dict(model.named_parameters()))
    predicted, _ = groups.estimate_cost(masks)
    macs0, params0 = count_macs(model, x[:1]), count_params(model)
    reference = model(x).detach()

    result = prune_zero_channels(model, groups, x)

    for block in model.blocks:
        a = block.attn
        assert a.num_heads == 2 and a.attn_dim == 2 * a.head_dim == 128
        assert a.qkv.weight.shape == (3 * a.num_heads * a.head_dim, 192)
        assert a.qkv.bias.shape == (3 * 128,) and a.proj.weight.shape == (192, 128)
    assert result.relative_diff <= 1e-6
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)
    macs = count_macs(model, x[:1])
    assert macs < macs0 and count_params(model) < params0
    assert macs == pytest.approx(predicted, rel=1e-6)  # attention products included

    path = tmp_path / "model.safetensors"
    ckpt.save_compact(model, path, arch=f"timm:{NAME}", build_kwargs=KWARGS)
    loaded = compressor.load(path, trust_checkpoint=True)  # img_size: a build kwarg to trust
    assert [b.attn.num_heads for b in loaded.blocks] == [2] * 12
    torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=1e-6)

    onnx_path = tmp_path / "pruned.onnx"
    export.export_onnx(model, x[:1], onnx_path)
    export.check_onnx(onnx_path)
    ort = export.verify_onnx(model, onnx_path, x)
    assert ort["relative_max_abs"] <= 1e-4 and ort["top1_agreement"] == 1.0


def test_at_least_one_head_stays():
    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    groups = build_groups(model, x[:1])
    _zero_heads(groups, model, fraction=1.0)
    result = prune_zero_channels(model, groups, x)
    assert all(b.attn.num_heads == 1 for b in model.blocks)
    assert result.relative_diff <= 1e-6


def test_scale_norm_and_overridden_forward_keep_heads_whole():
    from timm.layers import Attention

    normed = Attention(32, num_heads=4, scale_norm=True, norm_layer=torch.nn.LayerNorm)
    assert attention.heads_reason(normed) == attention.SCALE_NORM_REASON

    class Custom(Attention):
        def forward(self, x):  # might reshape by the input's width
            return super().forward(x)

    assert attention.heads_reason(Custom(32, num_heads=4)) == attention.ATTENTION_REASON
    assert attention.heads_reason(Attention(32, num_heads=4)) is None
    gated = Attention(32, num_heads=4, gated=True, qkv_bias=True)
    assert attention.heads_reason(gated) is None


@pytest.mark.parametrize(
    "kwargs",
    [{"gated": True}, {"qk_norm": True, "norm_layer": torch.nn.LayerNorm}],
    ids=["gated", "qk_norm"],
)
def test_gated_or_qk_normed_attention_loses_heads_exactly(kwargs):
    """A gate's rows go with their head; a per-head q/k norm does not matter (v is zero)."""
    from timm.layers import Attention

    torch.manual_seed(0)
    model = torch.nn.Sequential(Attention(32, num_heads=4, qkv_bias=True, **kwargs)).eval()
    if "qk_norm" in kwargs:
        with torch.no_grad():  # LayerNorm(0) = its bias: make it non-zero
            model[0].q_norm.bias.uniform_(-1, 1)
            model[0].k_norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 5, 32)
    groups = build_groups(model, x[:1], keep_classifier=False)
    (g,) = [g for g in groups if g.attention is not None]
    assert g.size == 4
    if "gated" in kwargs:
        assert {m.param for m in g.members} >= {"0.gate.weight", "0.gate.bias"}
    assert "0.qkv" not in groups.excluded
    _zero_heads(groups, model)
    reference = model(x).detach()
    prune_zero_channels(model, groups, x)
    assert model[0].num_heads == 2 and model[0].qkv.out_features == 3 * 16
    if "gated" in kwargs:
        assert model[0].gate.out_features == 16
    torch.testing.assert_close(model(x), reference, atol=1e-6, rtol=1e-6)


# torchvision: tiny configurations of vit_b_16's, swin_t's and swin_v2_t's classes
TV_VIT = dict(
    image_size=32,
    patch_size=16,
    num_layers=2,
    num_heads=4,
    hidden_dim=32,
    mlp_dim=64,
    num_classes=10,
)
TV_SWIN = dict(
    patch_size=[4, 4],
    embed_dim=16,
    depths=[2, 2],
    num_heads=[2, 4],
    window_size=[4, 4],
    num_classes=10,
)
TV_ARCH = {
    "vit": "torchvision.models:VisionTransformer",
    "swin": "torchvision.models.swin_transformer:SwinTransformer",
    "swin_v2": "tests.test_attention_heads:tiny_swin_v2",
}
TV_KWARGS = {"vit": TV_VIT, "swin": TV_SWIN, "swin_v2": {}}
SWIN_PRUNED = {
    "swin": attention.PrunedShiftedWindowAttention,
    "swin_v2": attention.PrunedShiftedWindowAttentionV2,
}


def tiny_swin_v2():
    """``TV_SWIN`` built from swin_v2_t's classes (V2 attention, blocks and patch merging);
    importable, so a compact file of it loads back by name."""
    from torchvision.models.swin_transformer import (
        PatchMergingV2,
        SwinTransformer,
        SwinTransformerBlockV2,
    )

    return SwinTransformer(**TV_SWIN, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)


def _torchvision(kind):
    torch.manual_seed(0)
    if kind == "vit":
        return torchvision.models.VisionTransformer(**TV_VIT).eval()
    if kind == "swin_v2":
        return tiny_swin_v2().eval()
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(**TV_SWIN).eval()


def _attention_modules(model):
    return [m for m in model.modules() if attention.is_attention(m)]


def _prune_torchvision_heads(kind):
    model = _torchvision(kind)
    x = torch.randn(3, 3, 32, 32)
    groups = build_groups(model, x[:1])
    heads = [g for g in groups if g.attention is not None]
    assert len(heads) == (2 if kind == "vit" else 4)
    _zero_heads(groups, model)
    predicted, predicted_params = groups.estimate_cost(
        groups.zero_masks(dict(model.named_parameters()))
    )
    macs0, params0 = count_macs(model, x[:1]), count_params(model)
    reference = model(x).detach()
    result = prune_zero_channels(model, groups, x)
    assert result.relative_diff <= 1e-6
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)
    macs, params = count_macs(model, x[:1]), count_params(model)
    assert macs < macs0 and params < params0
    assert macs == pytest.approx(predicted, rel=1e-6)  # projections and attention products
    assert params == pytest.approx(predicted_params, rel=1e-6)
    return model, x, groups


@pytest.mark.parametrize("kind", ["vit", "swin", "swin_v2"])
def test_torchvision_heads_are_units_removed_exactly_and_load_back(kind, tmp_path):
    model, x, groups = _prune_torchvision_heads(kind)
    modules = _attention_modules(model)
    if kind == "vit":
        for g in groups:
            if g.attention is not None:  # q, k, v rows of the packed in_proj (weight, bias)
                assert g.root == f"{g.attention}.in_proj_weight" and g.size == 4
                assert g.weights_per_channel == 3 * 8 * (32 + 1) == g.other_params
                assert [c.module for c in g.consumers] == [f"{g.attention}.out_proj"]
        for a in modules:
            assert isinstance(a, attention.PrunedMultiheadAttention)
            assert (a.num_heads, a.head_dim) == (2, 8)
            assert a.in_proj_weight.shape == (3 * 16, 32) and a.out_proj.in_features == 16
        assert not any(r == attention.MHA_REASON for r in groups.excluded.values())
    elif kind == "swin":
        for a in modules:
            assert type(a) is attention.PrunedShiftedWindowAttention
            assert a.head_dim == 8 and a.relative_position_bias_table.shape[1] == a.num_heads
        assert [a.num_heads for a in modules] == [1, 1, 2, 2]
    else:
        for g in groups:
            if g.attention is not None:  # a head: also its row of the position bias MLP's output
                assert f"{g.attention}.cpb_mlp.2.weight" in {m.param for m in g.members}
                assert g.other_params == 1  # its logit_scale
        hidden = [g for g in groups if g.hidden is not None]  # the position bias MLP's units
        assert [g.hidden for g in hidden] == [g.attention for g in groups if g.attention]
        for g in hidden:
            assert g.root == f"{g.hidden}.cpb_mlp.0" and g.size == 512
            assert g.weights_per_channel == 2 + 1  # its cpb_mlp.0 row and bias
            assert [c.module for c in g.consumers] == [f"{g.hidden}.cpb_mlp.2"]
        for a in modules:
            assert type(a) is attention.PrunedShiftedWindowAttentionV2
            assert a.head_dim == 8 and a.logit_scale.shape == (a.num_heads, 1, 1)
            assert a.cpb_mlp[0].weight.shape == (256, 2) and a.cpb_mlp[0].bias.shape == (256,)
            assert a.cpb_mlp[2].weight.shape == (a.num_heads, 256)
        assert [a.num_heads for a in modules] == [1, 1, 2, 2]
        assert attention.ATTENTION_REASON not in groups.excluded.values()
        assert not any("cpb_mlp" in layer for layer in groups.excluded)
    # the pruned model's heads (and hidden units) are units again
    again = build_groups(model, x[:1])
    assert sorted(g.size for g in again if g.attention) == sorted(a.num_heads for a in modules)
    if kind == "swin_v2":
        assert [g.size for g in again if g.hidden] == [256] * 4

    path = tmp_path / "model.safetensors"
    ckpt.save_compact(model, path, arch=TV_ARCH[kind], build_kwargs=TV_KWARGS[kind])
    loaded = compressor.load(path, trust_checkpoint=True)
    assert [(type(a), a.num_heads) for a in _attention_modules(loaded)] == [
        (type(a), a.num_heads) for a in modules
    ]
    torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "kind",
    [  # Swin: ~12 s to export
        "vit",
        pytest.param("swin", marks=pytest.mark.slow),
        pytest.param("swin_v2", marks=pytest.mark.slow),
    ],
)
def test_torchvision_pruned_heads_export_to_onnx(kind, tmp_path):
    model, x, _ = _prune_torchvision_heads(kind)
    path = tmp_path / "pruned.onnx"
    export.export_onnx(model, x[:1], path)
    export.check_onnx(path)
    ort = export.verify_onnx(model, path, x)
    assert ort["relative_max_abs"] <= 1e-4 and ort["top1_agreement"] == 1.0


def _mha_pair(batch_first=True, bias=True):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(
        16, 4, batch_first=batch_first, bias=bias, dtype=torch.float64
    ).eval()
    with torch.no_grad():  # heads 1 and 3 output zero: v rows zero
        for h in (1, 3):
            mha.in_proj_weight[32 + 4 * h : 32 + 4 * (h + 1)] = 0
            if bias:
                mha.in_proj_bias[32 + 4 * h : 32 + 4 * (h + 1)] = 0
    pruned = attention.heads_kind(__import__("copy").deepcopy(mha)).remove([1, 3])
    assert isinstance(pruned, attention.PrunedMultiheadAttention) and pruned.num_heads == 2
    return mha, pruned


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_pruned_multihead_attention_computes_the_original(batch_first, bias):
    mha, pruned = _mha_pair(batch_first, bias)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    y = torch.randn(2, 7, 16, dtype=torch.float64)
    if not batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)
    for q, k, v in [(x, x, x), (x, y, y)]:  # self- and cross-attention
        out, weights = pruned(q, k, v, need_weights=False)
        assert weights is None
        torch.testing.assert_close(out, mha(q, k, v, need_weights=False)[0])
        out, weights = pruned(q, k, v)  # the weights of the kept heads
        torch.testing.assert_close(out, mha(q, k, v)[0])
        full = mha(q, k, v, average_attn_weights=False)[1]
        kept = pruned(q, k, v, average_attn_weights=False)[1]
        torch.testing.assert_close(kept, full[:, [0, 2]])
        torch.testing.assert_close(weights, kept.mean(1))
    unbatched = x[:, 0] if batch_first else x[0]
    torch.testing.assert_close(
        pruned(unbatched, unbatched, unbatched)[0], mha(unbatched, unbatched, unbatched)[0]
    )


def _masks(batch, length, source, heads=4):
    """Every mask kind ``nn.MultiheadAttention`` takes (name -> forward keyword arguments):
    random bool and float masks that leave each query its first key (no all-masked row)."""
    torch.manual_seed(1)

    def bool_mask(*shape):
        mask = torch.rand(*shape) < 0.4
        mask[..., 0] = False
        return mask

    def float_mask(*shape):
        return torch.randn(*shape, dtype=torch.float64).masked_fill(bool_mask(*shape), -1e9)

    causal = torch.ones(length, source, dtype=torch.bool).triu(1)
    return {
        "bool 2-D": {"attn_mask": bool_mask(length, source)},
        "float 2-D": {"attn_mask": float_mask(length, source)},
        "bool 3-D": {"attn_mask": bool_mask(batch * heads, length, source)},
        "float 3-D": {"attn_mask": float_mask(batch * heads, length, source)},
        "bool padding": {"key_padding_mask": bool_mask(batch, source)},
        "float padding": {"key_padding_mask": float_mask(batch, source)},
        "3-D and padding": {
            "attn_mask": float_mask(batch * heads, length, source),
            "key_padding_mask": float_mask(batch, source),
        },
        "causal": {"attn_mask": causal, "is_causal": True},
        "causal and padding": {
            "attn_mask": causal,
            "is_causal": True,
            "key_padding_mask": bool_mask(batch, source),
        },
    }


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_multihead_attention_applies_masks_as_the_original(batch_first):
    """Every mask kind gives the original's output (a 3-D mask's slices of the kept heads);
    the per-head weights are the original's for the kept heads."""
    mha, pruned = _mha_pair(batch_first)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1)
    for name, masks in _masks(batch=2, length=5, source=5).items():
        for need_weights in (False, True):
            expected = mha(x, x, x, need_weights=need_weights, **masks)[0]
            out = pruned(x, x, x, need_weights=need_weights, **masks)[0]
            torch.testing.assert_close(out, expected, msg=f"{name}, need_weights={need_weights}")
        full = mha(x, x, x, average_attn_weights=False, **masks)[1]
        kept = pruned(x, x, x, average_attn_weights=False, **masks)[1]
        torch.testing.assert_close(kept, full[:, [0, 2]], msg=name)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # a hint needs its mask, as torch's
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        pruned(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        mha(x, x, x, is_causal=True)
    unbatched = x[0] if batch_first else x[:, 0]  # (L, E), masks (S,) and (heads, L, S)
    for masks in [
        {"key_padding_mask": torch.tensor([False, True, False, False, True])},
        {"attn_mask": torch.rand(4, 5, 5, dtype=torch.float64)},
        {"attn_mask": causal, "is_causal": True},
    ]:
        torch.testing.assert_close(
            pruned(unbatched, unbatched, unbatched, **masks)[0],
            mha(unbatched, unbatched, unbatched, **masks)[0],
        )


def test_heads_removed_twice_keep_the_original_heads_3d_mask_slices():
    mha, pruned = _mha_pair()  # kept heads 0 and 2
    pruned = attention.heads_kind(pruned).remove([0])  # head 0 goes too: head 2 stays
    assert (pruned.kept_heads.tolist(), int(pruned.original_heads)) == ([2], 4)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.randn(2 * 4, 5, 5, dtype=torch.float64)
    full = mha(x, x, x, attn_mask=mask, average_attn_weights=False)[1]
    kept = pruned(x, x, x, attn_mask=mask, average_attn_weights=False)[1]
    torch.testing.assert_close(kept, full[:, [2]])


def test_a_loaded_pruned_multihead_attention_refuses_3d_masks_it_cannot_match():
    """A compact file holds shapes, not which original heads stayed: a 2-D mask still works,
    a 3-D one (one slice per original head) is refused with the way out."""
    mha, pruned = _mha_pair()
    model = torch.nn.Sequential(__import__("copy").deepcopy(mha))
    for name, tensor in pruned.named_parameters():  # the saved shapes, as a compact file's
        owner, _, attr = name.rpartition(".")
        setattr(model[0].get_submodule(owner), attr, tensor)
    assert attention.sync_heads(model) == ["0"]  # then the heads, as loading one does
    loaded = model[0]
    assert loaded.num_heads == 2 and loaded.kept_heads is None
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.rand(5, 5) < 0.3
    mask[:, 0] = False
    torch.testing.assert_close(loaded(x, x, x, attn_mask=mask)[0], mha(x, x, x, attn_mask=mask)[0])
    with pytest.raises(RuntimeError, match="does not know which of those heads it kept"):
        loaded(x, x, x, attn_mask=torch.zeros(2 * 4, 5, 5, dtype=torch.float64))


class MhaNet(torch.nn.Module):
    """One batch-first ``nn.MultiheadAttention`` (16 wide, 4 heads of 4) in float64, self
    attention over ``(N, L, 16)``."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def mha_net():
    """:class:`MhaNet`, importable so that a compact file of it loads back by name."""
    return MhaNet()


MHA_ARCH = "tests.test_attention_heads:mha_net"


def _saved_mha_net(tmp_path):
    """An :class:`MhaNet` whose heads 1 and 3 (v rows zero) were removed, the full module
    it came from, and the path of its compact file."""
    torch.manual_seed(0)
    model = mha_net().eval()
    with torch.no_grad():
        model.attn.in_proj_bias.uniform_(-1, 1)
        for h in (1, 3):
            model.attn.in_proj_weight[32 + 4 * h : 32 + 4 * (h + 1)] = 0
            model.attn.in_proj_bias[32 + 4 * h : 32 + 4 * (h + 1)] = 0
    full = __import__("copy").deepcopy(model.attn)
    attention.remove_heads(model, "attn", [1, 3])
    path = tmp_path / "model.safetensors"
    ckpt.save_compact(model, path, arch=MHA_ARCH, build_kwargs={})
    return model, full, path


def _rewrite(path, change):
    """Rewrite the compact file at ``path`` with ``change(tensors)`` applied, same metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_a_loaded_pruned_multihead_attention_matches_3d_masks_to_its_kept_heads(tmp_path):
    """The compact file holds which original heads stayed (integer tensors): the loaded module
    reads a 3-D mask (one slice per ORIGINAL head, each different) as before saving, and as
    the full module did."""
    model, full, path = _saved_mha_net(tmp_path)
    loaded = compressor.load(path, arch=MHA_ARCH)
    assert isinstance(loaded.attn, attention.PrunedMultiheadAttention)
    assert loaded.attn.num_heads == 2
    assert loaded.attn.kept_heads.dtype == torch.int64
    assert (loaded.attn.kept_heads.tolist(), int(loaded.attn.original_heads)) == ([0, 2], 4)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.randn(2 * 4, 5, 5, dtype=torch.float64)  # a different slice per head
    bool_mask = torch.rand(2 * 4, 5, 5) < 0.3
    bool_mask[..., 0] = False
    for m in (mask, bool_mask):
        before = model.attn(x, x, x, attn_mask=m, average_attn_weights=False)
        after = loaded.attn(x, x, x, attn_mask=m, average_attn_weights=False)
        expected = full(x, x, x, attn_mask=m, average_attn_weights=False)
        torch.testing.assert_close(after[0], before[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(after[1], before[1], rtol=0, atol=1e-12)
        torch.testing.assert_close(after[0], expected[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(after[1], expected[1][:, [0, 2]], rtol=0, atol=1e-12)
        out = loaded.attn(x, x, x, attn_mask=m, need_weights=False)[0]  # the SDPA path
        torch.testing.assert_close(out, expected[0], rtol=0, atol=1e-12)
    # pruned again after loading: the kept heads compose with the saved ones
    again = attention.remove_heads(loaded, "attn", [0])
    assert (again.kept_heads.tolist(), int(again.original_heads)) == ([2], 4)


def test_a_compact_file_of_a_pruned_multihead_attention_that_kept_every_head_loads(tmp_path):
    """Saved as the pruned module with all 4 heads (and their record): loads as that module,
    not as the nn.MultiheadAttention built, which has no kept heads to take them."""
    torch.manual_seed(0)
    model = mha_net().eval()
    attention.remove_heads(model, "attn", [])
    assert isinstance(model.attn, attention.PrunedMultiheadAttention)
    path = tmp_path / "model.safetensors"
    ckpt.save_compact(model, path, arch=MHA_ARCH, build_kwargs={})
    loaded = compressor.load(path, arch=MHA_ARCH)
    assert isinstance(loaded.attn, attention.PrunedMultiheadAttention)
    assert (loaded.attn.kept_heads.tolist(), int(loaded.attn.original_heads)) == ([0, 1, 2, 3], 4)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.randn(2 * 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(
        loaded.attn(x, x, x, attn_mask=mask)[0], model.attn(x, x, x, attn_mask=mask)[0],
        rtol=0, atol=1e-12,
    )  # fmt: skip


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"attn.kept_heads": torch.tensor([2, 0])}, "not strictly increasing"),
        ({"attn.kept_heads": torch.tensor([0, 4])}, r"not all in \[0, original_heads=4\)"),
        ({"attn.kept_heads": torch.tensor([-1, 2])}, "not all in"),
        ({"attn.kept_heads": torch.tensor([0])}, "the module has 2 heads"),
        ({"attn.kept_heads": torch.tensor([0.0, 2.0])}, "must be an integer tensor"),
        ({"attn.original_heads": torch.tensor([4, 4])}, "must be one number"),
        ({"attn.original_heads": None}, "one without the other"),
    ],
)
def test_malformed_kept_heads_in_a_compact_file_are_refused_naming_the_problem(
    tmp_path, change, problem
):
    _, _, path = _saved_mha_net(tmp_path)

    def alter(tensors):
        for key, value in change.items():
            if value is None:
                del tensors[key]
            else:
                tensors[key] = value

    _rewrite(path, alter)
    with pytest.raises(ckpt.CheckpointError, match=problem):
        compressor.load(path, arch=MHA_ARCH)


def test_a_pruned_multihead_attention_refuses_malformed_kept_heads_in_a_state_dict(tmp_path):
    model, _, _ = _saved_mha_net(tmp_path)
    state = model.state_dict()
    state["attn.kept_heads"] = torch.tensor([2, 2])
    with pytest.raises(ValueError, match="not strictly increasing"):
        model.load_state_dict(state)
    assert model.attn.kept_heads.tolist() == [0, 2]


def test_a_compact_file_without_kept_heads_loads_and_refuses_3d_masks(tmp_path):
    """A file written before the kept heads were saved: the module loads, computes the same
    with a 2-D mask, and refuses a 3-D one (which heads stayed is not known)."""
    model, _, path = _saved_mha_net(tmp_path)

    def drop(tensors):
        del tensors["attn.kept_heads"], tensors["attn.original_heads"]

    _rewrite(path, drop)
    loaded = compressor.load(path, arch=MHA_ARCH)
    assert loaded.attn.num_heads == 2
    assert loaded.attn.kept_heads is None and loaded.attn.original_heads is None
    assert "attn.kept_heads" not in loaded.state_dict()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.randn(5, 5, dtype=torch.float64)
    torch.testing.assert_close(
        loaded.attn(x, x, x, attn_mask=mask)[0], model.attn(x, x, x, attn_mask=mask)[0],
        rtol=0, atol=1e-12,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="does not know which of those heads it kept"):
        loaded.attn(x, x, x, attn_mask=torch.zeros(2 * 4, 5, 5, dtype=torch.float64))


def test_swin_v2_heads_go_exactly_with_their_scales_biases_and_k_bias_in_float64():
    """Each kept head keeps its own logit_scale, position-bias row and q/v biases, and still
    reads its k bias as zero (cosine attention would see a non-zero one); half the position
    bias MLP's hidden units (the odd ones) go at the same time, its cpb_mlp.0 rows and
    cpb_mlp.2 columns: the outputs are the original's to float64 rounding."""
    model = tiny_swin_v2().double().eval()
    with torch.no_grad():  # heads that differ: a wrong slice would show
        for a in _attention_modules(model):
            a.qkv.bias.uniform_(-1, 1)  # the k third too: the forward reads it as zero
            a.logit_scale.uniform_(1, 4)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    groups = build_groups(model, x[:1])
    _zero_heads(groups, model)
    reference = model(x).detach()
    prune_zero_channels(model, groups, x)
    modules = _attention_modules(model)
    assert [a.num_heads for a in modules] == [1, 1, 2, 2]
    assert all(type(a) is attention.PrunedShiftedWindowAttentionV2 for a in modules)
    assert [tuple(a.cpb_mlp[2].weight.shape) for a in modules] == [(1, 256)] * 2 + [(2, 256)] * 2
    torch.testing.assert_close(model(x), reference, rtol=1e-12, atol=1e-12)


def test_unsupported_torchvision_attention_keeps_heads_whole():
    from torchvision.models.swin_transformer import ShiftedWindowAttentionV2

    class CustomV2(ShiftedWindowAttentionV2):
        def forward(self, x):  # might reshape by the input's width
            return super().forward(x)

    assert attention.heads_reason(CustomV2(16, [4, 4], [0, 0], num_heads=2)) == (
        attention.ATTENTION_REASON
    )
    assert attention.heads_reason(ShiftedWindowAttentionV2(16, [4, 4], [0, 0], 2)) is None
    # its position bias MLP's hidden units: only where its forward is known
    assert attention.hidden_units_kind(CustomV2(16, [4, 4], [0, 0], num_heads=2)) is None
    kind = attention.hidden_units_kind(ShiftedWindowAttentionV2(16, [4, 4], [0, 0], 2))
    assert type(kind) is attention.SwinV2PositionBias and kind.size == 512
    separate = torch.nn.MultiheadAttention(16, 4, kdim=8, vdim=8)
    assert attention.heads_reason(separate) == attention.MHA_REASON
    assert attention.heads_reason(torch.nn.MultiheadAttention(16, 4, add_bias_kv=True)) == (
        attention.MHA_REASON
    )
    assert attention.heads_reason(torch.nn.MultiheadAttention(16, 4)) is None
