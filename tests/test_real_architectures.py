"""Exact channel removal on real architectures (engine issue): zero 40% of every group,
prune, and check output parity, cost reduction, one training step and ONNX parity.

Transformers keep their LayerNorm-normalised streams whole (the reasons are in
``groups.excluded``), so only their MLP hidden units and whole attention heads go (timm's
ViTs, torchvision's ``nn.MultiheadAttention`` in vit_b_16 and Swin's window attention; and
Swin V2's position bias MLP hidden units): there
the check is that MACs fall, by exactly what the cost model predicted, instead of a fixed
bound."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from compressor import export
from compressor.attention import (
    PrunedMultiheadAttention,
    PrunedShiftedWindowAttention,
    PrunedShiftedWindowAttentionV2,
)
from compressor.groups import (
    ATTENTION_REASON,
    MHA_REASON,
    NORM_STREAM_REASON,
    SHUFFLE_REASON,
    build_groups,
)
from compressor.metrics import count_macs, count_params
from compressor.models import lenet5, resnet20
from compressor.prune import prune_zero_channels
from tests.helpers import randomize_bn, zero_fraction_of_groups

LAYER_NORM = NORM_STREAM_REASON.format(kind="LayerNorm")

# name -> (constructor kwargs, most of the MACs and params left after zeroing 40% of every
# group; None: only some layers are removable, the fall is checked against the cost model)
TORCHVISION = {
    "resnet18": ({}, 0.75),
    "resnet50": ({}, 0.75),
    "mobilenet_v2": ({}, 0.75),
    "vgg11_bn": ({}, 0.75),
    "efficientnet_b0": ({}, 0.75),
    "regnet_x_400mf": ({}, 0.75),
    "densenet121": ({}, 0.75),
    "resnext50_32x4d": ({}, 0.75),
    "regnet_y_400mf": ({}, 0.75),
    "shufflenet_v2_x1_0": ({}, None),
    "convnext_tiny": ({}, None),
    "vit_b_16": ({"image_size": 64}, None),
    "swin_t": ({}, None),
    "swin_v2_t": ({}, None),
}
TIMM = {
    "resnet50": ({}, 0.75),
    "efficientnet_b0": ({}, 0.75),
    "convnext_atto": ({}, None),
    "vit_tiny_patch16_224": ({"img_size": 64}, None),
    "deit_tiny_patch16_224": ({"img_size": 64}, None),
}


def _check_exact_removal(model, x, tmp_path, *, bound=0.75):
    model.eval()
    randomize_bn(model)
    groups = build_groups(model, x[:1])
    assert len(groups) > 0
    zero_fraction_of_groups(groups, model, 0.4)
    macs0, params0 = count_macs(model, x[:1]), count_params(model)
    predicted, _ = groups.estimate_cost(groups.zero_masks(dict(model.named_parameters())))
    result = prune_zero_channels(model, groups, x)
    # (a) parity, relative to the output scale
    assert result.relative_diff <= 1e-4
    # (b) cost fell: below the bound, or by what the cost model predicted
    macs, params = count_macs(model, x[:1]), count_params(model)
    if bound is None:
        assert macs < macs0 and params < params0
        assert macs == pytest.approx(predicted, rel=1e-6)
    else:
        assert macs < bound * macs0
        assert params < bound * params0
    # (c) still trains one step
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    # (c) exports, and onnxruntime agrees
    model.eval()
    path = tmp_path / "pruned.onnx"
    export.export_onnx(model, x[:1], path)  # from one sample; verified on the whole batch
    export.check_onnx(path)
    ort = export.verify_onnx(model, path, x)
    assert ort["relative_max_abs"] <= 1e-4
    assert ort["top1_agreement"] == 1.0
    return groups


def test_exact_removal_resnet20(tmp_path):
    _check_exact_removal(resnet20(), torch.randn(4, 3, 32, 32), tmp_path)


def test_exact_removal_lenet_linear_hidden_layers(tmp_path):
    _check_exact_removal(lenet5(in_channels=1), torch.randn(4, 1, 28, 28), tmp_path)


class _Block(nn.Module):
    """A pre-norm transformer block on (batch, tokens, dim): attention-free, LayerNorm + MLP."""

    def __init__(self, dim=8, hidden=32):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class _TinyTransformer(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.blocks = nn.Sequential(_Block(dim), _Block(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


def test_mlp_hidden_units_go_exactly_and_the_layernorm_stream_stays(tmp_path):
    model = _TinyTransformer()
    x = torch.randn(4, 5, 6)
    groups = build_groups(model, x[:1])
    assert sorted(g.root for g in groups) == ["blocks.0.fc1", "blocks.1.fc1"]
    assert all(g.size == 32 for g in groups)
    for layer in ["embed", "blocks.0.fc2", "blocks.1.fc2"]:
        assert groups.excluded[layer] == LAYER_NORM
    assert "head" not in groups.excluded  # the classifier is kept on request, not explained
    zero_fraction_of_groups(groups, model, 0.5)
    reference = model(x).detach()
    result = prune_zero_channels(model, groups, x)
    assert model.blocks[0].fc1.out_features == 16 and model.blocks[1].fc2.in_features == 16
    assert model.embed.out_features == 8  # the normalised stream is whole
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)
    assert result.relative_diff <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TORCHVISION))
def test_exact_removal_torchvision(name, tmp_path):
    kwargs, bound = TORCHVISION[name]
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    groups = _check_exact_removal(
        model,
        torch.randn(2, 3, 64, 64),
        tmp_path,
        bound=bound,
    )
    reasons = set(groups.excluded.values())
    if name in ("vit_b_16", "swin_t"):  # the heads are units; the normalised stream is whole
        assert LAYER_NORM in reasons
        assert MHA_REASON not in reasons and ATTENTION_REASON not in reasons
        assert sum(g.attention is not None for g in groups) == 12
        pruned = PrunedMultiheadAttention if name == "vit_b_16" else PrunedShiftedWindowAttention
        attention = [m for m in model.modules() if isinstance(m, pruned)]
        assert len(attention) == 12 and all(
            m.num_heads < 12 if name == "vit_b_16" else m.num_heads * m.head_dim < m.qkv.in_features
            for m in attention
        )
    if name == "swin_v2_t":  # heads, and its position bias MLP's hidden units, are units
        assert LAYER_NORM in reasons and ATTENTION_REASON not in reasons
        assert not any("cpb_mlp" in layer for layer in groups.excluded)
        assert sum(g.attention is not None for g in groups) == 12
        assert [g.size for g in groups if g.hidden is not None] == [512] * 12
        attention = [m for m in model.modules() if type(m) is PrunedShiftedWindowAttentionV2]
        assert len(attention) == 12
        for m in attention:  # 40% of 3, 6, 12 or 24 heads and of 512 hidden units went
            heads = m.qkv.in_features // m.head_dim
            assert m.num_heads == heads - int(0.4 * heads)
            assert m.cpb_mlp[0].out_features == m.cpb_mlp[2].in_features == 512 - 204
            assert m.cpb_mlp[2].out_features == m.num_heads
    if name == "shufflenet_v2_x1_0":
        assert reasons == {SHUFFLE_REASON}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TIMM))
def test_exact_removal_timm(name, tmp_path):
    timm = pytest.importorskip("timm")
    kwargs, bound = TIMM[name]
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    groups = _check_exact_removal(model, torch.randn(2, 3, 64, 64), tmp_path, bound=bound)
    if name.startswith(("vit", "deit")):
        reasons = set(groups.excluded.values())
        assert reasons == {LAYER_NORM}  # the heads are units; the normalised stream is whole
        assert sum(g.attention is not None for g in groups) == 12
        assert all(b.attn.num_heads == 2 for b in model.blocks)  # 40% of 3 heads: one went
