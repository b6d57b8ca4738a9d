import pytest
import torch
from torch import nn

from compressor.errors import VerificationError
from compressor.groups import build_groups
from compressor.metrics import count_macs, count_params
from compressor.models import lenet5, resnet20
from compressor.prune import prune_zero_channels, units_to_remove
from tests.helpers import randomize_bn, zero_fraction_of_groups


def test_units_to_remove_round_to_and_never_empty():
    mask = torch.tensor([True, True, True, False, True, True, True, True])
    assert int(units_to_remove(mask, 1).sum()) == 7  # keeps 1
    assert int(units_to_remove(mask, 4).sum()) == 4  # keeps 4
    assert int(units_to_remove(torch.zeros(5, dtype=torch.bool), 1).sum()) == 0
    kept = 8 - int(units_to_remove(mask, 3).sum())
    assert kept % 3 == 0


@pytest.mark.parametrize("round_to", [1, 4])
def test_prune_resnet20_exact(round_to):
    model = resnet20(in_channels=1).eval()
    randomize_bn(model)
    x = torch.randn(16, 1, 28, 28)
    groups = build_groups(model, x[:1])
    zero_fraction_of_groups(groups, model, 0.4)
    macs0, params0 = count_macs(model, x[:1]), count_params(model)
    reference = model(x).detach()
    result = prune_zero_channels(model, groups, x, round_to=round_to)
    assert result.relative_diff <= 1e-4
    torch.testing.assert_close(model(x), reference, atol=1e-4, rtol=1e-4)
    assert count_macs(model, x[:1]) < macs0 and count_params(model) < params0
    assert result.channels_removed > 0
    for root, kept in result.kept.items():
        assert kept % round_to == 0 or kept == next(g for g in groups if g.root == root).size


def test_prune_raises_when_output_changes():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 3, 3, padding=1)

        def forward(self, x):
            return self.b(self.a(x) + 1.0).mean((2, 3))  # +1 makes a zero channel non-zero

    model = Leaky().eval()
    x = torch.randn(4, 1, 8, 8)
    groups = build_groups(model, x[:1], check_exactness=False)
    zero_fraction_of_groups(groups, model, 0.5)
    with pytest.raises(VerificationError, match="changed the model output"):
        prune_zero_channels(model, groups, x)


def test_removal_check_is_not_fooled_by_float32_summation_order_at_a_quantizer_step():
    """Removing zero input channels reorders a convolution's sum (float32 moves ~1e-6); a
    quantized activation turns a move at a level's edge into a whole level. The check runs
    in float64, sees only what removal changed, and hands the model back in float32."""

    class FineSteps(nn.Module):  # a quantizer with 2^-12-wide levels: float32 noise crosses them
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
            self.b = nn.Conv2d(64, 64, 3, padding=1, bias=False)
            self.c = nn.Conv2d(64, 4, 1)

        def forward(self, x):
            h = torch.round(self.b(torch.relu(self.a(x))) * 4096) / 4096
            return self.c(h).mean((2, 3))

    torch.manual_seed(0)
    model = FineSteps().eval()
    x = torch.randn(16, 3, 16, 16)
    model(x).sum().backward()  # gradients left over from training stay float32 too
    groups = build_groups(model, x[:1], check_exactness=False)
    zero_fraction_of_groups(groups, model, 0.5)
    float32_before = model(x).detach()
    result = prune_zero_channels(model, groups, x)
    assert result.channels_removed > 0 and result.relative_diff == 0.0
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
    assert model.a.out_channels < 64 and model(x).dtype == torch.float32
    # in float32 the same removal moves the quantized output: what the float64 check avoids
    assert not torch.equal(model(x).detach(), float32_before)


def test_prune_lenet_linear_hidden_layers():
    model = lenet5().eval()
    x = torch.randn(8, 1, 28, 28)
    groups = build_groups(model, x[:1])
    zero_fraction_of_groups(groups, model, 0.4)
    ref = model(x).detach()
    prune_zero_channels(model, groups, x)
    assert model.fc1.out_features == 300 and model.conv2.out_channels == 30
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)


def test_prune_exact_with_binary_activations():
    """A zero group gives BN output 0 and sigma(0) = 0, so removal stays exact with binary units."""
    from compressor.activations import swap_activations

    model = swap_activations(resnet20(in_channels=1), bits=1, skip=["relu"]).model.eval()
    randomize_bn(model)
    x = torch.randn(16, 1, 28, 28)
    groups = build_groups(model, x[:1])
    zero_fraction_of_groups(groups, model, 0.4)
    reference = model(x).detach()
    result = prune_zero_channels(model, groups, x)
    assert result.channels_removed > 0
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)


class _GroupNormStack(nn.Module):
    """conv -> GroupNorm (4 groups of 4 channels) -> ReLU -> conv, FCOS's head tower in small."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 5, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.norm(self.conv1(x))))


def test_groupnorm_loses_whole_norm_groups_exactly():
    model = _GroupNormStack().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 3, 12, 12)
    groups = build_groups(model, x[:1])
    (group,) = groups.groups
    # a unit is one norm group: a lone zero channel would move its group's mean and variance
    assert group.root == "conv1" and group.size == 4
    assert group.root_unit.tolist() == [u for u in range(4) for _ in range(4)]
    zero_fraction_of_groups(groups, model, 0.5)  # 2 of the 4 norm groups
    predicted, _ = groups.estimate_cost(groups.zero_masks(dict(model.named_parameters())))
    reference = model(x).detach()
    result = prune_zero_channels(model, groups, x)
    assert result.channels_removed == 8 and result.relative_diff <= 1e-6
    assert (model.conv1.out_channels, model.norm.num_channels, model.norm.num_groups) == (8, 8, 2)
    assert torch.allclose(model(x), reference, atol=1e-5)
    assert count_macs(model, x[:1]) == pytest.approx(predicted, rel=1e-6)  # what targets aim by
    model.norm = nn.GroupNorm(1, model.norm.num_channels)  # one group: a LayerNorm, left whole
    lone = build_groups(model, x[:1])
    assert not lone.groups and "GroupNorm normalises" in lone.excluded["conv1"]
