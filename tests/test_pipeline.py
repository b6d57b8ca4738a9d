"""``compressor.compress(...)``: the Python API, targets, resume, verification failure, resnet18.

Tiny runs only (LeNet-5 on random 1x12x12 npz data, a few steps per epoch);
``test_resnet18_end_to_end`` is the one real-architecture run (marked slow).
"""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import compressor
from compressor import cli
from compressor.errors import CompressorError, VerificationError
from compressor.models import lenet5
from compressor.pipeline import STATE_DIR
from compressor.recipe import load_recipe
from compressor.tasks import ClassificationTask
from tests.helpers import random_npz

FAST = ["train.bn_recalibration_batches=2", "export.verify_samples=8", "train.batch_size=32"]
REPORT_KEYS = {
    "schema", "tool", "created", "command", "recipe", "input", "baseline", "compressed",
    "reduction", "verification", "latency_ms", "layers", "epochs", "target", "activations",
    "gates", "timings_s", "exit_code", "outputs",
}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _restore_logging():
    """``cli.main`` installs a handler on the (captured) stderr; undo it afterwards."""
    logger = logging.getLogger("compressor")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved




def target_run_kwargs(checkpoint, data, out) -> dict:
    """3 epochs of 4 steps toward 2x fewer MACs: the reference and the interrupted runs."""
    return dict(
        arch="lenet5",
        data=str(data),
        out=out,
        device="cpu",
        target_macs=2,
        # random data: accuracy is chance, the default 5-point accuracy gate would judge noise
        overrides=["train.epochs=3", "gates.max_accuracy_drop=null", *FAST],
    )


@pytest.fixture(scope="module")
def reference(lenet, tmp_path_factory):
    """An uninterrupted API run; returns (report, out)."""
    checkpoint, data = lenet
    out = tmp_path_factory.mktemp("reference") / "out"
    report = compressor.compress(str(checkpoint), **target_run_kwargs(checkpoint, data, out))
    return report, out


# ----------------------------------------------------------------------------- API and target


def test_api_returns_the_report(reference):
    report, out = reference
    assert isinstance(report, dict)
    assert REPORT_KEYS <= set(report)
    assert report["exit_code"] == 0
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["exit_code"] == report["exit_code"]
    for key in ("baseline", "compressed", "reduction", "verification", "epochs", "gates", "target"):
        assert on_disk[key] == report[key], key
    assert load_recipe(str(out / "recipe.yaml")) == report["recipe"]


def test_target_macs_is_reached_and_gated(reference):
    report, _ = reference
    target = report["target"]
    assert target["kind"] == "macs" and target["asked"] == 2
    assert target["reached"] >= 1.9  # within 5% of the asked 2x
    assert report["reduction"]["macs_x"] == pytest.approx(target["reached"])
    (gate,) = report["gates"]
    assert gate["name"] == "target_macs" and gate["passed"] is True
    assert report["recipe"]["target"]["macs"] == 2
    # the default weighting (auto) ranks channels per MAC they save when the target is MACs
    assert report["recipe"]["penalty"]["group"]["weighting"] == "auto"
    assert target["group_weighting"] == "macs"


def test_api_bad_input_raises_with_exit_code_2(lenet, tmp_path):
    checkpoint, data = lenet
    out = tmp_path / "out"
    with pytest.raises(CompressorError) as info:
        compressor.compress(
            str(checkpoint), arch="lenet5", data=str(data), out=out, overrides=["train.lr=-1"]
        )
    assert info.value.exit_code == 2
    assert "train.lr" in str(info.value)
    assert not out.exists()


# ----------------------------------------------------------------------------- resume


def _interrupting_second_epoch(train_one_epoch, calls: list):
    """``train_one_epoch`` that raises KeyboardInterrupt when the second epoch starts."""

    def interrupt_second_epoch(*args, **kwargs):
        calls.append(kwargs.get("epoch"))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train_one_epoch(*args, **kwargs)

    return interrupt_second_epoch


