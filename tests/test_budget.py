"""The budget: targets become the group prox's thresholds; the seeker sets the budget."""

from __future__ import annotations

import math

import pytest
import torch

from compressor.groups import build_groups
from compressor.method.budget import BudgetController, Target, cubic_schedule, resolve_balance
from compressor.method.seeker import AccuracySeeker, Reading
from compressor.method.strength import group_weights, reference_norms
from compressor.models import resnet20
from tests.helpers import randomize_bn


def trained_like_resnet20() -> torch.nn.Module:
    """A ResNet-20 whose BatchNorm scales differ, as after training (at init they all tie at 1,
    and a threshold cannot split a tie: the prox zeroes all of it or none)."""
    model = resnet20(in_channels=1)
    torch.manual_seed(0)
    randomize_bn(model)
    return model


def _budget(targets, *, steps=100, balance=0.0, schedule="cubic", round_to=1):
    model = trained_like_resnet20()
    groups = build_groups(model, torch.randn(1, 1, 16, 16))
    weights = group_weights(groups, "uniform")
    scale = weights * reference_norms(groups, dict(model.named_parameters()))
    budget = BudgetController(
        targets, groups, scale, total_steps=steps, reach_fraction=0.5, balance=balance,
        schedule=schedule, round_to=round_to,
    )  # fmt: skip
    return model, groups, budget


def lands_within_one_unit(groups, reached: float, want: float) -> bool:
    """A threshold removes whole units in norm order: it meets ``want`` and passes it by at
    most the MACs of one unit (one residual-stream channel can be several percent)."""
    one_unit = max(groups.macs_per_channel())
    cost, wanted = groups.total_macs / reached, groups.total_macs / want
    return reached >= want and cost >= wanted - one_unit


def _norms(model, groups):
    return groups.channel_norms(dict(model.named_parameters()))


def _skew_one_group(model, groups, factor=0.01):
    """Make every unit of the widest group tiny, so a global threshold empties it."""
    params = dict(model.named_parameters())
    big = max(groups, key=lambda g: len(g.members))
    with torch.no_grad():
        for member in big.norm_members:
            params[member.param].mul_(factor)
    return big


def test_cubic_schedule_endpoints():
    assert cubic_schedule(0) == 0 and cubic_schedule(1) == 1 and cubic_schedule(2) == 1
    assert cubic_schedule(0.5) > 0.5  # front-loaded


def test_thresholds_zero_exactly_the_units_the_budget_counts():
    model, groups, budget = _budget([Target("macs", 4.0, 4.0)])
    norms = _norms(model, groups)
    thresholds = budget.thresholds(20, norms)
    for n, t, s, z in zip(norms, thresholds, budget.scale.tolist(), budget.zero, strict=True):
        assert torch.equal(n.double() / s <= t, z)  # the prox zeroes score <= threshold
    assert lands_within_one_unit(groups, budget.reached["macs"], budget.scheduled(20)["macs"])


@pytest.mark.parametrize("round_to", [4, 8])
def test_round_to_keeps_multiples_from_the_first_step_and_still_meets_the_target(round_to):
    """The budget lowers each group's threshold so that the kept units are a multiple of
    ``round_to`` (or the whole group): the prox's zero set is that set, and the target holds."""
    model, groups, budget = _budget(
        [Target("macs", 2.0, 2.0)], schedule="immediate", round_to=round_to
    )
    norms = _norms(model, groups)
    thresholds = budget.thresholds(1, norms)
    rounded_some = False
    for g, n, t, z in zip(groups, norms, thresholds, budget.zero, strict=True):
        sc = n.double() / budget.scale[groups.groups.index(g)]
        assert torch.equal(sc <= t, z)  # the prox's zero set is the budget's
        kept = g.size - int(z.sum())
        assert kept % round_to == 0 or kept == g.size
        rounded_some |= 0 < kept < g.size
    assert rounded_some
    assert budget.reached["macs"] >= 2.0


