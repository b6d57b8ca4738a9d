"""Target-driven compression end to end: the asked factor is reached within 5% with default strengths."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import compressor

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion-mnist"


@pytest.mark.slow
def test_target_macs_2_on_torchvision_resnet18(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pt")
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "data.npz",
        x_train=rng.integers(0, 255, (64, 3, 32, 32), dtype=np.uint8),
        y_train=rng.integers(0, 10, 64),
        x_val=rng.integers(0, 255, (32, 3, 32, 32), dtype=np.uint8),
        y_val=rng.integers(0, 10, 32),
    )
    report = compressor.compress(
        tmp_path / "r18.pt",
        arch="resnet18",
        data=str(tmp_path / "data.npz"),
        target_macs="2x",
        out=tmp_path / "out",
        device="cpu",
        overrides=["train.epochs=2", "train.batch_size=16", "train.bn_recalibration_batches=2",
                   "export.verify_samples=8"],
    )  # fmt: skip
    assert report["exit_code"] == 0
    assert 1.9 <= report["target"]["reached"] <= 2.1


@pytest.mark.slow
def test_readme_main_command_on_the_bundled_example(tmp_path):
    """The README's main command: exit 0, 2x fewer MACs, params fell, accuracy within 1 point."""
    from compressor.cli import main

    out = tmp_path / "compressed"
    code = main(
        [
            str(EXAMPLE / "model.pt"), "--arch", "resnet20", "--data", str(EXAMPLE / "data.npz"),
            "--recipe", "tl1-group", "--target-macs", "2", "--out", str(out), "-q",
        ]
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert code == 0
    kept, total = report["compressed"]["channels_kept"], report["compressed"]["channels_total"]
    # Ranked per MACs they save (weighting auto, MACs target), the channels removed are the
    # expensive high-resolution ones: 64 of 448 (14%) for 2x fewer MACs and 1.6x fewer params.
    # (Issue #3 asked for >= 30% of channels; that held for the uniform ranking, which removes
    # many cheap late-stage channels: 136 of 448 at 1.75x fewer params.)
    assert kept < total and report["target"]["group_weighting"] == "macs"
    assert report["reduction"]["params_x"] >= 1.5
    assert report["baseline"]["accuracy"] - report["compressed"]["accuracy"] <= 1.0
    assert report["verification"]["top1_agreement"] == 1.0
    assert 1.9 <= report["reduction"]["macs_x"] <= 2.1
    for name in ("model.onnx", "model.safetensors", "report.md", "recipe.yaml", "training.png"):
        assert (out / name).is_file()
