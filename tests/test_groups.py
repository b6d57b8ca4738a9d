import torch
from torch import nn

from compressor.groups import build_groups
from compressor.models import lenet5, resnet20
from tests.helpers import zero_fraction_of_groups


def test_resnet20_groups_cover_residual_stream_without_overlap():
    model = resnet20(in_channels=1)
    groups = build_groups(model, torch.randn(1, 1, 28, 28))
    # 3 residual streams + 9 inner block channels, 448 channels (the bundled example's numbers)
    assert len(groups) == 12
    assert groups.total_channels == 448
    seen = {}
    for g in groups:
        for m in g.members:
            for i in m.index.tolist():
                key = (m.param, i)
                assert key not in seen, f"{key} in two groups"
                seen[key] = g.root
    stream = next(g for g in groups if g.root == "conv1")
    params = set(stream.params)
    assert {"conv1.weight", "bn1.weight", "layer1.0.bn2.bias", "layer1.2.conv2.weight"} <= params
    # the classifier's outputs are never in a group, its inputs are a consumer
    assert not any(p.startswith("fc.") for g in groups for p in g.params)
    assert any(c.module == "fc" for g in groups for c in g.consumers)


def test_keep_patterns_exclude_whole_coupled_group():
    model = resnet20(in_channels=1)
    groups = build_groups(model, torch.randn(1, 1, 28, 28), keep=["layer1.0.conv1"])
    assert "layer1.0.conv1" not in {g.root for g in groups}
    assert len(groups) == 11


def test_keep_pattern_that_matches_nothing_is_an_error():
    import pytest

    from compressor.errors import BadInputError

    with pytest.raises(BadInputError, match="match no module"):
        build_groups(resnet20(), torch.randn(1, 3, 32, 32), keep=["nosuchlayer*"])


def test_norms_and_scale_are_consistent():
    model = lenet5()
    groups = build_groups(model, torch.randn(1, 1, 28, 28))
    tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = groups.channel_norms(tensors)
    g = next(g for g in groups if g.root == "conv2")
    i = groups.groups.index(g)
    by_hand = torch.sqrt(
        model.conv2.weight.detach().pow(2).sum((1, 2, 3)) + model.conv2.bias.detach().pow(2)
    )
    torch.testing.assert_close(norms[i], by_hand)
    factors = [torch.full((gr.size,), 0.5) for gr in groups]
    groups.scale_(tensors, factors)
    torch.testing.assert_close(groups.channel_norms(tensors)[i], by_hand * 0.5)


def test_estimate_cost_matches_flop_counter_after_pruning():
    from compressor.metrics import count_macs, count_params
    from compressor.prune import prune_zero_channels

    model = resnet20(in_channels=1).eval()
    x = torch.randn(4, 1, 28, 28)
    groups = build_groups(model, x[:1])
    zero_fraction_of_groups(groups, model, 0.5)
    macs_est, params_est = groups.estimate_cost(groups.zero_masks(dict(model.named_parameters())))
    prune_zero_channels(model, groups, x)
    assert macs_est == count_macs(model, x[:1])
    assert abs(params_est - count_params(model)) / count_params(model) < 0.02