def test_schedule_reaches_the_target_then_freezes_to_zero_thresholds():
    model, groups, budget = _budget([Target("macs", 4.0, 4.0)])
    norms = _norms(model, groups)
    budget.thresholds(10, norms)
    early = budget.reached["macs"]
    assert 1.0 < early < 4.0
    budget.thresholds(50, norms)
    assert budget.frozen and lands_within_one_unit(groups, budget.reached["macs"], 4.0)
    frozen = [z.clone() for z in budget.zero]
    later = budget.thresholds(80, norms)
    assert later == [0.0] * len(groups)  # nothing more is zeroed or shrunk
    assert all(torch.equal(a, b) for a, b in zip(frozen, budget.zero, strict=True))


def test_balance_keeps_a_share_of_every_group():
    for balance in (0.0, 0.75):
        model, groups, budget = _budget([Target("macs", 4.0, 4.0)], balance=balance)
        skewed = _skew_one_group(model, groups)
        budget.thresholds(50, _norms(model, groups))
        assert lands_within_one_unit(groups, budget.reached["macs"], 4.0)
        kept = {g.root: int((~z).sum()) for g, z in zip(groups, budget.zero, strict=True)}
        if balance == 0.0:  # the skewed group falls below the threshold to its floor
            assert kept[skewed.root] <= math.ceil(0.05 * skewed.size)
        else:
            assert budget.keep_fraction == pytest.approx(0.75 / 2)
            for g in groups:
                assert kept[g.root] >= math.ceil(0.75 / 2 * g.size), g.root


def test_balance_auto_is_the_uniform_floor_under_a_target_and_looser_under_the_seeker():
    assert resolve_balance("auto", seeking=False) == 1.0
    assert resolve_balance("auto", seeking=True) == 0.75
    assert resolve_balance(0.5, seeking=False) == resolve_balance(0.5, seeking=True) == 0.5


def test_balance_is_lowered_when_it_would_make_the_target_unreachable():
    model, groups, budget = _budget([Target("macs", 8.0, 8.0)], balance=1.0)
    assert 0.05 <= budget.keep_fraction < 1 / math.sqrt(8)
    budget.thresholds(50, _norms(model, groups))
    assert lands_within_one_unit(groups, budget.reached["macs"], 8.0)


def test_every_target_is_met_and_the_binding_one_decides():
    model, groups, both = _budget([Target("macs", 2.0, 2.0), Target("params", 3.0, 3.0)])
    _, _, macs_only = _budget([Target("macs", 2.0, 2.0)])
    norms = _norms(model, groups)
    both.thresholds(60, norms)
    macs_only.thresholds(60, norms)
    assert both.reached["macs"] >= 2.0 and both.reached["params"] >= 3.0
    assert both.reached["params"] <= 3.0 * 1.05
    assert macs_only.reached["macs"] < both.reached["macs"]  # the params target removed more


def test_a_size_target_is_costed_in_params():
    model, groups, budget = _budget([Target("size", 2.5, 1000.0)])
    budget.thresholds(60, _norms(model, groups))
    assert budget.reached["params"] >= 2.5


def test_unreachable_targets_are_listed_and_the_floor_is_kept():
    model, groups, budget = _budget([Target("macs", 2.0, 2.0), Target("params", 1e6, 1e6)])
    assert [t.kind for t in budget.unreachable] == ["params"]
    budget.thresholds(60, _norms(model, groups))
    for g, z in zip(groups, budget.zero, strict=True):
        assert int((~z).sum()) >= 1, f"group {g.root} emptied"


def _seeking():
    return _budget([Target("macs", 1.0, 1.0)], steps=100, schedule="immediate")


