import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compressor import export as ex
from compressor.errors import EXIT_VERIFICATION_FAILED, BadInputError, VerificationError
from compressor.models import lenet5, resnet20


class BinaryAct(nn.Module):
    """Forward (x > 0), backward through a sigmoid proxy (straight-through estimator)."""

    def forward(self, x):
        proxy = torch.sigmoid(x)
        return proxy + ((x > 0).to(x.dtype) - proxy).detach()


class BinaryNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act1 = BinaryAct()
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.act2 = BinaryAct()
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.act1(self.conv(x)), 4).flatten(1)
        return self.fc2(self.act2(self.fc1(x)))


def _randomize_bn(model):
    """Give BatchNorm non-trivial statistics so that a broken export would show."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each small model exported once: name -> (model, path, exporter, input)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("onnx")
    models = {
        "resnet20": _randomize_bn(resnet20(in_channels=1, width=8)),
        "lenet5": lenet5(),
    }
    result = {}
    for name, model in models.items():
        x = torch.randn(2, 1, 28, 28)
        path = out / f"{name}.onnx"
        used = ex.export_onnx(model.train(), x, path)  # export must switch to eval itself
        result[name] = (model, path, used, x)
    return result


@pytest.mark.parametrize("name", ["resnet20", "lenet5"])
def test_export_check_verify(exported, name):
    model, path, used, _ = exported[name]
    assert used == "dynamo"
    assert model.training, "export must not change the caller's model"
    ex.check_onnx(path)
    inputs = torch.randn(12, 1, 28, 28)
    m = ex.verify_or_raise(model, path, inputs, batch_size=5)
    assert m["samples"] == 12
    assert m["relative_max_abs"] < 1e-5
    assert m["top1_agreement"] == 1.0
    assert 0 <= m["torch_vs_onnxruntime_max_abs"] < 1e-4
    assert set(m) == {
        "torch_vs_onnxruntime_max_abs",
        "relative_max_abs",
        "top1_agreement",
        "samples",
    }
    assert ex.onnx_size_bytes(path) == path.stat().st_size
    assert not list(path.parent.glob("*.data")), "weights must stay inside the .onnx file"


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch(exported, batch):
    model, path, _, _ = exported["resnet20"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "input"
    assert isinstance(sess.get_inputs()[0].shape[0], str)  # symbolic batch axis
    x = torch.randn(batch, 1, 28, 28)
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x).numpy()
    assert got.shape == (batch, 10)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_verify_accepts_loader_and_max_samples(exported):
    model, path, _, _ = exported["lenet5"]
    loader = [(torch.randn(4, 1, 28, 28), torch.zeros(4)) for _ in range(3)]
    assert ex.verify_onnx(model, path, loader)["samples"] == 12
    assert ex.verify_onnx(model, path, loader, max_samples=6)["samples"] == 6
    with pytest.raises(BadInputError):
        ex.verify_onnx(model, path, [])


def test_tampered_model_raises(exported):
    model, path, _, _ = exported["lenet5"]
    tampered = copy.deepcopy(model)
    with torch.no_grad():
        tampered.fc3.bias[0] += 10.0  # class 0 now wins nearly everywhere
    x = torch.randn(16, 1, 28, 28)
    with pytest.raises(VerificationError) as info:
        ex.verify_or_raise(tampered, path, x)
    assert info.value.exit_code == EXIT_VERIFICATION_FAILED
    assert "relative max abs" in str(info.value) and "top-1 agreement" in str(info.value)
    # the caller may relax both requirements
    m = ex.verify_or_raise(tampered, path, x, tolerance=float("inf"), min_top1_agreement=0.0)
    assert m["top1_agreement"] < 1.0


def test_top1_requirement_is_separate(exported):
    model, path, _, _ = exported["lenet5"]
    tampered = copy.deepcopy(model)
    with torch.no_grad():
        tampered.fc3.bias[0] += 10.0
    x = torch.randn(16, 1, 28, 28)
    with pytest.raises(VerificationError, match="top-1 agreement"):
        ex.verify_or_raise(tampered, path, x, tolerance=float("inf"))


def test_binary_activation_in_graph(tmp_path):
    torch.manual_seed(0)
    model = BinaryNet()
    path = tmp_path / "bin.onnx"
    ex.export_onnx(model, torch.randn(1, 1, 8, 8), path)
    ex.check_onnx(path)
    ops = ex.onnx_op_types(path)
    assert "Greater" in ops and "Gemm" in ops and "Conv" in ops
    m = ex.verify_or_raise(model, path, torch.randn(32, 1, 8, 8))
    assert m["samples"] == 32


def test_latency_interleaved(exported):
    paths = {k: v[1] for k, v in exported.items()}
    lat = ex.measure_latency(paths, (1, 28, 28), batch_sizes=(1, 2), warmup=1, repeats=3, threads=1)
    assert set(lat) == {"resnet20", "lenet5"}
    for per_batch in lat.values():
        assert set(per_batch) == {1, 2}
        assert all(ms > 0 for ms in per_batch.values())
    stats = ex.measure_latency_stats(paths, (1, 28, 28), warmup=0, repeats=4, threads=1)
    s = stats["lenet5"][1]
    assert s["n"] == 4 and 0 < s["min_ms"] <= s["median_ms"] <= s["p90_ms"]


@pytest.mark.parametrize("threads", [None, 2])
def test_ort_model_session_options(exported, threads):
    """Verification and latency share one session helper; pin its options and output."""
    model, path, _, _ = exported["lenet5"]
    m = ex._OrtModel(path, threads)
    opts = m.session.get_session_options()
    assert m.session.get_providers() == ["CPUExecutionProvider"]
    assert opts.log_severity_level == 3
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is None:
        defaults = ort.SessionOptions()
        assert opts.intra_op_num_threads == defaults.intra_op_num_threads
        assert opts.inter_op_num_threads == defaults.inter_op_num_threads
    else:
        assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x).numpy()
    got = m(x.numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    outputs = m.bind(x.numpy())()
    assert len(outputs) == 1
    np.testing.assert_array_equal(outputs[0], got)


def test_atomic_write_success_leaves_no_temp(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    ex.export_onnx(lenet5(), torch.randn(1, 1, 28, 28), path, exporters=("torchscript",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    ex.check_onnx(path)


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        raise RuntimeError("cannot run")


def test_atomic_write_failure_keeps_target(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ex.ExportError, match="dynamo.*torchscript"):
        ex.export_onnx(Broken(), torch.randn(1, 4), path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_fallback_to_torchscript(tmp_path, monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise RuntimeError("dynamo says no")

    monkeypatch.setitem(ex._EXPORTERS, "dynamo", fail)
    path = tmp_path / "m.onnx"
    model = lenet5()
    assert ex.export_onnx(model, torch.randn(2, 1, 28, 28), path) == "torchscript"
    assert "dynamo says no" in caplog.text
    ex.verify_or_raise(model, path, torch.randn(3, 1, 28, 28))


def test_bad_arguments(tmp_path):
    with pytest.raises(BadInputError):
        ex.export_onnx(lenet5(), torch.randn(1, 1, 28, 28), tmp_path / "m.onnx", exporters=("x",))
    with pytest.raises(BadInputError):
        ex.export_onnx(lenet5(), [1, 2], tmp_path / "m.onnx")


def test_check_onnx_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(VerificationError):
        ex.check_onnx(bad)
    with pytest.raises(VerificationError):
        ex.check_onnx(tmp_path / "missing.onnx")


def test_export_drops_debug_metadata(exported, tmp_path):
    """No exporter stack traces (local file paths), node names or value_info in the shipped
    graphs, float or int8; the input and output keep their names."""
    import onnx

    _, path, _, x = exported["resnet20"]
    q = tmp_path / "q.onnx"
    ex.quantize_int8(path, q, mode="static", calibration=x)
    for p in (path, q):
        model = onnx.load(str(p))
        assert not [n.name for n in model.graph.node if n.metadata_props]
        assert not [n.name for n in model.graph.node if n.name]
        assert not model.graph.value_info
        assert [v.name for v in model.graph.input] == [ex.INPUT_NAME]
        assert [v.name for v in model.graph.output] == [ex.OUTPUT_NAME]
        assert b"stack_trace" not in p.read_bytes()
        assert str(Path(__file__).resolve().parents[1]).encode() not in p.read_bytes()


def _optimized_ops(path, tmp_path) -> list:
    """The (domain, op type) of every node onnxruntime runs for the model at ``path``, after
    its graph optimisations (QDQ fusions included), sorted."""
    import onnx

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / f"{Path(path).stem}.optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    graph = onnx.load(opts.optimized_model_filepath).graph
    return sorted((n.domain, n.op_type) for n in graph.node)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_compact_onnx_graph_is_exact_and_smaller(exported, mode, tmp_path, monkeypatch):
    """The quantizer's own file against its compacted copy: valid, smaller, same names for
    the input and output, the same kernels after onnxruntime's fusions and bitwise the
    same outputs (batch 1 and 7: the batch axis stays dynamic)."""
    import onnx

    _, path, _, x = exported["resnet20"]
    raw, compact = tmp_path / "raw.onnx", tmp_path / "compact.onnx"
    with monkeypatch.context() as m:
        m.setattr(ex, "_compact_onnx_file", lambda path: None)
        ex.quantize_int8(path, raw, mode=mode, calibration=x)
    before = onnx.load(str(raw))
    kept = before.SerializeToString()
    onnx.save(ex.compact_onnx_graph(before), str(compact))
    assert before.SerializeToString() == kept  # the input model is left as it was
    ex.check_onnx(compact)
    assert before.graph.value_info  # the quantizer's file has what the compacted one drops
    assert compact.stat().st_size < 0.95 * raw.stat().st_size
    after = onnx.load(str(compact))
    assert [v.name for v in after.graph.input] == [v.name for v in before.graph.input]
    assert [v.name for v in after.graph.output] == [v.name for v in before.graph.output]
    assert not after.graph.value_info and not after.metadata_props
    assert _optimized_ops(compact, tmp_path) == _optimized_ops(raw, tmp_path)
    inputs = torch.randn(8, 1, 28, 28).numpy()
    for batch in (inputs[:1], inputs[1:]):
        want = ex._OrtModel(raw)(batch)
        got = ex._OrtModel(compact)(batch)
        assert got.shape == want.shape == (len(batch), 10)
        assert np.array_equal(got, want)


def test_compact_onnx_graph_zero_points_subgraphs_and_name_clashes():
    """Only all-zero int32 DequantizeLinear zero points go; a value in an ``If`` branch that
    reads the outer graph is renamed in both; new names avoid the input and output's
    (``a``, ``b``: the first short names)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def init(name, values, dtype):
        return numpy_helper.from_array(np.array(values, dtype=dtype), name)

    branch = helper.make_graph(
        [helper.make_node("Add", ["a_scaled", "one"], ["branch_out"])], "then", [],
        [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, [3])],
        initializer=[init("one", [1.0, 1.0, 1.0], np.float32)],
    )  # fmt: skip
    nodes = [
        helper.make_node("DequantizeLinear", ["a", "scale", "zero32"], ["a_scaled"]),
        helper.make_node("DequantizeLinear", ["a", "scale", "three32"], ["a_shifted"]),
        helper.make_node("QuantizeLinear", ["a_shifted", "scale", "zero8"], ["q8"]),
        helper.make_node("QuantizeLinear", ["a_shifted", "scale", "zerou8"], ["qu8"]),
        helper.make_node("DequantizeLinear", ["q8", "scale", "zero8"], ["d8"]),
        helper.make_node("DequantizeLinear", ["qu8", "scale", "zerou8"], ["du8"]),
        helper.make_node("Add", ["d8", "du8"], ["sum"]),
        helper.make_node("ReduceSum", ["sum"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero_f"], ["positive"]),
        helper.make_node("If", ["positive"], ["picked"], then_branch=branch, else_branch=branch),
        helper.make_node("Mul", ["picked", "sum"], ["b"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("a", TensorProto.INT32, [3])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [3])],
        initializer=[
            init("scale", 0.5, np.float32), init("zero32", 0, np.int32),
            init("three32", 3, np.int32), init("zero8", 0, np.int8),
            init("zerou8", 0, np.uint8), init("zero_f", 0.0, np.float32),
        ],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    compact = ex.compact_onnx_graph(model)
    onnx.checker.check_model(compact, full_check=True)
    ops = [(n.op_type, len(n.input)) for n in compact.graph.node]
    assert ops[:6] == [("DequantizeLinear", 2), ("DequantizeLinear", 3),
                       ("QuantizeLinear", 3), ("QuantizeLinear", 3),
                       ("DequantizeLinear", 3), ("DequantizeLinear", 3)]  # fmt: skip
    assert [v.name for v in compact.graph.input] == ["a"]
    assert [v.name for v in compact.graph.output] == ["b"]
    names = [o for n in compact.graph.node for o in n.output]
    assert len(set(names)) == len(names) and not {"a", "b"} & set(names[:-1])
    feed = {"a": np.array([-4, 0, 9], np.int32)}
    run = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        for m in (model, compact)
    ]
    want, got = (s.run(None, feed)[0] for s in run)
    assert np.array_equal(got, want) and want.tolist() != [0.0, 0.0, 0.0]


def test_quantize_int8(exported, tmp_path):
    model, path, _, _ = exported["lenet5"]
    q = tmp_path / "q.onnx"
    ex.quantize_int8(path, q)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]
    assert ex.onnx_size_bytes(q) < 0.5 * ex.onnx_size_bytes(path)
    m = ex.verify_onnx(model, q, torch.randn(8, 1, 28, 28))
    assert m["relative_max_abs"] < 0.2


TORCHVISION = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "efficientnet_b0",
    "vgg11_bn",
    "regnet_x_400mf",
    "densenet121",
]


