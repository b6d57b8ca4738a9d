"""Two-process DDP run through torchrun (gloo on CPU): same outputs contract as one process."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from compressor.models import resnet20


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    torch.save(resnet20(in_channels=1).state_dict(), tmp_path / "model.pt")
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "data.npz",
        x_train=rng.integers(0, 255, (128, 1, 12, 12), dtype=np.uint8),
        y_train=rng.integers(0, 10, 128),
        x_val=rng.integers(0, 255, (32, 1, 12, 12), dtype=np.uint8),
        y_val=rng.integers(0, 10, 32),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        "-m",
        "compressor",
        str(tmp_path / "model.pt"),
        "--arch",
        "resnet20",
        "--data",
        str(tmp_path / "data.npz"),
        "--target-macs",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--set",
        "train.epochs=2",
        "--set",
        "train.batch_size=32",
        "--set",
        "train.bn_recalibration_batches=2",
        "--set",
        "export.verify_samples=8",
        "--set",
        "gates.max_accuracy_drop=null",  # random data: accuracy is chance
        "--device",
        "cpu",
        "-q",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["exit_code"] == 0
    assert report["target"]["reached"] >= 1.9
    assert report["verification"]["top1_agreement"] == 1.0
    assert len(report["epochs"]) == 2
