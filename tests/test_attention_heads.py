"""Whole attention heads of timm Vision Transformers as removable units: zero half of each
block's heads, remove them, and check parity, shapes, MACs, the compact round trip and ONNX."""

from __future__ import annotations

import pytest
import torch
import torchvision

import compressor
from compressor import attention, export
from compressor import checkpoint as ckpt
from compressor.groups import MHA_REASON, build_groups
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
    """Zero the first ``int(fraction * heads)`` (at least one) heads of every head group."""
    factors = []
    for g in groups:
        f = torch.ones(g.size)
        if g.attention is not None:
            f[: max(1, int(fraction * g.size))] = 0
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


def test_multihead_attention_stays_whole_with_the_reason():
    model = torchvision.models.vit_b_16(weights=None, image_size=32, num_classes=10).eval()
    groups = build_groups(model, torch.randn(1, 3, 32, 32))
    assert groups.excluded["encoder.layers.encoder_layer_0.self_attention"] == MHA_REASON
    assert all(g.attention is None for g in groups)
