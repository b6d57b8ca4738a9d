"""Smoke test of the trade-off benchmark: its --smoke mode runs end to end and writes sane results."""

import json

import pytest
import torch

from compressor.groups import build_groups
from compressor.models import resnet20
from tests.helpers import fashion_mnist_dir

pytestmark = pytest.mark.slow

DATA = fashion_mnist_dir()


@pytest.mark.skipif(not DATA.exists(), reason="needs the Fashion-MNIST idx files")
def test_tradeoff_smoke(tmp_path):
    from benchmarks import tradeoff

    results = tmp_path / "tradeoff_smoke.json"
    argv = [
        "--smoke",
        "--methods",
        "tl1-group,tp-magnitude,tl1-group-eq",
        "--threads",
        "1",
        "--results",
        str(results),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert tradeoff.main(argv) == 0
    data = json.loads(results.read_text())
    assert data["benchmark"] == "tradeoff" and data["command"].endswith(str(tmp_path / "cache"))
    assert data["machine"]["cpu_model"] and data["baseline"]["macs"] > 0
    runs = {r["key"]: r for r in data["runs"]}
    assert set(runs) == {"tl1-group@2x/s0", "tp-magnitude@2x/s0", "tl1-group-eq@2x/s0"}
    # the equal-MACs run asks for the reduction Torch-Pruning reached, and lands on it
    equal, tp = runs["tl1-group-eq@2x/s0"], runs["tp-magnitude@2x/s0"]
    assert equal["asked_macs_x"] == tp["macs_x"]
    assert abs(equal["macs_x"] / tp["macs_x"] - 1) <= 0.05
    for r in runs.values():
        assert 0 <= r["accuracy"] <= 100
        assert r["macs_x"] >= 1.9 and r["params_x"] > 1
        assert 0 < r["channels_kept"] < r["channels_total"]
        assert r["onnx_bytes"] > 0 and r["wall_s"] > 0

    # rerun: every run is already recorded, nothing is trained again
    assert tradeoff.main(argv) == 0
    assert json.loads(results.read_text())["runs"] == data["runs"]

    # the table goes between the main markers of section 1, other sections are kept
    # (without --block, a JSON other than the committed one renders into a block of its own)
    md = tmp_path / "RESULTS.md"
    md.write_text(
        "# Results\n\n## 1. Accuracy–compression trade-off\n\nold\n\n## 2. Other\n\nkeep me\n"
    )
    plot = tmp_path / "tradeoff.png"
    assert (
        tradeoff.main(
            [
                "--render-only",
                "--results",
                str(results),
                "--results-md",
                str(md),
                "--plot",
                str(plot),
                "--block",
                "tradeoff",
            ]
        )
        == 0
    )
    text = md.read_text()
    assert "old" not in text and "keep me" in text and "| tl1-group | 2x |" in text
    assert text.count(tradeoff.BEGIN_MARK) == 1 and plot.stat().st_size > 0


@pytest.mark.skipif(not DATA.exists(), reason="needs the Fashion-MNIST idx files")
def test_ablation_targets_smoke(tmp_path):
    from benchmarks import ablation_targets

    md = tmp_path / "RESULTS.md"
    md.write_text("x\n<!-- BEGIN generated: ablation -->\nold\n<!-- END generated: ablation -->\n")
    results = tmp_path / "ablation.json"
    argv = ["--targets", "2", "--subset", "256", "--epochs", "1", "--threads", "1",
            "--data", str(DATA), "--cache-dir", str(tmp_path / "cache"),
            "--results", str(results), "--results-md", str(md)]  # fmt: skip
    assert ablation_targets.main(argv) == 0
    runs = json.loads(results.read_text())["runs"]
    expected = [*ablation_targets.REFERENCES, *ablation_targets.VARIANTS]
    assert sorted(r["variant"] for r in runs) == sorted(expected)
    reference = next(r for r in runs if r["variant"] == "tp-magnitude")
    assert reference["macs_x"] >= 2
    # every variant reaches Torch-Pruning's reduction; a threshold removes whole channels in
    # norm order, so it passes it by at most one channel's share of the MACs
    model = resnet20(in_channels=1)
    groups = build_groups(model, torch.randn(1, 1, 28, 28))
    one_unit = max(groups.macs_per_channel()) / groups.total_macs
    for r in runs:
        assert r["macs_x"] >= reference["macs_x"] * 0.999, r
        assert 1 / r["macs_x"] >= 1 / reference["macs_x"] - one_unit - 1e-9, r
    text = md.read_text()
    assert "group l0 (hard threshold)" in text and "tp-magnitude-kd" in text
    assert "\nold\n" not in text  # the placeholder block was replaced
