"""Every built-in recipe end to end on the bundled example (a trained ResNet-20 on real
Fashion-MNIST images): channels are removed, the pruned model equals the sparse one, and
accuracy stays within a stated bound of the input model's after a short run."""

from __future__ import annotations

from pathlib import Path

import pytest

import compressor
from compressor.recipe import list_recipes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion-mnist"
# Single channels (prune.round_to=1, not the default auto): these checks judge each
# penalty in 24 steps, and onnxruntime's blocks of 8 cut this ResNet-20's 16-channel layers
# in halves, which 24 steps do not recover from (group-lasso lost 3.3 points with auto,
# tl1-group-2bit 5.7). The default, auto, is checked on the README's command
# (tests/test_targets.py) and measured with the default schedule in the README.
SHORT = [
    "train.epochs=1", "train.max_steps_per_epoch=24", "train.bn_recalibration_batches=5",
    "export.verify_samples=32", "gates.max_accuracy_drop=null", "prune.round_to=1",
]  # fmt: skip
# Points of accuracy a recipe may lose on the example at 1.5x fewer MACs in 24 steps (the
# input model: 91.2% on the example's 1,000 validation images). Binarized activations
# replace every ReLU but the first and last by a calibrated 1-bit (2-bit) step, switched
# in over the first 12 steps: more is lost in 24 steps (measured with one thread: 1-bit
# 15.3 points, 2-bit 2.3; the recipes' own 6 epochs recover most of it).
MAX_DROP = {"tl1-group-binary": 20.0, "tl1-group-2bit": 4.0}
DEFAULT_MAX_DROP = 3.0


def test_every_builtin_recipe_is_covered():
    assert {name for name, _ in list_recipes()} == {
        "tl1-group", "l1-group", "l0-group", "l1l2-group", "group-lasso", "tl1-group-binary",
        "tl1-group-2bit",
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("recipe", [name for name, _ in list_recipes()])
def test_recipe_removes_channels_exactly_and_keeps_accuracy(recipe, tmp_path):
    report = compressor.compress(
        EXAMPLE / "model.pt", arch="resnet20", data=str(EXAMPLE / "data.npz"), recipe=recipe,
        target_macs=1.5, out=tmp_path / "out", device="cpu", overrides=SHORT,
    )  # fmt: skip
    assert report["exit_code"] == 0, report.get("error")
    compressed = report["compressed"]
    assert compressed["channels_kept"] < compressed["channels_total"]
    assert report["reduction"]["macs_x"] >= 1.5
    v = report["verification"]
    assert v["sparse_vs_pruned_relative"] <= 1e-5  # removal changed nothing
    drop = report["baseline"]["accuracy"] - compressed["accuracy"]
    assert drop <= MAX_DROP.get(recipe, DEFAULT_MAX_DROP), (recipe, drop)
    assert report["method"]["zero_set_chosen_by"].startswith("group prox")