class SigmoidGated(nn.Module):
    """conv -> sigmoid -> conv: a zero channel becomes 0.5, so removing it is not exact."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.sigmoid(self.a(x))))).mean((2, 3))


def test_groups_through_a_sigmoid_are_kept():
    groups = build_groups(SigmoidGated(), torch.randn(1, 1, 8, 8))
    roots = {g.root for g in groups}
    assert "a" not in roots and "a" in groups.excluded
    assert "b" in roots


def _hand_groups():
    """Two groups over a (6, 2, 3) weight and a bias: rows in order, a shifted range, a permutation."""
    from compressor.groups import ChannelGroup, ChannelGroups, Slice

    whole = Slice("w", torch.arange(6), torch.tensor([0, 0, 1, 1, 2, 2]))
    shifted = Slice("b", torch.arange(2, 5), torch.tensor([0, 1, 2]))
    permuted = Slice("v", torch.tensor([3, 0, 2, 1]), torch.tensor([1, 0, 1, 0]))
    g1 = ChannelGroup("w", 3, (whole, shifted), (), 1)
    g2 = ChannelGroup("v", 2, (permuted,), (), 1)
    return ChannelGroups([g1, g2], {}, 0, 0), (whole, shifted, permuted)


def _norms_by_hand(groups, tensors):
    out = []
    for g in groups:
        sq = torch.zeros(g.size, dtype=torch.float64)
        for m in g.members:
            t = tensors[m.param].double()
            for row, ch in zip(m.index.tolist(), m.channel.tolist(), strict=True):
                sq[ch] += t[row].pow(2).sum()
        out.append(sq.sqrt())
    return out


def test_member_span_marks_in_order_rows():
    _, (whole, shifted, permuted) = _hand_groups()
    assert whole.span == (0, 6)
    assert shifted.span == (2, 3)
    assert permuted.span is None
    t = torch.arange(24.0).reshape(6, 4)
    assert whole.rows(t).data_ptr() == t.data_ptr()  # a view, no copy
    torch.testing.assert_close(shifted.rows(t), t[2:5])
    torch.testing.assert_close(permuted.rows(t), t[[3, 0, 2, 1]])


def test_norms_and_scale_on_views_and_gathers_match_by_hand():
    groups, _ = _hand_groups()
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(6, 2, 3, generator=gen),
        "b": torch.randn(7, generator=gen),
        "v": torch.randn(5, 3, generator=gen),
    }
    expect = _norms_by_hand(groups, tensors)
    for got, want in zip(groups.channel_norms(tensors), expect, strict=True):
        torch.testing.assert_close(got.double(), want)
    before = {k: v.clone() for k, v in tensors.items()}
    factors = [torch.tensor([0.5, 0.0, 2.0]), torch.tensor([3.0, 0.25])]
    groups.scale_(tensors, factors)
    torch.testing.assert_close(
        tensors["w"], before["w"] * torch.tensor([0.5, 0.5, 0, 0, 2, 2])[:, None, None]
    )
    b = before["b"].clone()
    b[2:5] *= factors[0]
    torch.testing.assert_close(tensors["b"], b)  # rows outside the span untouched
    v = before["v"].clone()
    v[[3, 0, 2, 1]] *= torch.tensor([0.25, 3.0, 0.25, 3.0])[:, None]
    torch.testing.assert_close(tensors["v"], v)
    masks = groups.zero_masks(tensors)
    assert masks[0].tolist() == [False, True, False] and masks[1].tolist() == [False, False]


def test_copy_units_puts_back_exactly_the_chosen_units_slices():
    """The seeker's channel rollback: the chosen units' member slices come from the saved
    state, every other entry keeps its current value."""
    model = resnet20(in_channels=1)
    groups = build_groups(model, torch.randn(1, 1, 28, 28))
    saved = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    now = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = {n: t.clone() for n, t in now.items()}
    masks = [torch.zeros(g.size, dtype=torch.bool) for g in groups]
    masks[0][[1, 3]] = True
    masks[5][0] = True
    groups.copy_units_(now, saved, masks)
    chosen = {n: torch.zeros(t.shape[0], dtype=torch.bool) for n, t in now.items()}
    for group, mask in zip(groups, masks, strict=True):
        for member in group.members:
            chosen[member.param][member.index[mask[member.channel]]] = True
    assert sum(int(c.sum()) for c in chosen.values()) > 0
    for name, rows in chosen.items():
        torch.testing.assert_close(now[name][rows], saved[name][rows], rtol=0, atol=0)
        torch.testing.assert_close(now[name][~rows], before[name][~rows], rtol=0, atol=0)
