"""The sensitivity allocation: how many units each group may lose to a budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compressor
from compressor.errors import BadInputError
from compressor.groups import build_groups
from compressor.method.allocation import Sensitivity, allocate, measure_sensitivity
from compressor.method.budget import BudgetController, Target
from compressor.method.strength import group_weights, reference_norms
from tests.test_budget import trained_like_resnet20
from tests.test_pipeline import FAST

SHARES = (0.0, 0.25, 0.5, 0.75, 0.95)


def _sensitivity(*curves) -> Sensitivity:
    return Sensitivity(SHARES, tuple(tuple(c) for c in curves))


def test_allocate_takes_from_the_group_whose_removal_hurts_least_per_cost():
    sens = _sensitivity([0, 0.01, 0.02, 0.03, 0.04], [0, 1.0, 2.0, 3.0, 4.0])
    sizes, saved = [32, 32], [1.0, 1.0]  # equal cost per unit: damage alone decides

    def meets(zeros):  # a quarter of all units removed
        return sum(zeros) >= 16

    zeros = allocate(sens, sizes, [1, 1], [1, 1], saved, meets)
    assert zeros == [16, 0]


def test_allocate_weighs_the_cost_saved():
    sens = _sensitivity([0, 1.0, 2.0, 3.0, 4.0], [0, 1.0, 2.0, 3.0, 4.0])  # equal damage
    sizes, saved = [32, 32], [1.0, 10.0]  # a unit of group 1 saves 10x the cost

    def meets(zeros):
        return zeros[0] * 1.0 + zeros[1] * 10.0 >= 80

    zeros = allocate(sens, sizes, [1, 1], [1, 1], saved, meets)
    assert zeros == [0, 8]


def test_allocate_is_the_shortest_prefix_that_meets_the_targets_and_respects_floors_and_blocks():
    sens = _sensitivity([0, 0.1, 0.2, 0.3, 0.4], [0, 0.2, 0.5, 0.9, 1.5], [0, 5, 6, 7, 8])
    sizes, floors, blocks, saved = [64, 64, 16], [16, 8, 4], [8, 8, 1], [1.0, 2.0, 4.0]

    def removed(zeros):
        return sum(z * s for z, s in zip(zeros, saved, strict=True))

    zeros = allocate(sens, sizes, floors, blocks, saved, lambda z: removed(z) >= 120)
    assert removed(zeros) >= 120
    for z, size, floor, block in zip(zeros, sizes, floors, blocks, strict=True):
        kept = size - z
        assert kept >= floor and (kept % block == 0 or kept == size)
    # the fewest moves: past the target by less than the largest move (8 units of group 1)
    assert removed(zeros) < 120 + 8 * 2.0

    # nothing meets an impossible target: every group at its floor
    zeros = allocate(sens, sizes, floors, blocks, saved, lambda z: False)
    assert [size - z for size, z in zip(sizes, zeros, strict=True)] == [16, 8, 4]


def test_monotone_takes_the_running_maximum():
    sens = _sensitivity([0, 2.0, 1.0, 3.0, 2.5]).monotone()
    assert sens.damage[0] == (0, 2.0, 2.0, 3.0, 3.0)
    assert sens.at(0, 0.375) == 2.0 and sens.at(0, 1.0) == 3.0


class _TwoPaths(nn.Module):
    """A conv whose first 4 channels carry the signal the classifier reads; the other 4 are
    read with tiny weights. Removing the first 4 hurts, the others barely."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():
            self.fc.weight[:, 4:] *= 1e-3
            self.bn.weight[4:] = 0.5  # the weak channels also have the smaller norms

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_measure_sensitivity_restores_the_weights_and_is_zero_at_share_zero():
    torch.manual_seed(0)
    model = _TwoPaths().eval()
    x = torch.randn(16, 1, 8, 8)
    groups = build_groups(model, x[:1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = measure_sensitivity(model, groups, [x[:8], x[8:]], shares=(0.0, 0.5, 0.875))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    (curve,) = sens.damage
    assert curve[0] == 0.0
    # the weak half goes first (lowest norms) and costs little; past it, the signal goes
    assert curve[1] < 1e-3 < curve[2]


def test_a_budget_with_a_sensitivity_allocation_keeps_each_group_within_its_cap():
    model = trained_like_resnet20()
    groups = build_groups(model, torch.randn(1, 1, 16, 16))
    scale = group_weights(groups, "uniform") * reference_norms(
        groups, dict(model.named_parameters())
    )
    # the first group is fragile, every other cheap: the allocation spares the first
    curves = [[0, 5, 10, 20, 40]] + [[0, 0.01, 0.02, 0.03, 0.04]] * (len(groups) - 1)
    budget = BudgetController(
        [Target("macs", 2.0, 2.0)], groups, scale, total_steps=10, reach_fraction=0.5,
        balance=0.0, sensitivity=_sensitivity(*curves),
    )  # fmt: skip
    assert budget.keep_units[0] == groups.groups[0].size
    norms = groups.channel_norms(dict(model.named_parameters()))
    for step in range(6):
        budget.thresholds(step, norms)
    assert budget.frozen and budget.reached["macs"] >= 2.0
    for zero, keep, group in zip(budget.zero, budget.keep_units, groups, strict=True):
        assert group.size - int(zero.sum()) >= keep
    assert not bool(budget.zero[0].any())
    # the allocation travels with the budget's state (--resume measures nothing again)
    assert budget.state_dict()["sensitivity"]["damage"][0] == [0, 5, 10, 20, 40]


def test_sensitivity_needs_a_classifier_and_says_what_to_use_instead():
    class Boxes(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return {"boxes": self.bn(self.conv(x)).flatten(1)}

    model = Boxes().eval()
    x = torch.randn(2, 1, 6, 6)
    groups = build_groups(model, x[:1])
    with pytest.raises(BadInputError, match="target.allocation=uniform"):
        measure_sensitivity(model, groups, [x])


@pytest.mark.usefixtures("one_thread")
def test_compress_with_a_sensitivity_allocation_meets_the_target_within_the_caps(lenet, tmp_path):
    checkpoint, data = lenet
    report = compressor.compress(
        str(checkpoint), arch="lenet5", data=str(data), out=tmp_path / "out", device="cpu",
        target_macs=2, overrides=["train.epochs=1", "target.allocation=sensitivity", *FAST],
    )  # fmt: skip
    assert report["exit_code"] == 0
    assert report["reduction"]["macs_x"] >= 2 * 0.95
    allocation = report["method"]["allocation"]
    assert allocation["kind"] == "sensitivity"
    assert len(allocation["least_kept"]) == len(allocation["units"]) > 0
    assert sum(allocation["least_kept"]) < sum(allocation["units"])  # it let some go
    assert report["compressed"]["channels_kept"] >= sum(allocation["least_kept"])
    assert "sensitivity" in report["timings_s"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "one-shot sensitivity analysis" in md
