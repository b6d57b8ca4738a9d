"""The GPU check script (``benchmarks/gpu_check.py``): its ``--quick`` mode runs anywhere and
writes the JSON a GPU machine's run writes; the torchrun part runs with gloo on the CPU."""

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gpu_check_quick(tmp_path):
    from benchmarks import gpu_check

    assert (
        gpu_check.main(["--quick", "--device", "cpu", "--ddp-procs", "0", "--out", str(tmp_path)])
        == 0
    )
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["benchmark"] == "gpu_check" and data["ok"] is True
    assert data["gpus"]["count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert data["setup"]["arch"] == "resnet18" and data["machine"]["device"] == "cpu"
    for run in ("loader", "plain", "compress"):
        assert data[run]["steps"] == 3 and data[run]["images_per_s"] > 0, run
    assert data["plain"]["amp"] == data["compress"]["amp"] == "off"  # auto on the CPU
    assert (
        data["compress"]["exit_code"] == 0 and data["compress"]["images_per_s_report_timings"] > 0
    )
    assert data["ratios"]["compress_vs_plain"] > 0 and data["ddp"] is None
    assert json.loads((tmp_path / "compress_report.json").read_text())["exit_code"] == 0


@pytest.mark.slow
def test_gpu_check_torchrun_on_the_cpu(tmp_path):
    from benchmarks import gpu_check

    argv = ["--quick", "--device", "cpu", "--ddp-procs", "2", "--out", str(tmp_path)]
    assert gpu_check.main(argv) == 0
    ddp = json.loads((tmp_path / "gpu_check.json").read_text())["ddp"]
    assert ddp["nproc_per_node"] == 2 and ddp["returncode"] == 0 and ddp["exit_code"] == 0
    assert (tmp_path / "ddp_report.json").is_file()
