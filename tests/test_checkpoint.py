from __future__ import annotations

import json
import os
import pathlib
import pickle
import sys
from collections import OrderedDict

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import compressor
from compressor.checkpoint import (
    COMPACT_FORMAT_VERSION,
    METADATA_KEY,
    LoadedCheckpoint,
    build_model,
    load,
    load_checkpoint,
    read_compact_metadata,
    save_compact,
)
from compressor.errors import CheckpointError, OutputError
from compressor.models import lenet5, resnet20


def randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def same_output(a: nn.Module, b: nn.Module, shape=(2, 3, 16, 16)) -> None:
    x = torch.randn(*shape)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def tiny_resnet(num_classes=10, in_channels=3):
    model = resnet20(num_classes=num_classes, in_channels=in_channels)
    randomize_bn(model)
    return model


# ---------------------------------------------------------------- state_dict inputs


def test_state_dict_round_trip_infers_sizes(tmp_path):
    model = tiny_resnet(num_classes=7, in_channels=1)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt", arch="resnet20")
    assert isinstance(loaded, LoadedCheckpoint)
    assert loaded.format == "state_dict" and loaded.arch == "resnet20"
    assert loaded.build_kwargs == {"num_classes": 7, "in_channels": 1}
    assert loaded.metadata["build_kwargs"] == loaded.build_kwargs
    assert not loaded.model.training
    same_output(model, loaded.model, (2, 1, 16, 16))


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_nested_state_dict_and_extra_entries(tmp_path, key):
    import argparse

    model = lenet5()
    torch.save(
        {key: model.state_dict(), "epoch": 4, "args": argparse.Namespace(lr=0.1)},
        tmp_path / "ckpt.pth",
    )
    loaded = load_checkpoint(tmp_path / "ckpt.pth", arch="lenet5")
    assert loaded.metadata["container_key"] == key
    assert loaded.metadata["checkpoint_info"] == {"epoch": 4}
    same_output(model, loaded.model, (2, 1, 28, 28))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model."])
def test_wrapper_prefix_is_stripped(tmp_path, prefix):
    model = lenet5(num_classes=3)
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "ddp.pt")
    loaded = load_checkpoint(tmp_path / "ddp.pt", arch="lenet5")
    assert loaded.build_kwargs["num_classes"] == 3
    same_output(model, loaded.model, (2, 1, 28, 28))


def test_plain_safetensors_needs_arch(tmp_path):
    model = tiny_resnet()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_checkpoint(tmp_path / "w.safetensors", arch="resnet20")
    assert loaded.format == "safetensors"
    same_output(model, loaded.model)
    with pytest.raises(CheckpointError, match="pass --arch resnet18 or pkg.module:callable"):
        load_checkpoint(tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="plain safetensors file.*--arch"):
        load(tmp_path / "w.safetensors")


def test_torchvision_state_dict_sizes():
    pytest.importorskip("torchvision")
    model = build_model("resnet18", num_classes=10)
    assert model.fc.out_features == 10
    gray = build_model("resnet18", num_classes=5, in_channels=1)
    assert gray.conv1.in_channels == 1 and gray.fc.out_features == 5


def test_torchvision_infers_num_classes_and_channels(tmp_path):
    src = build_model("resnet18", num_classes=10, in_channels=1)
    torch.save(src.state_dict(), tmp_path / "r18.pt")
    loaded = load_checkpoint(tmp_path / "r18.pt", arch="resnet18")
    assert loaded.build_kwargs == {"num_classes": 10, "in_channels": 1}
    assert loaded.model.conv1.weight.shape == (64, 1, 7, 7)
    with pytest.raises(CheckpointError, match=r"takes 1-channel inputs .* data has 3 channel"):
        load_checkpoint(tmp_path / "r18.pt", arch="resnet18", in_channels=3)


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist.*\.pt/\.pth"):
        load_checkpoint(tmp_path / "nope.pt", arch="lenet5")


def test_missing_arch(tmp_path):
    torch.save(lenet5().state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "m.pt")
    assert "holds a state_dict" in str(info.value)
    assert "pass --arch resnet18 or pkg.module:callable" in str(info.value)


def test_truncated_and_corrupt_files(tmp_path):
    torch.save(tiny_resnet().state_dict(), tmp_path / "ok.pt")
    raw = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"trunc.pt .*truncated, corrupt"):
        load_checkpoint(tmp_path / "trunc.pt", arch="resnet20")
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(CheckpointError, match=r"junk.pt .*truncated, corrupt"):
        load_checkpoint(tmp_path / "junk.pt", arch="resnet20")
    save_file(lenet5().state_dict(), str(tmp_path / "w.safetensors"))
    raw = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w_trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "w_trunc.safetensors", arch="lenet5")