def test_accuracy_seeker_keeps_raising_then_rolls_back_model_and_zero_set():
    model, groups, budget = _seeking()
    budget.reach_step = 60
    accuracies = iter([90.0, 89.5, 80.0])  # baseline 90, budget 1: ok, ok, over budget
    snapshots, restored = [], []

    def snapshot():
        snapshots.append(len(snapshots))
        return snapshots[-1]

    seek = AccuracySeeker(
        budget, stages=3, evaluate=lambda: Reading(next(accuracies)), baseline_accuracy=90.0,
        max_drop=1.0, snapshot=snapshot, restore=restored.append, patience=0,
    )  # fmt: skip
    norms = _norms(model, groups)
    reached = []
    for step in range(1, 61):
        seek.check(step)
        if budget.frozen:
            break
        budget.thresholds(step, norms)
        reached.append(budget.reached["macs"])
    assert [row["within"] for row in seek.log] == [True, True, False]
    assert restored == [2] and snapshots == [0, 1, 2]  # the second good stage's state
    assert budget.frozen and 1.0 < budget.reached["macs"] < max(reached)
    assert all(torch.equal(a, b) for a, b in zip(budget.zero, seek.last_good, strict=True))


def test_accuracy_seeker_channel_rollback_names_only_the_units_zeroed_since_the_good_check():
    """``rollback="channels"``: an over-budget check puts back the saved slices of the units
    the failed stage zeroed, not those the last good stage already had."""
    model, groups, budget = _seeking()
    budget.reach_step = 60
    accuracies = iter([90.0, 80.0, 89.5])  # baseline 90, budget 1: ok, over, ok (bisected)
    restored = []
    seek = AccuracySeeker(
        budget, stages=3, evaluate=lambda: Reading(next(accuracies)), baseline_accuracy=90.0,
        max_drop=1.0, snapshot=lambda: "saved", patience=0, rollback="channels",
        restore=lambda saved, units: restored.append((saved, [u.clone() for u in units])),
    )  # fmt: skip
    norms = _norms(model, groups)
    zero_at_fail = good = None
    for step in range(1, 61):
        if len(seek.log) == 1:  # between the good check and the failing one
            zero_at_fail = [z.clone() for z in budget.zero]
            good = [g.clone() for g in seek.last_good]
        seek.check(step)
        if budget.frozen:
            break
        budget.thresholds(step, norms)
    assert [row["within"] for row in seek.log] == [True, False, True]
    ((saved, units),) = restored
    assert saved == "saved"
    expect = [z & ~g for z, g in zip(zero_at_fail, good, strict=True)]
    assert any(bool(u.any()) for u in units) and any(bool(g.any()) for g in good)
    assert all(torch.equal(u, e) for u, e in zip(units, expect, strict=True))


def test_accuracy_seeker_refuses_an_unknown_rollback():
    _, _, budget = _seeking()
    with pytest.raises(ValueError, match="rollback"):
        AccuracySeeker(
            budget, stages=3, evaluate=lambda: Reading(90.0), baseline_accuracy=90.0,
            max_drop=1.0, rollback="weights",
        )  # fmt: skip


def test_accuracy_seeker_bisects_after_a_stage_over_budget():
    model, groups, budget = _seeking()
    budget.reach_step = 60
    accuracies = iter([90.0, 80.0, 89.5, 80.0, 80.0])  # baseline 90, budget 1
    asked = []
    seek = AccuracySeeker(
        budget,
        stages=6,
        evaluate=lambda: Reading(next(accuracies)),
        baseline_accuracy=90.0,
        max_drop=1.0,
        patience=0,
    )
    norms = _norms(model, groups)
    for step in range(1, 61):
        seek.check(step)
        if budget.frozen:
            break
        asked.append(seek.factor)
        budget.thresholds(step, norms)
    # 1.3 ok; 1.69 over -> half the step from 1.3; that ok -> the same step again;
    # over -> a quarter of it; over with a step below 1.05 -> freeze the last good set
    g = math.sqrt(1.3)
    steps = sorted(set(asked), key=asked.index)
    assert steps == pytest.approx([1.3, 1.3**2, 1.3 * g, 1.3 * g * g, 1.3 * g * math.sqrt(g)])
    assert [row["within"] for row in seek.log] == [True, False, True, False, False]
    assert budget.frozen and seek.good_factor == pytest.approx(1.3 * g)


