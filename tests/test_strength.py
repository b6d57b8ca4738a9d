import math

import pytest
import torch

from compressor import penalties
from compressor.groups import build_groups
from compressor.models import resnet20
from compressor.strength import (
    CostTargets,
    Strength,
    Target,
    TargetController,
    cubic_schedule,
    group_weights,
    mu_for_threshold,
    resolve_group_weighting,
)

PENALTY = {
    "individual": {"kind": "none", "strength": 0.0, "lambda": None, "a": 1.0, "alpha": 1.0},
    "group": {"strength": 0.0, "lambda": None, "weighting": "macs"},
}


@pytest.mark.parametrize(
    "kind,a", [("l1", 1.0), ("l0", 1.0), ("tl1", 1.0), ("tl1", 0.05), ("l1-l2", 1.0)]
)
def test_mu_for_threshold_inverts_each_prox_threshold(kind, a):
    t = 0.3
    mu = mu_for_threshold(kind, t, a)
    # l1-l2 is a whole-tensor penalty: the threshold applies once some entry is large
    below = torch.tensor([t * 0.999, 5.0], dtype=torch.float64)
    above = torch.tensor([t * 1.01, 5.0], dtype=torch.float64)
    assert float(penalties.individual_prox(kind, below, mu, a=a)[0]) == 0
    assert float(penalties.individual_prox(kind, above, mu, a=a)[0]) > 0


def test_group_weights_are_normalised_to_mean_one():
    groups = build_groups(resnet20(in_channels=1), torch.randn(1, 1, 16, 16))
    sizes = torch.tensor([g.size for g in groups], dtype=torch.float64)
    for weighting in ("size", "macs", "uniform"):
        w = group_weights(groups, weighting)
        assert math.isclose(float((w * sizes).sum() / sizes.sum()), 1.0, rel_tol=1e-9)


def test_auto_weighting_is_macs_only_when_the_run_aims_at_macs():
    assert resolve_group_weighting("auto", "macs") == "macs"
    for kind in ("params", "size", None):
        assert resolve_group_weighting("auto", kind) == "uniform"
    for explicit in ("uniform", "size", "macs"):  # an explicit choice is kept
        assert resolve_group_weighting(explicit, "macs") == explicit
        assert resolve_group_weighting(explicit, None) == explicit


def test_cubic_schedule_endpoints():
    assert cubic_schedule(0) == 0 and cubic_schedule(1) == 1 and cubic_schedule(2) == 1
    assert cubic_schedule(0.5) > 0.5  # front-loaded


def _controller(factor, total_steps=100, balance=0.0):
    model = resnet20(in_channels=1)
    groups = build_groups(model, torch.randn(1, 1, 16, 16))
    strength = Strength.from_recipe(PENALTY, model, groups, [])
    ctl = TargetController(
        "macs",
        factor,
        groups,
        strength,
        total_steps=total_steps,
        reach_fraction=0.5,
        balance=balance,
    )
    return model, groups, strength, ctl


def _skew_one_group(model, groups, factor=0.01):
    """Make every unit of the first residual-stream-like group tiny, so a global ranking empties it."""
    params = dict(model.named_parameters())
    big = max(groups, key=lambda g: len(g.members))
    with torch.no_grad():
        for member in big.norm_members:
            params[member.param].mul_(factor)
    return big


def test_balance_keeps_a_share_of_every_group():
    for balance in (0.0, 0.75):
        model, groups, strength, ctl = _controller(4.0, balance=balance)
        skewed = _skew_one_group(model, groups)
        ctl.update(50, dict(model.named_parameters()))
        assert 4.0 * 0.95 <= ctl.reached_factor <= 4.0 * 1.05
        kept = {g.root: int((~z).sum()) for g, z in zip(groups, strength.forced_zero, strict=True)}
        if balance == 0.0:  # the skewed group is ranked lowest and emptied to its floor
            assert kept[skewed.root] <= math.ceil(0.05 * skewed.size)
        else:
            assert ctl.keep_fraction == pytest.approx(0.75 / 2)
            for g in groups:
                assert kept[g.root] >= math.ceil(0.75 / 2 * g.size), g.root