def test_wrong_arch_lists_keys(tmp_path):
    torch.save(lenet5().state_dict(), tmp_path / "lenet.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "lenet.pt", arch="resnet20")
    msg = str(info.value)
    assert "does not fit --arch resnet20" in msg
    assert "missing: " in msg and "bn1.weight [16]" in msg
    assert "unexpected: " in msg and "conv2.bias [50]" in msg
    assert "shape mismatch: conv1.weight checkpoint [20, 1, 5, 5] vs model [16, 1, 3, 3]" in msg
    missing_line = next(line for line in msg.splitlines() if "missing:" in line)
    assert missing_line.count("[") == 5  # at most 5 keys listed
    assert "this checkpoint is not a resnet20" in msg
    assert "Closest architectures: lenet5 (100% of keys and shapes match)" in msg


def test_explicit_num_classes_mismatch(tmp_path):
    torch.save(lenet5(num_classes=4).state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"has 4 outputs .* --num-classes is 10"):
        load_checkpoint(tmp_path / "m.pt", arch="lenet5", num_classes=10)


def test_other_architecture_is_named_before_channel_advice(tmp_path):
    """A resnet18 state_dict with --arch resnet20 and 1-channel data: the architecture is
    wrong, not the channels."""
    torch.save(build_model("resnet18", num_classes=10).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "r18.pt", arch="resnet20", in_channels=1)
    msg = str(info.value)
    assert "this checkpoint is not a resnet20" in msg
    assert "Closest architectures: resnet18 (98% of keys and shapes match)" in msg
    assert "Pass --arch resnet18" in msg
    assert "channel" not in msg and "input_shape" not in msg
    # The right architecture: now the channels are what is wrong.
    with pytest.raises(CheckpointError, match=r"takes 3-channel inputs .* data has 1 channel"):
        load_checkpoint(tmp_path / "r18.pt", arch="resnet18", in_channels=1)


def test_same_keys_other_shapes_says_other_constructor_arguments(tmp_path):
    torch.save(resnet20(width=8).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "narrow.pt", arch="resnet20")
    msg = str(info.value)
    assert "not a resnet20 as built by default: the keys match but" in msg
    assert "other constructor arguments" in msg


def test_unknown_arch_suggests_close_match():
    with pytest.raises(CheckpointError) as info:
        build_model("resnet2O")
    msg = str(info.value)
    assert "Unknown architecture 'resnet2O'" in msg and "Did you mean resnet20" in msg
    assert "package.module:callable" in msg


def test_not_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "net": [1, 2]}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"keys: 'epoch', 'net'.* no state_dict under"):
        load_checkpoint(tmp_path / "m.pt", arch="lenet5")


# ---------------------------------------------------------------- pickles