@pytest.mark.slow
@pytest.mark.parametrize("arch", TORCHVISION)
def test_torchvision_export(arch, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _randomize_bn(getattr(torchvision.models, arch)(num_classes=10))
    path = tmp_path / f"{arch}.onnx"
    assert ex.export_onnx(model, torch.randn(1, 3, 64, 64), path) == "dynamo"
    ex.check_onnx(path)
    assert [p.name for p in tmp_path.iterdir()] == [f"{arch}.onnx"]
    m = ex.verify_or_raise(model, path, torch.randn(3, 3, 64, 64), tolerance=1e-4)
    assert m["samples"] == 3


# --------------------------------------------------------------------------- int8


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist"


@pytest.fixture(scope="module")
def example_onnx(tmp_path_factory):
    """The bundled ResNet-20 (trained on Fashion-MNIST) exported once, with its data."""
    from compressor import checkpoint, data

    splits = data.load_data(EXAMPLE / "data.npz")
    model = checkpoint.load_checkpoint(EXAMPLE / "model.pt", arch="resnet20", in_channels=1).model
    path = tmp_path_factory.mktemp("example") / "model.onnx"
    ex.export_onnx(model, splits.val[0][0][None], path)
    return path, splits


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8_of_a_trained_resnet20_is_smaller_and_as_accurate(example_onnx, mode, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader

    from compressor.data import subset

    path, splits = example_onnx
    calibration = torch.stack([x for x, _ in subset(splits.train, 256, 0)])
    assert isinstance(ex._calibration_reader(path, calibration), CalibrationDataReader)
    q = tmp_path / "model.int8.onnx"
    made = ex.quantize_int8(path, q, mode=mode, calibration=calibration)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx"]  # no temp files
    assert made == {"mode": mode, "calibration_samples": 256 if mode == "static" else None}
    ex.check_onnx(q)
    ops = ex.onnx_op_types(q)
    assert ({"QuantizeLinear", "DequantizeLinear"} if mode == "static" else {"ConvInteger"}) <= ops
    assert ex.onnx_size_bytes(path) >= 3.6 * ex.onnx_size_bytes(q)  # weights + graph
    if mode == "static":  # int8 weights, per-channel scales and int32 biases
        assert ex.onnx_weight_bytes(path) >= 3.75 * ex.onnx_weight_bytes(q)
    val = torch.utils.data.DataLoader(splits.val, batch_size=100)
    m = ex.compare_onnx(path, q, val)
    assert m["samples"] == len(splits.val) == 1000
    assert m["reference_accuracy"] > 90  # the float model is the trained one
    assert abs(m["accuracy"] - m["reference_accuracy"]) <= 1.0
    assert m["top1_agreement"] >= 0.95


def test_static_int8_needs_calibration(exported, tmp_path):
    _, path, _, _ = exported["lenet5"]
    for calibration in (None, torch.empty(0, 1, 28, 28)):
        with pytest.raises(BadInputError, match="calibration"):
            ex.quantize_int8(path, tmp_path / "q.onnx", mode="static", calibration=calibration)
    with pytest.raises(BadInputError, match="mode"):
        ex.quantize_int8(path, tmp_path / "q.onnx", mode="int4")
    assert list(tmp_path.iterdir()) == []


def test_compare_onnx_counts_labels_and_agreement(exported, tmp_path):
    model, path, _, _ = exported["lenet5"]
    x = torch.randn(40, 1, 28, 28)
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    labels = pred.clone()
    labels[:10] = (labels[:10] + 1) % 10  # 10 of 40 wrong
    same = ex.compare_onnx(path, path, [(x[:25], labels[:25]), (x[25:], labels[25:])])
    assert same == {"reference_accuracy": 75.0, "accuracy": 75.0, "top1_agreement": 1.0,
                    "output_relative_error": 0.0, "samples": 40}  # fmt: skip
    q = tmp_path / "q.onnx"
    ex.quantize_int8(path, q)
    m = ex.compare_onnx(path, q, x, batch_size=16)
    assert m["reference_accuracy"] is None and m["accuracy"] is None and m["samples"] == 40
    got = ex._OrtModel(q)(x.numpy()).argmax(1)
    ref = ex._OrtModel(path)(x.numpy()).argmax(1)
    assert m["top1_agreement"] == pytest.approx(float(np.mean(got == ref)))


def test_compare_onnx_measures_the_outputs_relative_error(exported, tmp_path):
    """Outputs 1.1 times the reference's (the last layer scaled) are 10% off, whatever the
    argmax says (it agrees everywhere)."""
    import copy

    model, path, _, x = exported["lenet5"]
    scaled = copy.deepcopy(model).eval()
    last = [m for m in scaled.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(1.1)
        last.bias.mul_(1.1)
    ex.export_onnx(scaled, x, tmp_path / "scaled.onnx")
    m = ex.compare_onnx(path, tmp_path / "scaled.onnx", torch.randn(16, 1, 28, 28))
    assert m["output_relative_error"] == pytest.approx(0.1, rel=1e-4)
    assert m["top1_agreement"] == 1.0


# --------------------------------------------------------------------------- op profile


def _layout_free(kind: str) -> str:
    """``3x3 conv (NCHWc)`` -> ``3x3 conv``: the kernel layout depends on the CPU."""
    return kind.split(" (")[0]


def test_op_profile_sums_to_the_run_time(tmp_path, monkeypatch):
    """Conv dominates a conv model; the kinds' medians add up to about a measured run,
    and the profile file is deleted (nothing beside the model, nothing in the working dir)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    )  # fmt: skip
    (tmp_path / "model").mkdir()
    path = tmp_path / "model" / "conv.onnx"
    ex.export_onnx(model, torch.randn(1, 3, 48, 48), path, exporters=("torchscript",))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    prof = ex.op_profile(path, (3, 48, 48), batch=2, runs=5, threads=1)
    assert _layout_free(next(iter(prof))) == "3x3 conv"  # slowest first
    assert list(prof.values()) == sorted(prof.values(), reverse=True)
    assert all(ms > 0 for ms in prof.values())
    lat = ex.measure_latency_stats({"m": path}, (3, 48, 48), batch_sizes=(2,), threads=1)
    ratio = sum(prof.values()) / lat["m"][2]["median_ms"]
    assert 0.5 < ratio < 1.5, (prof, lat)  # measured: 0.94-1.07 on a loaded 2-core machine
    assert list(work.iterdir()) == [] and [p.name for p in path.parent.iterdir()] == ["conv.onnx"]
    with pytest.raises(BadInputError):
        ex.op_profile(path, (3, 48, 48), runs=0)


def test_op_profile_labels_convolutions_by_shape(tmp_path):
    """A depthwise conv is labelled depthwise; one-input-channel and grouped convs are not."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),  # in_channels 1: weight (16, 1, 3, 3), yet not depthwise
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise
        nn.Conv2d(16, 16, 7, padding=3, groups=4),  # grouped, 4 channels per group
        nn.Conv2d(16, 8, 1),
        nn.Conv2d(8, 8, 5, padding=2, groups=8),  # depthwise 5x5
    )
    path = tmp_path / "dw.onnx"
    ex.export_onnx(model, torch.randn(1, 1, 16, 16), path, exporters=("torchscript",))
    prof = ex.op_profile(path, (1, 16, 16), runs=1, threads=1)
    convs = {_layout_free(k) for k in prof if "conv" in k}
    # each kernel size names one conv above: 3x3 the first, 7x7 the grouped one
    assert convs == {"3x3 conv", "depthwise conv", "7x7 conv", "1x1 conv"}, prof