def test_accuracy_seeker_gives_a_stage_over_budget_time_to_adapt():
    model, groups, budget = _seeking()
    budget.reach_step = 60
    accuracies = iter([90.0, 85.0, 89.5, 80.0, 80.0, 80.0])  # baseline 90, budget 1
    asked = []
    seek = AccuracySeeker(
        budget, stages=6, evaluate=lambda: Reading(next(accuracies)), baseline_accuracy=90.0, max_drop=1.0
    )
    norms = _norms(model, groups)
    for step in range(1, 61):
        seek.check(step)
        if budget.frozen:
            break
        asked.append(seek.factor)
        budget.thresholds(step, norms)
    # 1.3 ok; 1.69 over, kept one more stage; then within: 1.69 is good and 2.197 is asked;
    # over twice -> roll back and bisect
    steps = sorted(set(asked), key=asked.index)
    assert steps[:3] == pytest.approx([1.3, 1.3**2, 1.3**3])
    assert [row["within"] for row in seek.log][:4] == [True, False, True, False]
    assert seek.good_factor == pytest.approx(1.3**2)


def test_accuracy_seeker_keeps_its_margin_of_standard_errors_below_the_allowance():
    model, groups, budget = _seeking()
    budget.reach_step = 60
    # baseline 90, allowance 1, margin 1: drop 0.5 +- 0.3 is within, 0.8 +- 0.3 is not
    # (it would be without the margin), 0.8 +- 0.1 is
    readings = iter([Reading(89.5, 0.3), Reading(89.2, 0.3), Reading(89.2, 0.1)])
    seek = AccuracySeeker(
        budget, stages=6, evaluate=lambda: next(readings), baseline_accuracy=90.0,
        max_drop=1.0, patience=0, margin=1.0,
    )  # fmt: skip
    norms = _norms(model, groups)
    for step in range(1, 61):
        if len(seek.log) == 3:
            break
        seek.check(step)
        budget.thresholds(step, norms)
    assert [row["within"] for row in seek.log] == [True, False, True]
    assert [row["stderr"] for row in seek.log] == [0.3, 0.3, 0.1]


def test_accuracy_seeker_starts_after_start_step_and_resumes_before_it():
    model, groups, budget = _seeking()
    budget.reach_step = 60
    evaluated, snapshots = [], []
    seek = AccuracySeeker(
        budget, stages=3, evaluate=lambda: evaluated.append(step) or Reading(90.0), baseline_accuracy=90.0,
        max_drop=1.0, snapshot=lambda: snapshots.append(step), start_step=30,
    )  # fmt: skip
    assert seek.every == 9 and not seek.started and snapshots == [] and seek.factor == 1.0
    norms = _norms(model, groups)
    for step in range(1, 61):
        if step == 20:  # a resume before the start stays before it
            again = AccuracySeeker(
                budget, stages=3, evaluate=lambda: Reading(0.0), baseline_accuracy=90.0, max_drop=1.0,
                start_step=30,
            )  # fmt: skip
            again.load_state_dict(seek.state_dict())
            assert not again.started and budget.wants["macs"] == 1.0
        seek.check(step)
        if budget.frozen:
            break
        budget.thresholds(step, norms)
    # begins the step after the start by checking the model of then (within: the fallback),
    # checks a stage later
    assert snapshots[0] == 31 and evaluated == [31, 40, 49, 58]
    assert [row["step"] for row in seek.log] == [31, 40, 49, 58] and budget.frozen


