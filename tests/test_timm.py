"""``--arch timm:NAME``: timm models built by name (no downloaded weights), loaded, compressed."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import compressor
from compressor import checkpoint as ckpt
from compressor.errors import BadInputError
from tests.helpers import random_npz

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "resnet10t"


def _saved(tmp_path, name=NAME, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_state_dict_loads_with_timm_arch(tmp_path):
    model, path = _saved(tmp_path)
    loaded = ckpt.load_checkpoint(path, arch=f"timm:{NAME}")
    assert loaded.arch == f"timm:{NAME}" and loaded.format == "state_dict"
    assert loaded.build_kwargs == {"num_classes": 10, "in_channels": 3}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))


def test_in_channels_from_the_checkpoint(tmp_path):
    model, path = _saved(tmp_path, "mobilenetv3_small_050", in_chans=1)
    loaded = ckpt.load_checkpoint(path, arch="timm:mobilenetv3_small_050")
    assert loaded.build_kwargs == {"num_classes": 10, "in_channels": 1}
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))


def test_unknown_name_suggests_close_matches():
    with pytest.raises(BadInputError, match=r"Did you mean timm:resnet10t") as info:
        ckpt.build_model("timm:resnt10t", num_classes=10)
    assert info.value.exit_code == 2


def test_missing_timm_gives_the_install_hint(monkeypatch):
    ckpt._timm_names.cache_clear()
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    try:
        with pytest.raises(BadInputError, match=r'pip install "compressor\[timm\]"'):
            ckpt.build_model(f"timm:{NAME}", num_classes=10)
    finally:
        ckpt._timm_names.cache_clear()


def _compact(tmp_path, arch, build_kwargs):
    """A compact file of resnet10t whose metadata names ``arch`` and ``build_kwargs``."""
    model, _ = _saved(tmp_path)
    path = tmp_path / "model.safetensors"
    ckpt.save_compact(model, path, arch=f"timm:{NAME}", build_kwargs={"num_classes": 10})
    from safetensors.torch import load_file, save_file

    meta = ckpt.read_compact_metadata(path)
    meta.update(arch=arch, build_kwargs=build_kwargs)
    save_file(load_file(path), str(path), metadata={ckpt.METADATA_KEY: json.dumps(meta)})
    return model, path


def test_compact_file_may_name_a_registered_timm_model(tmp_path):
    model, path = _compact(tmp_path, f"timm:{NAME}", {"num_classes": 10, "in_channels": 3})
    loaded = compressor.load(path)  # no --arch: a registered name chooses no code
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_compact_file_naming_an_unknown_timm_model_is_refused(tmp_path):
    _, path = _compact(tmp_path, "timm:not_a_timm_model", {"num_classes": 10})
    with pytest.raises(BadInputError, match="Unknown timm architecture"):
        compressor.load(path)


def test_compact_file_may_not_pass_other_timm_kwargs(tmp_path):
    _, path = _compact(
        tmp_path, f"timm:{NAME}", {"num_classes": 10, "checkpoint_path": "/etc/passwd"}
    )
    with pytest.raises(BadInputError, match="checkpoint_path"):
        compressor.load(path)


def test_compress_a_timm_model_end_to_end(tmp_path):
    _, path = _saved(tmp_path)
    data = random_npz(tmp_path / "data.npz", (3, 32, 32))
    out = tmp_path / "out"
    report = compressor.compress(
        str(path),
        arch=f"timm:{NAME}",
        data=str(data),
        out=out,
        device="cpu",
        target_macs=1.5,
        overrides=[
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            "gates.max_accuracy_drop=null",
            "train.bn_recalibration_batches=2",
            "export.verify_samples=8",
            "train.batch_size=16",
        ],
    )
    assert report["exit_code"] == 0
    assert report["reduction"]["macs_x"] >= 1.4
    assert report["verification"]["top1_agreement"] == 1.0
    # the compact model rebuilds from its metadata alone
    reloaded = compressor.load(out / "model.safetensors")
    assert sum(p.numel() for p in reloaded.parameters()) < sum(
        p.numel() for p in timm.create_model(NAME, num_classes=10).parameters()
    )
