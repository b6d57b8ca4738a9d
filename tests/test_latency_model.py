"""The latency model of --target-latency: monotone predictions, calibration on real timings,
and a budget that steers to it."""

from __future__ import annotations

import math

import pytest
import torch

from compressor import export
from compressor import latency_model as lm
from compressor.groups import build_groups
from compressor.method.budget import BudgetController, Target
from compressor.method.strength import group_weights, reference_norms
from compressor.models import resnet20
from tests.helpers import randomize_bn


def test_layer_timing_interpolates_and_reaches_zero():
    t = lm.LayerTiming((1.0, 0.5), (4.0, 1.0), out_elements=10)
    assert t.at(1.0) == 4.0 and t.at(0.5) == 1.0
    assert t.at(0.75) == pytest.approx(2.5)
    assert t.at(0.25) == pytest.approx(0.5)  # towards 0 ms at width 0
    assert t.at(0.0) == 0.0


def test_measured_points_are_made_monotone_and_interpolated():
    # a slower reading at a smaller layer sum (noise) must not make the model non-monotone
    points = lm._monotone_points([(10.0, 8.0), (6.0, 5.0), (4.0, 5.5), (2.0, 1.0)])
    ms = [m for _, m in points]
    assert points[0] == (0.0, 0.0)
    assert ms == sorted(ms)
    assert lm._interpolate(points, 10.0) == 8.0
    assert lm._interpolate(points, 2.0) == 1.0
    assert 1.0 < lm._interpolate(points, 3.0) <= 5.5


def _tiny():
    torch.manual_seed(0)
    model = resnet20(in_channels=1, width=8).eval()
    randomize_bn(model)
    shape = (1, 16, 16)
    return model, shape, build_groups(model, torch.randn(1, *shape))


def _synthetic(groups):
    """A latency model with made-up layer timings (MACs-like), no clock involved."""
    layers = {
        name: lm.LayerTiming(lm.WIDTHS, tuple(info.macs * p * p * 1e-5 for p in lm.WIDTHS), 100)
        for name, info in groups.layers.items()
    }
    base = sum(t.ms[0] for t in layers.values()) + 1.0
    model = lm.LatencyModel(groups, layers, base_ms=base, rest_ms=1.0)
    return model, base


def test_predictions_fall_as_units_are_removed():
    _, _, groups = _tiny()
    latency, base = _synthetic(groups)
    none = [torch.zeros(g.size, dtype=torch.bool) for g in groups]
    assert latency.predict(none) == pytest.approx(base)
    previous = base
    for share in (0.25, 0.5, 0.75):  # more removed, never slower
        zero = [torch.arange(g.size) < math.floor(share * g.size) for g in groups]
        now = latency.predict(zero)
        assert now < previous
        previous = now


def test_budget_meets_a_latency_target_through_the_group_threshold():
    model, _, groups = _tiny()
    latency, base = _synthetic(groups)
    scale = group_weights(groups, "uniform") * reference_norms(
        groups, dict(model.named_parameters())
    )
    budget = BudgetController(
        [Target("latency", 2.0, base / 2.0)], groups, scale, total_steps=10, reach_fraction=0.5,
        balance=0.0, latency=latency,
    )  # fmt: skip
    norms = groups.channel_norms(dict(model.named_parameters()))
    for step in range(6):
        thresholds = budget.thresholds(step, norms)
    assert budget.frozen
    assert latency.predict(budget.zero) <= base / 2.0
    # the zero set is the prox's: exactly the units at or under their group's threshold
    for n, s, t, z in zip(norms, budget.scale.tolist(), thresholds, budget.zero, strict=True):
        assert torch.equal(z, n.double() / s <= t) or t == 0.0
    assert budget.state_dict()["latency"]["base_ms"] == pytest.approx(base)


def test_calibration_times_real_compact_models(tmp_path):
    model, shape, groups = _tiny()
    baseline = tmp_path / "baseline.onnx"
    export.export_onnx(model, torch.randn(1, *shape), baseline)
    model.train()
    latency = lm.calibrate(model, groups, shape, baseline, batch=4, threads=1, repeats=5)
    assert model.training  # calibration leaves the caller's model as it was
    summary = latency.summary()
    assert summary["batch"] == 4 and summary["base_ms"] > 0
    assert set(summary["uniform_ms"]) == {f"{k:g}" for k in lm.CHECK_WIDTHS}
    none = [torch.zeros(g.size, dtype=torch.bool) for g in groups]
    assert latency.predict(none) == pytest.approx(summary["base_ms"])
    quarter = lm._uniform_zero(groups, 0.25, 1)
    assert latency.predict(quarter) <= summary["base_ms"]
    # the state restores the same predictions (a resumed run does not re-time)
    again = lm.LatencyModel.from_state(groups, latency.state_dict())
    assert again.predict(quarter) == pytest.approx(latency.predict(quarter))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline.onnx"]  # no temp files