class _Payload:
    """Unpickling this calls Path.touch(marker): proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_refused_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"weights": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "evil.pt", arch="lenet5")
    msg = str(info.value)
    assert "pickled" in msg and "would run builtins.getattr, pathlib.Path, pathlib.PosixPath" in msg
    assert "--trust-checkpoint" in msg and "model.state_dict()" in msg and "--arch" in msg
    assert not marker.exists()
    # Control: the payload is live, so the refusal above is what kept it from running.
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt", arch="lenet5", trust_checkpoint=True)
    assert marker.exists()


def test_pickled_module_refused_then_loaded_with_trust(tmp_path):
    model = lenet5()
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match=r"is a pickled module .*pass --trust-checkpoint"):
        load_checkpoint(tmp_path / "whole.pt")
    loaded = load_checkpoint(tmp_path / "whole.pt", trust_checkpoint=True)
    assert loaded.format == "pickled_module"
    assert loaded.arch == "compressor.models:LeNet5"
    same_output(model, loaded.model, (2, 1, 28, 28))


class _RunsShell:
    """Unpickling this calls os.system('true')."""

    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_refused_pickle_names_the_global_it_would_run(tmp_path, writer):
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save({"w": torch.zeros(2), "x": _RunsShell()}, path)
    else:
        path.write_bytes(pickle.dumps(_RunsShell(), protocol=4))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, arch="lenet5")
    msg = str(info.value)
    system = f"{os.system.__module__}.system"  # posix.system on Linux
    assert f"would run {system}" in msg and "nothing was run" in msg
    assert "truncated" not in msg and "corrupt" not in msg
    assert msg.index("would run") < msg.index("--trust-checkpoint")


# ---------------------------------------------------------------- package.module:callable


def test_callable_arch_from_current_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    pkg = tmp_path / "ckpt_test_nets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "small.py").write_text(
        "from torch import nn\n"
        "def net(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(4, num_classes))\n"
        "def fixed():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(12, 2))\n"
        "NOT_CALLABLE = 3\n"
    )
    model = build_model("ckpt_test_nets.small:net", num_classes=6)
    assert model[-1].out_features == 6
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt", arch="ckpt_test_nets.small:net")
    assert loaded.build_kwargs["num_classes"] == 6
    same_output(model, loaded.model, (2, 3, 8, 8))
    assert isinstance(build_model("ckpt_test_nets.small:fixed", num_classes=6), nn.Sequential)
    with pytest.raises(
        CheckpointError, match=r"no attribute 'nett'.*Did you mean ckpt_test_nets.small:net"
    ):
        build_model("ckpt_test_nets.small:nett")
    with pytest.raises(CheckpointError, match="not callable"):
        build_model("ckpt_test_nets.small:NOT_CALLABLE")
    with pytest.raises(CheckpointError, match=r"Cannot import 'ckpt_test_nets.nope'.*PYTHONPATH"):
        build_model("ckpt_test_nets.nope:net")


# ---------------------------------------------------------------- compact format


def _slice_param(module: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    old = getattr(module, name)
    new = old.detach().index_select(dim, index).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new))
    else:
        module.register_buffer(name, new)


def shrink_resnet_block(model) -> None:
    """Remove channels 1, 4, 6 inside layer1[0]: conv1 outputs, bn1, conv2 inputs."""
    block = model.layer1[0]
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15])
    _slice_param(block.conv1, "weight", keep, 0)
    block.conv1.out_channels = len(keep)
    for name in ("weight", "bias", "running_mean", "running_var"):
        _slice_param(block.bn1, name, keep, 0)
    block.bn1.num_features = len(keep)
    _slice_param(block.conv2, "weight", keep, 1)
    block.conv2.in_channels = len(keep)


def shrink_lenet(model) -> None:
    keep = torch.arange(0, 20, 2)
    _slice_param(model.conv1, "weight", keep, 0)
    _slice_param(model.conv1, "bias", keep, 0)
    model.conv1.out_channels = len(keep)
    _slice_param(model.conv2, "weight", keep, 1)
    model.conv2.in_channels = len(keep)
    keep = torch.arange(0, 84, 3)
    _slice_param(model.fc2, "weight", keep, 0)
    _slice_param(model.fc2, "bias", keep, 0)
    model.fc2.out_features = len(keep)
    _slice_param(model.fc3, "weight", keep, 1)
    model.fc3.in_features = len(keep)


def test_compact_round_trip_of_sliced_resnet(tmp_path):
    model = tiny_resnet()
    shrink_resnet_block(model)
    model.eval()
    path = save_compact(
        model,
        tmp_path / "model.safetensors",
        arch="resnet20",
        build_kwargs={"num_classes": 10, "in_channels": 3},
        extra={"input_shape": [3, 16, 16], "report": {"macs": 1.5}},
    )
    meta = read_compact_metadata(path)
    assert meta["format_version"] == 2 and meta["arch"] == "resnet20"
    assert meta["modules"]["layer1.0.conv1"]["out_channels"] == 13
    assert meta["modules"]["layer1.0.bn1"]["num_features"] == 13
    assert meta["extra"]["input_shape"] == [3, 16, 16]
    assert meta["activations"] is None
    with safe_open(str(path), "pt") as f:
        assert "layer1.0.bn1.running_var" in f.keys()  # buffers are stored
        assert json.loads(f.metadata()[METADATA_KEY])["arch"] == "resnet20"
    rebuilt = load(path)
    assert rebuilt.layer1[0].conv1.weight.shape == (13, 16, 3, 3)
    assert not rebuilt.training
    same_output(model, rebuilt)
    loaded = load_checkpoint(path)  # no --arch needed
    assert loaded.format == "compact" and loaded.arch == "resnet20"
    assert loaded.metadata["extra"]["report"] == {"macs": 1.5}
    same_output(model, loaded.model)


def test_compact_with_extra_build_kwargs_and_tied_weights(tmp_path):
    model = resnet20(width=8)
    randomize_bn(model)
    save_compact(
        model,
        tmp_path / "m.safetensors",
        arch="resnet20",
        build_kwargs={"num_classes": 10, "in_channels": 3, "width": 8},
    )
    same_output(model, load(tmp_path / "m.safetensors"))

    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    save_compact(tied, tmp_path / "tied.safetensors", arch="lenet5", build_kwargs={})
    with safe_open(str(tmp_path / "tied.safetensors"), "pt") as f:
        assert {"0.weight", "2.weight"} <= set(f.keys())


def test_compact_with_swapped_activations(tmp_path):
    from compressor.activations import swap_activations

    model = lenet5()
    shrink_lenet(model)
    report = swap_activations(model, bits=2, ste="clipped_relu", skip=["act_fx_0"])
    swapped = report.model
    with torch.no_grad():
        for name, p in swapped.named_parameters():
            if name.endswith("alpha"):
                p.fill_(0.3)
    config = {"bits": 2, "ste": "clipped_relu", "skip": ["act_fx_0"]}
    save_compact(
        swapped,
        tmp_path / "q.safetensors",
        arch="lenet5",
        build_kwargs={"num_classes": 10},
        activations=config,
    )
    meta = read_compact_metadata(tmp_path / "q.safetensors")
    assert meta["activations"]["bits"] == 2 and meta["activations"]["skip"] == ["act_fx_0"]
    rebuilt = load(tmp_path / "q.safetensors")
    same_output(swapped, rebuilt, (2, 1, 28, 28))


def test_compact_errors(tmp_path):
    model = lenet5()
    with pytest.raises(OutputError, match="does not exist"):
        save_compact(model, tmp_path / "nope" / "m.safetensors", arch="lenet5", build_kwargs={})
    save_compact(model, tmp_path / "m.safetensors", arch="lenet5", build_kwargs={})
    with pytest.raises(CheckpointError, match="not a safetensors file written by compressor"):
        torch.save(model.state_dict(), tmp_path / "m.pt")
        load(tmp_path / "m.pt")
    assert not list(tmp_path.glob(".m.safetensors.*"))  # no temp files left behind


# ---------------------------------------------------------------- compact metadata: no code from a file


def _write_compact(path, meta: dict, tensors=None) -> pathlib.Path:
    """A safetensors file with ``meta`` as its compressor metadata (what an attacker controls)."""
    tensors = tensors if tensors is not None else {"w": torch.zeros(1)}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def test_crafted_compact_file_runs_no_code(tmp_path):
    """The issue's payload: metadata naming os:system with a shell command."""
    marker = tmp_path / "pwned"
    path = _write_compact(
        tmp_path / "e.safetensors",
        {
            "format_version": 1,
            "arch": "os:system",
            "build_kwargs": {"command": f"touch {marker}"},
            "modules": {},
        },
    )
    for attempt in (
        lambda: load(path),
        lambda: compressor.load(path),
        lambda: load_checkpoint(path),
        lambda: load_checkpoint(path, arch="lenet5"),
    ):
        with pytest.raises(CheckpointError) as info:
            attempt()
        msg = str(info.value)
        assert "metadata field 'arch'" in msg and "'os:system'" in msg
        assert "--arch os:system" in msg and "--trust-checkpoint" in msg
        assert not marker.exists()