def test_accuracy_seeker_begun_over_the_allowance_waits_for_room_without_rolling_back():
    """After the activation switch the model may already be over the allowance (the
    quantisation's own cost): the seeker asks for no pruning and puts nothing back (the
    recovery trained since the switch stays) until a check is within, then raises."""
    model, groups, budget = _seeking()
    budget.reach_step = 60
    readings = iter([88.0, 88.5, 89.2, 89.1, 89.0, 89.0])  # baseline 90, allowance 1
    snapshots, restored, asked = [], [], []
    seek = AccuracySeeker(
        budget, stages=3, evaluate=lambda: Reading(next(readings)), baseline_accuracy=90.0,
        max_drop=1.0, snapshot=lambda: snapshots.append(step) or step, restore=restored.append,
        start_step=30, patience=0,
    )  # fmt: skip
    norms = _norms(model, groups)
    for step in range(1, 61):
        seek.check(step)
        if step == 35:  # resumed while waiting: still waiting, still nothing asked
            again = AccuracySeeker(
                budget, stages=3, evaluate=seek.evaluate, baseline_accuracy=90.0, max_drop=1.0,
                snapshot=seek.snapshot, restore=restored.append, start_step=30, patience=0,
            )  # fmt: skip
            again.load_state_dict(seek.state_dict())
            assert again.waiting and budget.wants["macs"] == 1.0
            seek = again
        if budget.frozen:
            break
        asked.append(budget.wants["macs"])
        budget.thresholds(step, norms)
    # 31: 88.0 over (waits), 40: 88.5 over (waits), 49: 89.2 within -> snapshot, ask 1.3
    assert [row["step"] for row in seek.log] == [31, 40, 49, 58]
    assert [row["within"] for row in seek.log] == [False, False, True, True]
    assert snapshots == [49, 58] and restored == []
    assert asked[:48] == [1.0] * 48 and asked[48] == pytest.approx(1.3)  # step 49
    assert budget.frozen and budget.reached["macs"] > 1.0


def test_accuracy_seeker_never_within_freezes_with_nothing_pruned_and_nothing_put_back():
    model, groups, budget = _seeking()
    budget.reach_step = 60
    restored = []
    seek = AccuracySeeker(
        budget, stages=3, evaluate=lambda: Reading(88.0), baseline_accuracy=90.0, max_drop=1.0,
        snapshot=lambda: "saved", restore=restored.append, start_step=30,
    )  # fmt: skip
    norms = _norms(model, groups)
    for step in range(1, 61):
        seek.check(step)
        if budget.frozen:
            break
        budget.thresholds(step, norms)
        if step == 30:
            before = [z.clone() for z in budget.zero]
    assert budget.frozen and restored == [] and seek.saved is None
    assert [row["within"] for row in seek.log] == [False] * 4
    assert budget.wants["macs"] == 1.0  # the seeker asked for nothing: nothing zeroed
    assert all(torch.equal(z, b) for z, b in zip(budget.zero, before, strict=True))
    assert not any(bool(z.any()) for z in budget.zero) and budget.reached["macs"] == 1.0


def test_build_starts_the_seeker_once_the_activation_switch_ends():
    """With binarized activations no accuracy check comes while the switch still moves t:
    every check sees t = 1 (the switch has run its step, BatchNorm recalibrated)."""
    from compressor import method
    from compressor.config import Recipe
    from compressor.recipe import load_recipe

    class Switch:  # as compressor.activations.ActivationSwitch counts its steps
        def __init__(self, ramp):
            self.step, self.ramp = 0, ramp

        def __call__(self):
            self.step = min(self.step + 1, self.ramp)

    total = 40
    for name, start in [("tl1-group-binary", 20), ("tl1-group", 0)]:
        model = trained_like_resnet20()
        groups = build_groups(model, torch.randn(1, 1, 16, 16))
        recipe = Recipe.from_dict(load_recipe(name))
        switch = Switch(round(recipe.activations.switch_fraction * total))
        seen = []
        hooks = method.SeekHooks(
            evaluate=lambda switch=switch, seen=seen: seen.append(switch.step) or Reading(100.0),
            baseline_accuracy=100.0, snapshot=dict, restore=lambda state: None,
        )  # fmt: skip
        sparse = method.build(recipe, model, groups, total_steps=total, baseline={}, seek=hooks)
        if start:
            sparse.activation_switch = switch
        seeker = sparse.seeker
        assert seeker.start_step == start
        assert seeker.budget.reach_step == round(start + 0.6 * (total - start))
        for _ in range(total):
            sparse.after_step()
        assert seen and len(seen) == len(seeker.log)
        if start:
            assert all(s == switch.ramp for s in seen) and switch.ramp == start
            assert min(row["step"] for row in seeker.log) > start