def test_balance_is_lowered_when_it_would_make_the_target_unreachable():
    # Keeping 1/sqrt(8) of every group cannot reach 8x (the stem input and the
    # classifier stay), so the floor is lowered until it can.
    model, groups, strength, ctl = _controller(8.0, balance=1.0)
    assert 0.05 <= ctl.keep_fraction < 1 / math.sqrt(8)
    ctl.update(50, dict(model.named_parameters()))
    assert 8.0 * 0.95 <= ctl.reached_factor <= 8.0 * 1.05


def test_asking_a_new_factor_rebalances_the_floor():
    # The accuracy seeker raises the factor in stages: each stage's floor is
    # balance / sqrt(that stage's factor), not the first stage's.
    model, groups, strength, ctl = _controller(1.0 + 1e-9, balance=0.75)
    assert ctl.keep_fraction == pytest.approx(0.75)
    ctl.ask(4.0)
    assert ctl.factor == 4.0 and ctl.keep_fraction == pytest.approx(0.75 / 2)
    skewed = _skew_one_group(model, groups)
    ctl.update(50, dict(model.named_parameters()))
    assert 4.0 * 0.95 <= ctl.reached_factor <= 4.0 * 1.05
    kept = int((~strength.forced_zero[list(groups).index(skewed)]).sum())
    assert kept >= math.ceil(0.75 / 2 * skewed.size)


def test_kept_units_are_not_shrunk_unless_asked():
    model, groups, strength, ctl = _controller(4.0)
    strength.group_strength = 1.0
    ctl.update(10, dict(model.named_parameters()))  # ramping: not frozen yet
    for shrink in (True, False):
        strength.shrink_kept = shrink
        for mu, z in zip(strength.group_mu(beta=1.0), strength.forced_zero, strict=True):
            assert torch.isinf(mu[z]).all()
            assert (mu[~z] > 0).all() if shrink else (mu[~z] == 0).all()


def test_controller_follows_schedule_reaches_and_holds_target():
    model, groups, strength, ctl = _controller(4.0)
    tensors = dict(model.named_parameters())
    ctl.update(10, tensors)
    early = ctl.reached_factor
    assert 1.0 < early < 4.0
    assert abs(early - ctl.scheduled_factor(10)) / ctl.scheduled_factor(10) < 0.1
    ctl.update(50, tensors)
    assert ctl.frozen and strength.frozen
    assert 4.0 * 0.95 <= ctl.reached_factor <= 4.0 * 1.05
    masks = [m.clone() for m in strength.forced_zero]
    est_macs, _ = groups.estimate_cost(masks)
    assert abs(groups.total_macs / est_macs - ctl.reached_factor) < 1e-9
    # held: later updates change nothing, survivors are no longer shrunk
    ctl.update(80, tensors)
    assert all(torch.equal(a, b) for a, b in zip(masks, strength.forced_zero, strict=True))
    mus = strength.group_mu(beta=1.0)
    for mu, z in zip(mus, masks, strict=True):
        assert torch.isinf(mu[z]).all() and (mu[~z] == 0).all()


def test_unreachable_target_is_reported_not_collapsed():
    model, groups, strength, ctl = _controller(1e6)
    assert not ctl.reachable
    ctl.update(50, dict(model.named_parameters()))
    assert ctl.reached_factor < 1e6
    for g, z in zip(groups, strength.forced_zero, strict=True):
        assert int((~z).sum()) >= 1, f"group {g.root} emptied"


