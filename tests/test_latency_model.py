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