def test_auto_round_to_is_onnxruntimes_channel_block():
    """``auto`` reads onnxruntime's blocked-convolution layout: 16 channels with AVX-512, 8
    with AVX2 (MLAS's NCHWc block), 1 where the optimiser does not block convolutions."""
    from pathlib import Path

    from compressor.runtime import probed_channel_block, resolve_round_to

    block = probed_channel_block()
    assert resolve_round_to(4) == 4
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = set(cpuinfo.read_text().split())
        if "avx512f" in flags:
            assert block == 16
        elif "avx2" in flags:
            assert block == 8


def test_the_deployment_cpus_block_can_be_named(monkeypatch):
    """``COMPRESSOR_CHANNEL_BLOCK`` names the block of the CPU the model will run on; a bad
    value is exit 2 naming the variable and the fix."""
    from compressor.errors import BadInputError
    from compressor.runtime import BLOCK_ENV, channel_block, probed_channel_block, resolve_round_to

    monkeypatch.setenv(BLOCK_ENV, "16")
    assert channel_block() == 16 and resolve_round_to("auto") == 16
    assert resolve_round_to(1, latency_target=True) == 16  # a latency target: at least the block
    monkeypatch.delenv(BLOCK_ENV)
    assert channel_block() == probed_channel_block()
    monkeypatch.setenv(BLOCK_ENV, "avx")
    with pytest.raises(BadInputError, match=BLOCK_ENV) as info:
        channel_block()
    assert info.value.exit_code == 2


class _GroupedAndHeads(torch.nn.Module):
    """A 1x1 conv feeding a grouped 3x3 conv (8 groups of 4 channels: units of several
    channels, one in each conv group), then 6 attention heads of 8 over the pixels."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 32, 1)
        self.grouped = torch.nn.Conv2d(32, 32, 3, padding=1, groups=8)
        self.mix = torch.nn.Conv2d(32, 48, 1)
        self.attn = torch.nn.MultiheadAttention(48, 6, batch_first=True)
        self.fc = torch.nn.Linear(48, 10)

    def forward(self, x):
        x = self.mix(torch.relu(self.grouped(torch.relu(self.stem(x)))))
        x = x.flatten(2).transpose(1, 2)
        return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_round_to_counts_channels_and_leaves_heads_unrounded():
    """With a block of 16 the kept channels of every conv group's root are a multiple of 16
    (units of 8 channels: 2 units), and attention heads, which no channel block concerns,
    still go one by one: a group of 6 heads would otherwise never lose one."""
    torch.manual_seed(0)
    model = _GroupedAndHeads()
    groups = build_groups(model, torch.randn(1, 3, 8, 8))
    blocks = groups.unit_blocks(16)
    width = {g.root: (len(g.root_unit) // g.size if g.root_unit is not None else 1) for g in groups}
    found = {g.root: (width[g.root], b) for g, b in zip(groups, blocks, strict=True)}
    assert found["stem"] == (8, 2)  # units of 8 channels (one per conv group): 2 make 16
    assert found["attn.in_proj_weight"] == (1, 1)  # heads
    weights = group_weights(groups, "uniform")
    scale = weights * reference_norms(groups, dict(model.named_parameters()))
    budget = BudgetController(
        [Target("macs", 2.0, 2.0)], groups, scale, total_steps=10, reach_fraction=0.5,
        schedule="immediate", round_to=16,
    )  # fmt: skip
    norms = [torch.rand(g.size, dtype=torch.float64) + 0.5 for g in groups]
    budget.thresholds(1, norms)
    heads_lost = 0
    for g, zero in zip(groups, budget.zero, strict=True):
        kept_units = g.size - int(zero.sum())
        if g.attention is not None:
            heads_lost += int(zero.sum())
        else:
            kept_channels = kept_units * width[g.root]
            assert kept_channels % 16 == 0 or kept_units == g.size, g.root
    assert heads_lost > 0 and budget.reached["macs"] >= 2.0