def test_cost_targets_say_how_far_a_zero_set_is_from_each_target():
    model = resnet20(in_channels=1)
    groups = build_groups(model, torch.randn(1, 1, 16, 16))
    costs = CostTargets(groups, [Target("macs", 2.0), Target("size", 3.0, "params")])
    none = [torch.zeros(g.size, dtype=torch.bool) for g in groups]
    assert costs.reached(none) == {"macs": 1.0, "size": 1.0}
    assert costs.gaps(none) == {"macs": 2.0, "size": 3.0}
    assert costs.attainment(none) == pytest.approx(1 / 3)  # the least-met target sets it
    half = [torch.arange(g.size) < g.size // 2 for g in groups]
    macs, params = groups.estimate_cost(half)
    reached = costs.reached(half)
    assert reached["macs"] == pytest.approx(groups.total_macs / macs)
    assert reached["size"] == pytest.approx(groups.total_params / params)  # size counts params
    assert costs.attainment(half, {"macs": 1.0, "size": 1.0}) == pytest.approx(
        min(reached.values())
    )
    with pytest.raises(ValueError, match="once"):
        CostTargets(groups, [Target("macs", 2.0), Target("macs", 3.0)])
    with pytest.raises(ValueError, match="counted in"):
        Target("size", 2.0)  # a size target must say what it is counted in


def test_controller_grows_the_zero_set_until_every_target_is_met():
    """Issue 18.4: with MACs and params targets the binding one (params here) is met too."""
    model = resnet20(in_channels=1)
    groups = build_groups(model, torch.randn(1, 1, 16, 16))
    strength = Strength.from_recipe(PENALTY, model, groups, [])
    ctl = TargetController(
        [Target("macs", 2.0), Target("params", 3.0)], None, groups, strength,
        total_steps=100, reach_fraction=0.5, balance=0.75,
    )  # fmt: skip
    assert ctl.kind == "macs" and ctl.factor == 2.0 and ctl.reachable
    tensors = dict(model.named_parameters())
    for step in range(1, 61):
        ctl.update(step, tensors)
    assert ctl.frozen
    macs, params = groups.estimate_cost(strength.forced_zero)
    assert groups.total_params / params >= 3.0
    assert groups.total_macs / macs >= 2.0
    assert ctl.reached == pytest.approx(
        {"macs": groups.total_macs / macs, "params": groups.total_params / params}
    )
    # the binding target (params) is met without overshooting it by more than the tolerance
    assert ctl.reached["params"] <= 3.0 * 1.05
    alone = Strength.from_recipe(PENALTY, model, groups, [])
    macs_only = TargetController(
        "macs", 2.0, groups, alone, total_steps=100, reach_fraction=0.5, balance=0.75
    )
    for step in range(1, 61):
        macs_only.update(step, tensors)
    assert macs_only.reached["macs"] < ctl.reached["macs"]  # the params target removed more


def test_unreachable_lists_each_target_beyond_reach_with_its_maximum():
    model = resnet20(in_channels=1)
    groups = build_groups(model, torch.randn(1, 1, 16, 16))
    strength = Strength.from_recipe(PENALTY, model, groups, [])
    ctl = TargetController(
        [Target("macs", 2.0), Target("params", 1e6)], None, groups, strength, total_steps=10
    )
    assert not ctl.reachable
    assert list(ctl.unreachable) == ["params"]
    assert ctl.unreachable["params"] == ctl.max_reachable["params"] < 1e6
    assert ctl.max_reachable["macs"] == ctl.floor_factor


def _seeking_controller():
    """A ResNet-20 controller as the accuracy seeker drives it: no target, factor set per stage."""
    model = resnet20(in_channels=1)
    groups = build_groups(model, torch.randn(1, 1, 16, 16))
    strength = Strength.from_recipe(PENALTY, model, groups, [])
    ctl = TargetController(
        "macs", 1.0 + 1e-9, groups, strength, total_steps=100, reach_fraction=0.6,
        schedule="immediate",
    )  # fmt: skip
    return model, strength, ctl


def test_accuracy_seeker_keeps_raising_then_rolls_back_model_and_zero_set():
    from compressor.pipeline import AccuracySeeker

    model, strength, ctl = _seeking_controller()
    accuracies = iter([90.0, 89.5, 80.0])  # baseline 90, budget 1: ok, ok, over budget
    snapshots, restored = [], []

    def snapshot():
        snapshots.append(len(snapshots))
        return snapshots[-1]

    seek = AccuracySeeker(
        ctl, stages=3, evaluate=lambda: next(accuracies), baseline_accuracy=90.0, max_drop=1.0,
        snapshot=snapshot, restore=restored.append,
    )  # fmt: skip
    tensors = dict(model.named_parameters())
    factors = []
    for step in range(1, 61):
        seek.check(step)
        if not ctl.frozen:
            ctl.update(step, tensors)
        factors.append(ctl.reached_factor)
        if ctl.frozen:
            break
    assert [row["within"] for row in seek.log] == [True, True, False]
    # the second good stage's zero set and model state are what the run keeps
    assert restored == [2] and snapshots == [0, 1, 2]
    assert ctl.frozen and 1.0 < ctl.reached_factor < max(factors)
    assert all(torch.equal(a, b) for a, b in zip(strength.forced_zero, seek.last_good, strict=True))


def test_accuracy_seeker_bisects_after_a_stage_over_budget():
    from compressor.pipeline import AccuracySeeker

    model, strength, ctl = _seeking_controller()
    accuracies = iter([90.0, 80.0, 89.5, 80.0, 80.0])  # baseline 90, budget 1
    asked = []
    seek = AccuracySeeker(
        ctl, stages=6, evaluate=lambda: next(accuracies), baseline_accuracy=90.0, max_drop=1.0,
    )  # fmt: skip
    tensors = dict(model.named_parameters())
    good = None
    for step in range(1, 61):
        seek.check(step)
        if ctl.frozen:
            break
        if step == 30:  # the zero set the check at step 30 found within budget
            good = [m.clone() for m in strength.forced_zero]
        asked.append(ctl.factor)
        ctl.update(step, tensors)
    # 1.3 ok; 1.69 over -> half the step from 1.3; that ok -> the same step again;
    # over -> a quarter of it; over with a step below 1.05 -> freeze the last good set
    g = math.sqrt(1.3)
    steps = sorted(set(asked), key=asked.index)
    assert steps == pytest.approx([1.3, 1.3**2, 1.3 * g, 1.3 * g * g, 1.3 * g * math.sqrt(g)])
    assert [row["within"] for row in seek.log] == [True, False, True, False, False]
    assert ctl.frozen and seek.good_factor == pytest.approx(1.3 * g)
    assert all(torch.equal(a, b) for a, b in zip(strength.forced_zero, good, strict=True))


@pytest.mark.parametrize("factor", [3.0, 4.0, 8.0, 12.0])
def test_controller_lands_close_to_the_target_not_one_big_channel_past_it(factor):
    from compressor.strength import OVERSHOOT_TOLERANCE

    model, groups, strength, ctl = _controller(factor)
    torch.manual_seed(0)
    with torch.no_grad():  # spread the BatchNorm scales so the ranking mixes stages
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.1, 1.0)
    ctl.update(50, dict(model.named_parameters()))
    assert ctl.frozen
    assert factor <= ctl.reached_factor <= factor * (1 + OVERSHOOT_TOLERANCE)