def _lenet_meta(tmp_path) -> tuple[dict, dict]:
    save_compact(lenet5(), tmp_path / "ok.safetensors", arch="lenet5", build_kwargs={})
    with safe_open(str(tmp_path / "ok.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return json.loads(json.dumps(read_compact_metadata(tmp_path / "ok.safetensors"))), tensors


BAD_FIELDS = [
    ("format_version", "1", "format_version"),
    ("format_version", True, "format_version"),
    ("arch", "os.system; rm -rf /", "arch"),
    ("arch", ["lenet5"], "arch"),
    ("build_kwargs", {"num_classes": {"__class__": 1}}, "build_kwargs.num_classes"),
    ("build_kwargs", {"not a name": 1}, "build_kwargs.not a name"),
    ("build_kwargs", {"arch": "os:system"}, "build_kwargs.arch"),
    ("build_kwargs", {"width": list(range(1000))}, "build_kwargs.width"),
    ("build_kwargs", {"num_classes": 10**12}, "build_kwargs.num_classes"),
    ("build_kwargs", [1, 2], "build_kwargs"),
    ("modules", {"conv1": {"type": "Conv2d", "forward": 1}}, "modules.conv1.forward"),
    ("modules", {"conv1": {"type": "Conv2d", "out_channels": -3}}, "modules.conv1.out_channels"),
    ("modules", {"conv1": {"type": "os.system"}}, "modules.conv1.type"),
    ("modules", {"conv1": {"type": "Conv2d", "num_features": 3}}, "modules"),  # not a conv's
    ("activations", {"bits": 2, "ste": "os.system"}, "activations.ste"),
    ("activations", {"bits": 99}, "activations.bits"),
    ("activations", {"bits": 1, "hook": "x"}, "activations.hook"),
    ("extra", [1], "extra"),
    ("extra", {"input_shape": [1, 10**9, 1]}, "extra.input_shape[1]"),
    ("preprocessing", {"scale": "x"}, "preprocessing.scale"),
    ("preprocessing", {"std": [0.0]}, "preprocessing.std[0]"),
    ("preprocessing", {"mean": [0.1, 0.2], "input_shape": [3, 8, 8]}, "preprocessing.mean"),
    ("preprocessing", {"input_shape": [1, 28]}, "preprocessing.input_shape"),
    ("preprocessing", {"shell": "x"}, "preprocessing.shell"),
    ("module_versions", {"conv1": "2"}, "module_versions.conv1"),
    ("payload", "x", "payload"),
]


@pytest.mark.parametrize(("field", "value", "named"), BAD_FIELDS, ids=[b[2] for b in BAD_FIELDS])
def test_compact_metadata_fields_are_checked(tmp_path, field, value, named):
    meta, tensors = _lenet_meta(tmp_path)
    meta[field] = value
    path = _write_compact(tmp_path / "bad.safetensors", meta, tensors)
    for attempt in (lambda: load(path), lambda: load_checkpoint(path)):
        with pytest.raises(CheckpointError) as info:
            attempt()
        assert f"metadata field {named!r}" in str(info.value)


def test_compact_metadata_missing_arch(tmp_path):
    meta, tensors = _lenet_meta(tmp_path)
    del meta["arch"]
    path = _write_compact(tmp_path / "bad.safetensors", meta, tensors)
    with pytest.raises(CheckpointError, match="metadata field 'arch' is missing"):
        read_compact_metadata(path)


def test_compact_preprocessing_round_trip_and_checked_on_save(tmp_path):
    pre = {"scale": 1 / 255, "mean": [0.5], "std": [0.25], "input_shape": [1, 28, 28]}
    path = save_compact(
        lenet5(), tmp_path / "m.safetensors", arch="lenet5", build_kwargs={}, preprocessing=pre
    )
    assert read_compact_metadata(path)["preprocessing"] == pre
    load(path)
    with pytest.raises(ValueError, match=r"metadata field 'preprocessing.std\[0\]'"):
        save_compact(
            lenet5(),
            tmp_path / "bad.safetensors",
            arch="lenet5",
            build_kwargs={},
            preprocessing={**pre, "std": [-1.0]},
        )
    assert not (tmp_path / "bad.safetensors").exists()


def test_compact_callable_arch_needs_the_user_to_name_or_trust_it(tmp_path, monkeypatch):
    """A compact file of package.module:callable imports that module only with consent."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "imported"
    pkg = tmp_path / "ckpt_consent_nets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "small.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from torch import nn\n"
        "def net(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(4, num_classes))\n"
    )
    arch = "ckpt_consent_nets.small:net"
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6)
    )
    path = save_compact(
        model, tmp_path / "m.safetensors", arch=arch, build_kwargs={"num_classes": 6}
    )
    for attempt in (
        lambda: load(path),
        lambda: compressor.load(path),
        lambda: load_checkpoint(path),
        lambda: load_checkpoint(path, arch="lenet5"),
    ):
        with pytest.raises(CheckpointError, match=rf"metadata field 'arch' names '{arch}'"):
            attempt()
    assert not marker.exists() and "ckpt_consent_nets" not in sys.modules
    try:
        for loaded in (
            load(path, trust_checkpoint=True),
            compressor.load(path, arch=arch),
            load_checkpoint(path, arch=arch).model,
            load_checkpoint(path, trust_checkpoint=True).model,
        ):
            same_output(model, loaded, (2, 3, 8, 8))
        assert marker.exists()
    finally:
        for name in [n for n in sys.modules if n.startswith("ckpt_consent_nets")]:
            monkeypatch.delitem(sys.modules, name)


# ---------------------------------------------------------------- state_dict module versions


def test_state_dict_module_versions_are_kept(tmp_path):
    """torchvision's MNASNet reads its version from the state_dict's ``_metadata``."""
    model = build_model("mnasnet0_5", num_classes=10).eval()
    randomize_bn(model)
    sd = model.state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    wrapped = nn.DataParallel(model).state_dict()  # "module." keys and versions
    assert "module" in wrapped._metadata
    torch.save({"state_dict": wrapped}, tmp_path / "ddp.pt")
    save_file(dict(sd), str(tmp_path / "plain.safetensors"))  # no versions at all
    for name in ("plain.pt", "ddp.pt", "plain.safetensors"):
        loaded = load_checkpoint(tmp_path / name, arch="mnasnet0_5")
        same_output(model, loaded.model, (2, 3, 32, 32))
    path = save_compact(
        loaded.model,
        tmp_path / "m.safetensors",
        arch="mnasnet0_5",
        build_kwargs={"num_classes": 10},
    )
    assert read_compact_metadata(path)["module_versions"][""] == 2
    same_output(model, load(path), (2, 3, 32, 32))


TORCHVISION_MODELS = torchvision.models.list_models(module=torchvision.models)


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_every_torchvision_state_dict_loads(tmp_path, name):
    """``torch.save(model.state_dict())`` of each torchvision classification model loads.

    The state_dict (keys, dtypes, shapes, ``_metadata``) is the model's own; its tensors are
    stride-0 views of one zero, so the file stays a few kB even for vit_h_14."""
    try:
        with torch.device("meta"):
            source = torchvision.models.get_model(name, weights=None)
    except Exception:  # regnet computes its widths with tensors: build it for real
        source = torchvision.models.get_model(name, weights=None)
    sd = source.state_dict()
    light = OrderedDict((k, torch.zeros((), dtype=v.dtype).expand(v.shape)) for k, v in sd.items())
    light._metadata = sd._metadata
    torch.save(light, tmp_path / "sd.pt")
    loaded = load_checkpoint(tmp_path / "sd.pt", arch=name)
    assert loaded.build_kwargs["num_classes"] == 1000
    assert list(loaded.model.state_dict()) == list(sd)


def _prune_with_torch_pruning(model: nn.Module, example: torch.Tensor, max_groups: int) -> int:
    tp = pytest.importorskip("torch_pruning")
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    pruned = 0
    for module in list(model.modules()):
        if pruned == max_groups:
            break
        if isinstance(module, nn.Conv2d) and module.out_channels > 8:
            group = dg.get_pruning_group(module, tp.prune_conv_out_channels, idxs=[0, 2, 3])
            if dg.check_pruning_group(group):
                group.prune()
                pruned += 1
    return pruned


def test_compact_round_trip_after_torch_pruning(tmp_path):
    model = tiny_resnet().eval()
    example = torch.randn(1, 3, 16, 16)
    before = sum(p.numel() for p in model.parameters())
    assert _prune_with_torch_pruning(model, example, max_groups=4) == 4
    assert sum(p.numel() for p in model.parameters()) < before
    save_compact(
        model, tmp_path / "m.safetensors", arch="resnet20", build_kwargs={"num_classes": 10}
    )
    same_output(model, load(tmp_path / "m.safetensors"))


@pytest.mark.slow
def test_compact_round_trip_of_pruned_mobilenet(tmp_path):
    """Depthwise convs (groups change), squeeze-excitation and Hardswish."""
    model = build_model("mobilenet_v3_small", num_classes=10).eval()
    example = torch.randn(1, 3, 64, 64)
    assert _prune_with_torch_pruning(model, example, max_groups=6) == 6
    save_compact(
        model,
        tmp_path / "m.safetensors",
        arch="mobilenet_v3_small",
        build_kwargs={"num_classes": 10},
    )
    same_output(model, load(tmp_path / "m.safetensors"), (2, 3, 64, 64))


def test_compact_format_versions_older_load_newer_are_refused_with_the_fix(tmp_path):
    """Version 1 (before kept attention heads were saved) still loads; a file from a newer
    format is refused naming both versions and the way out, not with a tensor mismatch."""
    meta, tensors = _lenet_meta(tmp_path)
    assert meta["format_version"] == COMPACT_FORMAT_VERSION == 2
    model = lenet5()
    model.load_state_dict(tensors)
    old = _write_compact(tmp_path / "v1.safetensors", {**meta, "format_version": 1}, tensors)
    loaded = load(old)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)
    new = _write_compact(tmp_path / "v3.safetensors", {**meta, "format_version": 3}, tensors)
    with pytest.raises(CheckpointError, match="format version 3; this compressor reads version 2"):
        load(new)