def test_resume_after_interruption(lenet, reference, tmp_path, monkeypatch, capsys):
    import compressor.train

    checkpoint, data = lenet
    out = tmp_path / "out"
    real = compressor.train.train_one_epoch
    calls = []
    interrupt_second_epoch = _interrupting_second_epoch(real, calls)
    monkeypatch.setattr(compressor.train, "train_one_epoch", interrupt_second_epoch)
    code = cli.main(
        [
            str(checkpoint), "--arch", "lenet5", "--data", str(data), "--out", str(out),
            "--device", "cpu", "--target-macs", "2", "--set", "train.epochs=3",
            "--set", "gates.max_accuracy_drop=null",  # as target_run_kwargs
            *(arg for kv in FAST for arg in ("--set", kv)),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "--resume" in err
    assert calls == [0, 1]
    assert not (out / "model.onnx").exists()
    state = torch.load(out / ".compressor-state" / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 1
    before = state["history"][0]

    monkeypatch.setattr(compressor.train, "train_one_epoch", real)
    report = compressor.compress(
        str(checkpoint), **target_run_kwargs(checkpoint, data, out), resume=True
    )

    assert report["exit_code"] == 0
    assert [row["epoch"] for row in report["epochs"]] == [1, 2, 3]
    assert report["epochs"][0] == before  # kept from before the interruption, not recomputed
    assert not (out / ".compressor-state").exists()
    # the resumed run is the uninterrupted run (same shuffles too): same losses, sparsity, result
    ref, _ = reference
    for got, want in zip(report["epochs"], ref["epochs"], strict=True):
        assert got == pytest.approx(want, rel=1e-7, abs=1e-12)
    assert report["compressed"]["macs"] == ref["compressed"]["macs"]
    assert report["target"]["reached"] >= 1.9


def test_resume_goes_on_seeking_where_the_interrupted_run_stopped(lenet, tmp_path, monkeypatch):
    import compressor.train

    checkpoint, data = lenet
    kwargs = dict(
        arch="lenet5", data=str(data), device="cpu", max_accuracy_drop=50.0,
        overrides=["train.epochs=3", *FAST],
    )  # fmt: skip
    whole = compressor.compress(str(checkpoint), out=tmp_path / "whole", **kwargs)
    assert whole["target"]["kind"] == "seek_macs" and len(whole["target"]["stages"]) > 2
    assert whole["target"]["group_weighting"] == "uniform"  # auto: macs only for a MACs target
    assert whole["method"]["allocation"]["balance"] == 0.75  # target.balance auto, seeking

    real = compressor.train.train_one_epoch
    calls = []
    interrupt_second_epoch = _interrupting_second_epoch(real, calls)
    out = tmp_path / "out"
    monkeypatch.setattr(compressor.train, "train_one_epoch", interrupt_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        compressor.compress(str(checkpoint), out=out, **kwargs)
    state = torch.load(out / ".compressor-state" / "state.pt", weights_only=True)
    assert state["method"]["seeker"]["log"]  # stopped mid-seek
    monkeypatch.setattr(compressor.train, "train_one_epoch", real)
    resumed = compressor.compress(str(checkpoint), out=out, resume=True, **kwargs)

    assert resumed["target"]["stages"] == whole["target"]["stages"]
    assert resumed["compressed"]["macs"] == whole["compressed"]["macs"]
    for got, want in zip(resumed["epochs"], whole["epochs"], strict=True):
        assert got == pytest.approx(want, rel=1e-7, abs=1e-12)


def test_resume_refuses_another_run(lenet, tmp_path):
    """State from a run with other arguments is not silently reused."""
    checkpoint, data = lenet
    out = tmp_path / "out"
    (out / ".compressor-state").mkdir(parents=True)
    torch.save(
        {"fingerprint": "something else", "epoch": 1}, out / ".compressor-state" / "state.pt"
    )
    with pytest.raises(CompressorError) as info:
        compressor.compress(str(checkpoint), arch="lenet5", data=str(data), out=out, resume=True)
    assert info.value.exit_code == 2
    assert "another checkpoint, recipe, data, seed or task" in str(info.value)


class _OwnClassification(ClassificationTask):
    """A user's own task (``--task my_task:Class``): top-1 all the same, another task."""


def test_resume_keeps_the_loss_scale_and_refuses_a_state_of_another_task(
    lenet, tmp_path, monkeypatch
):
    import compressor.train

    checkpoint, data = lenet
    made, loaded = [], []

    def fp16(train, device, model):  # fp16 on the CPU: only to exercise the loss scaler
        precision = compressor.train.Precision(device, amp="fp16")
        load = precision.scaler.load_state_dict
        precision.scaler.load_state_dict = lambda state: loaded.append(state) or load(state)
        made.append(precision)
        return precision

    monkeypatch.setattr(compressor.train, "resolve_precision", fp16)
    kwargs = dict(
        arch="lenet5", data=str(data), device="cpu", target_macs=2,
        overrides=["train.epochs=3", "gates.max_accuracy_drop=null", *FAST],
    )  # fmt: skip
    real = compressor.train.train_one_epoch
    monkeypatch.setattr(
        compressor.train, "train_one_epoch", _interrupting_second_epoch(real, calls := [])
    )
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compressor.compress(str(checkpoint), out=out, **kwargs)
    state = torch.load(out / STATE_DIR / "state.pt", weights_only=True)
    assert calls == [0, 1] and state["scaler"] == made[-1].scaler.state_dict()

    with pytest.raises(CompressorError) as info:  # the same arguments, another task
        compressor.compress(
            str(checkpoint), out=out, resume=True, task=_OwnClassification, **kwargs
        )
    assert info.value.exit_code == 2 and "task" in str(info.value)

    monkeypatch.setattr(compressor.train, "train_one_epoch", real)
    resumed = compressor.compress(str(checkpoint), out=out, resume=True, **kwargs)
    assert resumed["exit_code"] == 0
    assert loaded == [state["scaler"]]  # the resumed run goes on from the saved loss scale


# ----------------------------------------------------------------------------- verification


def test_verification_failure_exit_4_writes_report_not_model(lenet, tmp_path, monkeypatch, capsys):
    checkpoint, _ = lenet

    def disagree(*args, **kwargs):
        raise VerificationError("pruned model differs from the sparse model by 0.5 (max abs)")

    monkeypatch.setattr("compressor.pipeline.prune_zero_channels", disagree)
    out = tmp_path / "out"
    code = cli.main(
        [
            str(checkpoint), "--arch", "lenet5", "--out", str(out), "--device", "cpu",
            "--input-shape", "1,12,12", "--set", "train.epochs=0", "--set", "export.verify_samples=8",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 4
    assert "compress: error:" in err and "differs" in err
    assert not (out / "model.onnx").exists() and not (out / "model.safetensors").exists()
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["schema"] == 1 and report["exit_code"] == 4
    assert "differs" in report["error"]
    assert report["input"]["arch"] == "lenet5"
    assert report["baseline"]["params"] > 0
    md = (out / "report.md").read_text()
    assert "VERIFICATION FAILED" in md.splitlines()[0]
    assert "differs" in md
    assert load_recipe(str(out / "recipe.yaml"))["train"]["epochs"] == 0


# ----------------------------------------------------------------------------- real architecture


@pytest.mark.slow
def test_resnet18_end_to_end(tmp_path, capsys):
    import onnxruntime as ort
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "resnet18.pt")
    data = random_npz(tmp_path / "data.npz", (3, 32, 32), n_train=64, n_val=32)
    out = tmp_path / "out"
    code = cli.main(
        [
            str(tmp_path / "resnet18.pt"), "--arch", "resnet18", "--data", str(data), "--out", str(out),
            "--device", "cpu", "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2",
            "--set", "gates.max_accuracy_drop=null",  # random data: accuracy is chance
            "--target-macs", "2", *(arg for kv in FAST for arg in ("--set", kv)),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["arch"] == "resnet18"
    # two steps are too few for the default strengths to zero anything; the target forces it
    assert report["target"]["reached"] >= 1.9
    assert report["verification"]["top1_agreement"] == 1.0
    assert report["compressed"]["params"] < report["baseline"]["params"]
    model = compressor.load(out / "model.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)


def _report(out):
    return json.loads((out / "report.json").read_text())


def test_every_run_leaves_out_describing_itself(lenet, tmp_path, monkeypatch):
    """A failed run moves the previous outputs aside and says FAIL with its exit code; no model
    of an earlier run stays beside it; the user's files stay; --resume still works."""
    import compressor.train

    checkpoint, data = lenet
    out = tmp_path / "out"
    kwargs = dict(
        arch="lenet5", data=str(data), out=out, device="cpu",
        overrides=["train.epochs=2", "gates.max_accuracy_drop=null", *FAST],
    )  # fmt: skip
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "previous").mkdir()
    (out / "previous" / "mine.txt").write_text("mine too")

    assert compressor.compress(str(checkpoint), **kwargs)["exit_code"] == 0
    old_onnx = (out / "model.onnx").read_bytes()

    # exit 1: diverged
    diverging = {**kwargs, "overrides": [*kwargs["overrides"], "train.lr=1e6"]}
    with pytest.raises(CompressorError) as info:
        compressor.compress(str(checkpoint), **diverging)
    assert info.value.exit_code == 1
    report = _report(out)
    assert report["exit_code"] == 1 and "train.lr" in report["error"]
    head = (out / "report.md").read_text().splitlines()[0]
    assert head.startswith("## ❌ compressor: FAILED (exit 1)")
    assert not (out / "model.onnx").exists() and not (out / "model.safetensors").exists()
    assert _report(out / "previous")["exit_code"] == 0
    assert (out / "previous" / "model.onnx").read_bytes() == old_onnx
    assert (out / "notes.txt").read_text() == "mine"

    # exit 1: interrupted in the second epoch; its state stays for --resume
    real = compressor.train.train_one_epoch
    monkeypatch.setattr(
        compressor.train, "train_one_epoch", _interrupting_second_epoch(real, calls := [])
    )
    with pytest.raises(KeyboardInterrupt):
        compressor.compress(str(checkpoint), **kwargs)
    report = _report(out)
    assert report["exit_code"] == 1 and "interrupted after 1 completed epoch" in report["error"]
    assert "--resume" in report["error"] and len(report["epochs"]) == 1
    assert (out / STATE_DIR / "state.pt").is_file()
    assert _report(out / "previous")["exit_code"] == 1  # the diverged run's, replacing the first's
    assert not (out / "previous" / "model.onnx").exists()

    seen = []

    def counting(*args, **kw):
        seen.append(kw.get("epoch"))
        return real(*args, **kw)

    monkeypatch.setattr(compressor.train, "train_one_epoch", counting)
    resumed = compressor.compress(str(checkpoint), resume=True, **kwargs)
    assert resumed["exit_code"] == 0 and [e["epoch"] for e in resumed["epochs"]] == [1, 2]
    assert calls == [0, 1] and seen == [1]  # went on from the kept state, not restarted
    assert (out / "model.onnx").is_file() and not (out / STATE_DIR).exists()
    assert "interrupted" in _report(out / "previous")["error"]

    # exit 4: verification failed; the resumed run's model moves aside, none stays in --out
    def disagree(*args, **kwargs):
        raise VerificationError("pruned model differs from the sparse model by 0.5 (max abs)")

    monkeypatch.setattr("compressor.pipeline.prune_zero_channels", disagree)
    assert compressor.compress(str(checkpoint), **kwargs)["exit_code"] == 4
    assert _report(out)["exit_code"] == 4
    assert "VERIFICATION FAILED (exit 4)" in (out / "report.md").read_text().splitlines()[0]
    assert not (out / "model.onnx").exists() and not (out / "model.safetensors").exists()
    assert _report(out / "previous")["exit_code"] == 0
    assert (out / "previous" / "model.onnx").is_file()
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "previous" / "mine.txt").read_text() == "mine too"


def _onnx_weights(path) -> dict:
    """Initializers that are the weights of Conv/Gemm/MatMul nodes, by name."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return {
        name: inits[name]
        for node in graph.node
        if node.op_type in ("Conv", "Gemm", "MatMul")
        for name in node.input[1:2]
        if name in inits
    }


def test_report_agrees_with_the_shipped_model(lenet, tmp_path):
    """Sparsity and channel counts are the ONNX model's own; the recorded preprocessing
    (report.json, report.md, model.safetensors) feeds the ONNX model what it was checked on."""
    import onnxruntime as ort
    from safetensors import safe_open

    checkpoint, data = lenet
    out = tmp_path / "out"
    report = compressor.compress(
        str(checkpoint), arch="lenet5", data=str(data), out=out, device="cpu", target_macs=2,
        mean=[0.25], std=[0.5],
        overrides=["train.epochs=1", "gates.max_accuracy_drop=null", *FAST],
    )  # fmt: skip
    assert report["exit_code"] == 0
    comp = report["compressed"]

    weights = _onnx_weights(out / "model.onnx")
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.size for w in weights.values())
    assert comp["weight_sparsity"] == zeros / total
    assert comp["sparse_model_weight_sparsity"] > comp["weight_sparsity"]  # zero channels went

    groups = report["channel_groups"]
    assert groups and comp["channels_kept"] < comp["channels_total"]
    for g in groups:
        assert weights[f"{g['root']}.weight"].shape[0] == g["after"], g
    assert sum(g["after"] for g in groups) == comp["channels_kept"]
    assert sum(g["before"] for g in groups) == comp["channels_total"]

    expected = {"scale": 1 / 255, "mean": [0.25], "std": [0.5], "input_shape": [1, 12, 12]}
    assert report["preprocessing"] == expected
    assert _report(out)["preprocessing"] == expected
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["compressor"])["preprocessing"] == expected
    md = (out / "report.md").read_text()
    assert "**Input preprocessing**" in md and "mean [0.25], std [0.5]" in md

    with np.load(data) as arrays:
        x, y = arrays["x_val"], arrays["y_val"]
    p = report["preprocessing"]
    mean = np.array(p["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.array(p["std"], np.float32).reshape(1, -1, 1, 1)
    inputs = ((x.astype(np.float32) * np.float32(p["scale"]) - mean) / std).astype(np.float32)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: inputs})[0]
    assert 100.0 * float((logits.argmax(1) == y).mean()) == pytest.approx(comp["accuracy"])


def test_preprocessing_scale_follows_the_stored_data(tmp_path):
    from compressor import data as data_mod
    from compressor.config import Data
    from compressor.pipeline import _preprocessing

    rng = np.random.default_rng(0)
    x = rng.random((8, 1, 6, 6), dtype=np.float32)
    y = np.arange(8) % 2
    np.savez(tmp_path / "f.npz", x_train=x, y_train=y, x_val=x, y_val=y)
    cfg = Data(mean=None, std=None, input_shape=None, augment="auto", workers="auto")
    floats = data_mod.load_data(tmp_path / "f.npz")
    assert _preprocessing(floats, cfg, (1, 6, 6)) == {
        "scale": 1.0, "mean": [0.0], "std": [1.0], "input_shape": [1, 6, 6],
    }  # fmt: skip
    # uint8 images converted on load (here to 3 channels, 8x8) are still scaled by 1/255
    u8 = random_npz(tmp_path / "u8.npz", (1, 6, 6), n_train=8, n_val=8)
    splits = data_mod.load_data(u8, input_shape=(3, 8, 8))
    assert _preprocessing(splits, cfg, (3, 8, 8))["scale"] == 1 / 255
    assert _preprocessing(None, cfg, (3, 8, 8)) is None  # no data: not known


def test_a_model_that_fails_onnx_verification_is_not_shipped(lenet, tmp_path, monkeypatch):
    from compressor import export

    checkpoint, _ = lenet
    real = export.verify_onnx

    def disagreeing(*args, **kwargs):
        return {**real(*args, **kwargs), "top1_agreement": 0.5}

    monkeypatch.setattr(export, "verify_onnx", disagreeing)
    out = tmp_path / "out"
    report = compressor.compress(
        str(checkpoint), arch="lenet5", out=out, device="cpu", input_shape="1,12,12",
        overrides=["train.epochs=0", "export.verify_samples=8"],
    )  # fmt: skip
    assert report["exit_code"] == 4 and "top-1 agreement 50.0%" in report["error"]
    assert not (out / "model.onnx").exists() and not (out / "model.safetensors").exists()
    on_disk = _report(out)
    assert on_disk["exit_code"] == 4 and "model.onnx" not in on_disk["outputs"]
    assert "VERIFICATION FAILED (exit 4)" in (out / "report.md").read_text().splitlines()[0]


def test_bad_input_found_late_leaves_out_as_it_was(lenet, tmp_path):
    """An unreachable target is found after the previous outputs moved aside: they come back."""
    checkpoint, data = lenet
    out = tmp_path / "out"
    kwargs = dict(
        arch="lenet5", data=str(data), out=out, device="cpu",
        overrides=["train.epochs=1", "gates.max_accuracy_drop=null", *FAST],
    )  # fmt: skip
    assert compressor.compress(str(checkpoint), **kwargs)["exit_code"] == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CompressorError) as info:
        compressor.compress(str(checkpoint), target_macs=1000, **kwargs)
    assert info.value.exit_code == 2
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in out.iterdir()) == sorted(str(k) for k in before)


@pytest.mark.slow
def test_int8_of_the_bundled_example_end_to_end(tmp_path):
    """The bundled ResNet-20 on Fashion-MNIST, 24 steps to 2x fewer MACs, then static INT8 of
    the compact model: 3.4x fewer bytes or better (3.66x measured, both files compacted),
    as accurate as the float compact model.
    24 steps cost the float model ~7 points (91.2 -> 84.3%; INT8 84.0%, 98.8% agreement),
    so the accuracy gate is off here (the INT8 gate itself:
    test_cli.py::test_int8_ships_beside_the_float_model_then_is_left_out...). With 4 steps
    the float model was ~20 points down and its INT8 1.2 points off it: a model that
    broken is not what INT8 is judged on."""
    import onnx

    from compressor import export

    example = Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist"
    out = tmp_path / "out"
    report = compressor.compress(
        str(example / "model.pt"), arch="resnet20", data=str(example / "data.npz"), out=out,
        device="cpu", target_macs=2,
        overrides=["train.epochs=1", "train.max_steps_per_epoch=24", "export.int8=static",
                   "gates.max_accuracy_drop=null", "target.seek_accuracy_drop=null"],
    )  # fmt: skip
    assert report["exit_code"] == 0
    q, compressed = report["int8"], report["compressed"]
    path = out / "model.int8.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    assert q["file"] == "model.int8.onnx" and q["passed"] and "model.int8.onnx" in report["outputs"]
    assert export.onnx_size_bytes(out / "model.onnx") >= 3.4 * path.stat().st_size
    assert q["samples"] == 1000
    assert q["float_accuracy"] == pytest.approx(compressed["accuracy"], abs=0.2)
    assert abs(q["accuracy"] - compressed["accuracy"]) <= 1.0
    assert q["top1_agreement"] >= 0.95
    assert q["gate"]["value"] == pytest.approx(report["baseline"]["accuracy"] - q["accuracy"])
    assert q["gate"]["detail"] == "no accuracy gate"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["int8"]["onnx_bytes"] == path.stat().st_size


def test_no_training_removes_only_channels_that_are_already_zero(lenet, tmp_path):
    """``train.epochs=0``: the shipped model computes what the input model computes."""
    checkpoint, data = lenet
    report = compressor.compress(
        str(checkpoint), arch="lenet5", data=str(data), out=tmp_path / "out", device="cpu",
        overrides=["train.epochs=0", "gates.max_accuracy_drop=null", *FAST],
    )  # fmt: skip
    assert report["exit_code"] == 0 and report["reduction"]["macs_x"] == 1.0
    assert report["method"]["zero_set_chosen_by"].startswith("none: no training step")
    model = lenet5()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    shipped = compressor.load(tmp_path / "out" / "model.safetensors")
    x = torch.randn(16, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(shipped.eval()(x), model.eval()(x), rtol=0, atol=1e-5)


def test_round_to_keeps_channel_multiples_without_wasted_zero_channels(lenet, tmp_path):
    """``prune.round_to=4``: the budget keeps a multiple of 4 channels per group (or all of
    them) from the first step, so removal keeps no zero channel and the target still holds."""
    checkpoint, data = lenet
    report = compressor.compress(
        str(checkpoint), **{
            **target_run_kwargs(checkpoint, data, tmp_path / "out"),
            "overrides": ["train.epochs=2", "gates.max_accuracy_drop=null", "prune.round_to=4",
                          *FAST],
        },
    )  # fmt: skip
    assert report["exit_code"] == 0 and report["reduction"]["macs_x"] >= 2.0
    thinned = [g for g in report["channel_groups"] if g["after"] < g["before"]]
    assert thinned
    assert all(g["after"] % 4 == 0 for g in thinned)
    shipped = compressor.load(tmp_path / "out" / "model.safetensors")
    for name, module in shipped.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            rows = module.weight.detach().flatten(1).abs().sum(1)
            assert bool((rows > 0).all()), f"{name} keeps an all-zero channel: wasted MACs"


# ------------------------------------------------ the seeker's rollback of the optimizer


def _sgd_run(momentum: float = 0.9):
    """A LeNet-5, its channel groups and an SGD optimizer that has taken three steps."""
    from types import SimpleNamespace

    from compressor.groups import build_groups
    from compressor.pipeline import _snapshot

    torch.manual_seed(0)
    model = lenet5(in_channels=1, num_classes=10)
    run = SimpleNamespace(model=model, groups=build_groups(model, torch.randn(1, 1, 28, 28)))
    run.optimizer = None
    before_training = _snapshot(run)  # the seeker's first snapshot comes before the optimizer
    run.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)

    def steps(n):
        for _ in range(n):
            run.optimizer.zero_grad()
            model(torch.randn(8, 1, 28, 28)).square().mean().backward()
            run.optimizer.step()

    return run, before_training, steps


def _momenta(run) -> dict:
    return {
        n: run.optimizer.state[p]["momentum_buffer"].clone()
        for n, p in run.model.named_parameters()
        if p in run.optimizer.state
    }


def test_model_rollback_puts_back_the_optimizers_momentum_but_not_its_learning_rate():
    from compressor.pipeline import _rollback, _snapshot

    run, before_training, steps = _sgd_run()
    steps(3)
    saved, momenta = _snapshot(run), _momenta(run)
    steps(3)
    run.optimizer.param_groups[0]["lr"] = 0.05  # what the schedule set since
    _rollback(run, saved, None)
    for name, value in run.model.state_dict().items():
        assert torch.equal(value, saved["model"][name])
    after = _momenta(run)
    assert after.keys() == momenta.keys() and len(after) > 0
    assert all(torch.equal(after[n], momenta[n]) for n in momenta)
    assert run.optimizer.param_groups[0]["lr"] == 0.05
    _rollback(run, before_training, None)  # back to before the first step: no momentum
    assert len(run.optimizer.state) == 0


def test_channel_rollback_puts_back_only_the_units_momentum_slices():
    from compressor.pipeline import _rollback, _snapshot

    run, before_training, steps = _sgd_run()
    steps(3)
    saved, momenta_then = _snapshot(run), _momenta(run)
    steps(3)
    momenta_now = _momenta(run)
    units = [torch.zeros(g.size, dtype=torch.bool) for g in run.groups]
    units[0][[0, 2]] = True
    chosen = {n: torch.zeros(t.shape[0], dtype=torch.bool) for n, t in momenta_now.items()}
    for group, mask in zip(run.groups, units, strict=True):
        for member in group.members:
            chosen[member.param][member.index[mask[member.channel]]] = True
    assert sum(int(c.sum()) for c in chosen.values()) > 0
    _rollback(run, saved, units)
    after = _momenta(run)
    for name, rows in chosen.items():
        assert torch.equal(after[name][rows], momenta_then[name][rows])
        assert torch.equal(after[name][~rows], momenta_now[name][~rows])
    _rollback(run, before_training, units)  # the snapshot had no momentum: those rows are 0
    after = _momenta(run)
    for name, rows in chosen.items():
        assert not after[name][rows].any()
        assert torch.equal(after[name][~rows], momenta_now[name][~rows])