def test_channel_taylor_is_the_first_order_loss_change_of_removing_a_channel():
    torch.manual_seed(0)
    model = resnet20(in_channels=1).eval().double()
    x, y = torch.randn(8, 1, 16, 16, dtype=torch.float64), torch.randint(0, 10, (8,))
    groups = build_groups(model, x[:1])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    taylor = groups.channel_taylor(params, grads)
    # Scaling one unit's norm slices by (1 - eps) changes the loss by about -eps * taylor.
    g_index, unit, eps = 3, 1, 1e-4
    group = groups.groups[g_index]
    with torch.no_grad():
        before = float(loss)
        for m in group.norm_members:
            rows = m.index[m.channel == unit]
            params[m.param][rows] *= 1 - eps
        after = float(torch.nn.functional.cross_entropy(model(x), y))
    assert (after - before) == pytest.approx(-eps * float(taylor[g_index][unit]), rel=1e-2)
    assert float(taylor[g_index][unit]) != 0


def test_taylor_importance_waits_for_a_ranking_then_reaches_and_holds_the_target():
    model = resnet20(in_channels=1)
    groups = build_groups(model, torch.randn(1, 1, 16, 16))
    strength = Strength.from_recipe(PENALTY, model, groups, [])
    ctl = TargetController(
        "macs", 4.0, groups, strength, total_steps=100, reach_fraction=0.5, importance="taylor"
    )
    params = dict(model.named_parameters())
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    # One group gets loss gradients orders of magnitude larger: its units rank as the most important.
    loud = max(groups, key=lambda g: g.size)
    for step in range(1, 61):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for m in loud.norm_members:
                params[m.param].grad.mul_(1e4)
        ctl.observe_gradients(params, {n: p.grad for n, p in params.items()})
        ctl.update(step, params)
        if step < ctl.taylor_warmup:
            assert not any(bool(z.any()) for z in strength.forced_zero)
    assert ctl.frozen and 4.0 * 0.95 <= ctl.reached_factor <= 4.0 * 1.05
    assert not bool(strength.forced_zero[list(groups).index(loud)].any())
    with pytest.raises(ValueError, match="importance"):
        TargetController("macs", 2.0, groups, strength, total_steps=10, importance="fisher")