def test_compact_copy_removes_units_and_leaves_the_model():
    model, shape, groups = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zero = lm._uniform_zero(groups, 0.5, 1)
    twin = lm._compact_copy(model, groups, zero, torch.randn(2, *shape))
    assert sum(p.numel() for p in twin.parameters()) < sum(p.numel() for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _budget_at_freeze(groups, model, latency, asked, probe=None):
    scale = group_weights(groups, "uniform") * reference_norms(
        groups, dict(model.named_parameters())
    )
    budget = BudgetController(
        [Target("latency", latency.base_ms / asked, asked)], groups, scale, total_steps=10,
        reach_fraction=0.5, balance=0.0, latency=latency, latency_probe=probe,
    )  # fmt: skip
    norms = groups.channel_norms(dict(model.named_parameters()))
    for step in range(6):
        budget.thresholds(step, norms)
    assert budget.frozen
    return budget


@pytest.mark.parametrize("speed", [1.3, 0.7])  # the real model slower / faster than predicted
def test_the_zero_set_is_timed_and_chosen_again_before_it_freezes(speed):
    """``latency_probe``: the compact model of the zero set about to freeze is timed; the
    reading goes into the latency model (on the calibration's scale: the probe's baseline
    ran at half speed here), and the zero set frozen meets the asked latency by the
    corrected model: more units removed when the real model is slower than predicted,
    fewer when it is faster."""
    model, _, groups = _tiny()
    truth, base = _synthetic(groups)
    asked = base / 2.0
    plain = _budget_at_freeze(groups, model, _synthetic(groups)[0], asked)
    timed = []

    def probe(zero):  # the machine runs at half speed now: both readings twice as long
        timed.append([z.clone() for z in zero])
        return 2.0 * speed * truth.predict(zero), 2.0 * base

    latency = _synthetic(groups)[0]
    budget = _budget_at_freeze(groups, model, latency, asked, probe)
    assert 1 <= len(timed) <= 2
    assert all(torch.equal(a, b) for a, b in zip(timed[0], plain.zero, strict=True))
    removed = sum(int(z.sum()) for z in budget.zero)
    if speed > 1:
        assert removed > sum(int(z.sum()) for z in plain.zero)
    else:
        assert removed < sum(int(z.sum()) for z in plain.zero)
    assert latency.predict(budget.zero) <= asked
    probed = latency.summary()["probed"]
    assert len(probed) == len(timed)
    assert probed[0]["measured_ms"] == pytest.approx(speed * truth.predict(timed[0]))
    assert probed[0]["predicted_ms"] == pytest.approx(truth.predict(timed[0]))
    # a resumed run keeps the readings (its budget state holds the latency model's)
    again = lm.LatencyModel.from_state(groups, budget.state_dict()["latency"])
    assert again.predict(budget.zero) == pytest.approx(latency.predict(budget.zero))


def test_time_zero_set_times_the_compact_model_beside_the_baseline(tmp_path, monkeypatch):
    model, shape, groups = _tiny()
    baseline = tmp_path / "baseline.onnx"
    export.export_onnx(model, torch.randn(1, *shape), baseline)
    import onnx

    sizes = {}
    measure = export.measure_latency

    def recording(paths, *args, **kwargs):
        for name, path in paths.items():
            graph = onnx.load(path).graph
            sizes[name] = sum(math.prod(t.dims) for t in graph.initializer)
        return measure(paths, *args, **kwargs)

    monkeypatch.setattr(export, "measure_latency", recording)
    half = lm._uniform_zero(groups, 0.5, 1)
    with torch.no_grad():  # as the budget calls it
        lm.time_zero_set(model, groups, half, shape, baseline, batch=4, threads=1, repeats=3)
    assert sizes["compact"] < 0.5 * sizes["baseline"]  # half the channels: about a quarter
    # what the run ships: kept counts rounded up to the runtime's block (zero channels kept)
    three = [torch.arange(g.size) < 3 for g in groups]
    lm.time_zero_set(model, groups, three, shape, baseline, batch=4, threads=1, repeats=3)
    assert sizes["compact"] < sizes["baseline"]
    lm.time_zero_set(model, groups, three, shape, baseline, batch=4, round_to=8, repeats=3)
    assert sizes["compact"] == sizes["baseline"]  # 5 of 8 kept: a block of 8 all the same
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline.onnx"]  # no temp files
