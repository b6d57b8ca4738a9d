"""The benchmark scripts' ``--device``: parsing, recording, and each script's work on the device.

The ``cuda`` cases skip on a machine without a GPU; on one they are the check that the
scripts run there (``pytest tests/test_benchmarks_device.py -m "slow or not slow"``).
"""

import json

import numpy as np
import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


def test_resolve_device():
    from benchmarks.common import device_info, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "bogus", "cuda:x"):
        with pytest.raises(SystemExit, match="--device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            resolve_device("cuda")
    assert device_info("cpu") == {"device": "cpu"}


def test_machine_line_names_the_gpu():
    from benchmarks.render_results import machine_line

    machine = {
        "cpu_model": "Some CPU",
        "usable_cores": 16,
        "torch": "2.11.0",
        "onnxruntime": "1.30.0",
        "python": "3.12.3",
        "date": "today",
    }
    assert "NVIDIA" not in machine_line({"machine": machine})
    gpu = {**machine, "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "cuda": "13.0"}
    assert machine_line({"machine": gpu}).startswith(
        "Machine: NVIDIA H100 80GB HBM3 (cuda, CUDA 13.0) with Some CPU"
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random ResNet-20 state_dict and a random 96 + 64 image npz (no Fashion-MNIST needed)."""
    from compressor.models import resnet20

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    baseline = root / "baseline.pt"
    torch.save(resnet20(num_classes=10, in_channels=1).state_dict(), baseline)
    rng = np.random.default_rng(0)
    npz = root / "data.npz"
    np.savez(
        npz,
        x_train=rng.integers(0, 256, (96, 1, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 96),
        x_val=rng.integers(0, 256, (64, 1, 28, 28), dtype=np.uint8),
        y_val=rng.integers(0, 10, 64),
    )
    return baseline, npz


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_train_baseline_on_device(tiny, tmp_path, device):
    from benchmarks import train_baseline

    _, npz = tiny
    argv = ["--data", str(npz), "--epochs", "1", "--cache-dir", str(tmp_path), "--quiet"]
    assert train_baseline.main([*argv, "--device", device]) == 0
    info = json.loads((tmp_path / "resnet20_fmnist_e1_s0.json").read_text())
    assert info["device"] == device and 0 <= info["accuracy"] <= 100
    assert ("gpu" in info) == (device == "cuda")
    state = torch.load(tmp_path / "resnet20_fmnist_e1_s0.pt", weights_only=True)
    assert {t.device.type for t in state.values()} == {"cpu"}  # loadable without a GPU


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["tp-magnitude", "tp-magnitude-kd", "tp-sparse"])
def test_torch_pruning_on_device(tiny, tmp_path, device, method):
    from benchmarks import tradeoff

    baseline, npz = tiny
    result = tradeoff.run_torch_pruning(
        method,
        baseline_path=str(baseline),
        npz=npz,
        target=2.0,
        seed=0,
        budget_epochs=1,
        sparse_fraction=0.5,
        reg=5e-4,
        work=tmp_path,
        device=torch.device(device),
    )
    assert 0 <= result["accuracy"] <= 100 and result["onnx_bytes"] > 0
    assert result["details"]["planned_macs_x"] >= 2.0
    assert ("distill" in result["details"]) == (method == "tp-magnitude-kd")
    base = tradeoff.describe_model(tradeoff.load_baseline_model(baseline), tmp_path, "base")
    assert base["macs"] / result["macs"] == pytest.approx(result["details"]["planned_macs_x"])


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compressor_on_device(tiny, tmp_path, device):
    from benchmarks import tradeoff

    baseline, npz = tiny
    result = tradeoff.run_compressor(
        "tl1-group",
        baseline_path=str(baseline),
        npz=npz,
        target=2.0,
        seed=0,
        budget_epochs=1,
        recover_epochs=0,
        work=tmp_path / "run",
        device=torch.device(device),
    )
    assert 0 <= result["accuracy"] <= 100 and result["macs"] > 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["input"]["device"].startswith(device)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_rvsm_overhead_on_device(tmp_path, device):
    from benchmarks import rvsm_overhead

    out = tmp_path / "overhead.json"
    argv = ["--batch", "4", "--resolution", "32", "--reps", "2", "--warmup", "1"]
    argv += ["--component-reps", "2", "--device", device, "--out", str(out)]
    data = rvsm_overhead.main(argv)  # the full mode: with the profiler
    assert data["settings"]["device"] == device and data["machine"]["device"] == device
    assert data["plain_step_ms"] > 0 and data["rvsm_step_ms"] > 0
    assert data["components"]["prox"]["median_ms"] > 0
    assert data["profile_rvsm_step_top_ops"]
    if device == "cuda":
        assert "self_device_ms_per_step" in data["profile_rvsm_step_top_ops"][0]
