"""Binary / k-bit activations: STE gradients, training, swapping, configs, ONNX export."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from compressor.activations import (
    STE_CHOICES,
    BinaryActivation,
    QuantizedActivation,
    SwapReport,
    activation_configs,
    activation_from_config,
    describe_activation_config,
    make_activation,
    swap_activations,
)
from compressor.errors import BadInputError
from compressor.models import lenet5, resnet20

X = [-1.0, 0.0, 0.5, 1.0, 2.0]

pytestmark = pytest.mark.usefixtures("one_thread")


def grad_of(act: nn.Module, values=X, dtype=torch.float32):
    x = torch.tensor(values, dtype=dtype, requires_grad=True)
    y = act(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad


# --------------------------------------------------------------------------- STE formulas


@pytest.mark.parametrize(
    "ste, expect",
    [
        ("clipped_relu", [0, 0, 1, 0, 0]),  # 1{0 < x < 1}
        ("relu", [0, 0, 1, 1, 1]),  # 1{x > 0}
        ("identity", [1, 1, 1, 1, 1]),
    ],
)
def test_binary_forward_and_ste(ste, expect):
    y, g = grad_of(BinaryActivation(ste))
    assert y.tolist() == [0, 0, 1, 1, 1]
    assert g.tolist() == expect


@pytest.mark.parametrize(
    "ste, expect",
    [
        ("clipped_relu", [0, 0, 1, 1, 0]),  # 1{0 < x < 3 * 0.5}
        ("relu", [0, 0, 1, 1, 1]),
        ("identity", [1, 1, 1, 1, 1]),
    ],
)
def test_quantized_2bit_forward_and_ste(ste, expect):
    act = QuantizedActivation(2, ste, alpha=0.5)
    y, g = grad_of(act)
    # levels 0..3 times 0.5; round(1.0) = 1 (0.5 * 2 = 1), 2.0 clipped to 3 * 0.5
    assert y.tolist() == [0, 0, 0.5, 1.0, 1.5]
    assert g.tolist() == expect
    # d/dalpha = level index clamp(round(x/alpha), 0, 3) = [0, 0, 1, 2, 3]
    assert act.alpha.grad.item() == 6.0


def test_quantized_alpha_grad_is_ae_exact_derivative():
    """Away from the steps, the level index is the true derivative in alpha."""
    act = QuantizedActivation(4, "clipped_relu", alpha=0.3)
    x = torch.tensor([0.1, 0.65, 1.7, 2.9, 9.0, -2.0], dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0, 4.0], dtype=torch.float64)
    act.double()
    (act(x) * w).sum().backward()
    eps = 1e-6
    with torch.no_grad():
        act.alpha += eps
        up = (act(x) * w).sum()
        act.alpha -= 2 * eps
        down = (act(x) * w).sum()
    assert act.alpha.grad.item() == pytest.approx(float(up - down) / (2 * eps), rel=1e-6)


def test_4bit_levels_and_dtype():
    act = QuantizedActivation(4, alpha=0.25)
    x = torch.linspace(-1, 5, 97, dtype=torch.float64)
    with torch.no_grad():
        y = act(x)
    assert y.dtype == torch.float64
    assert y.max().item() == 15 * 0.25
    assert torch.equal(y / 0.25, torch.round(y / 0.25))
    assert BinaryActivation()(x.half()).dtype == torch.float16


def test_no_grad_path_matches_autograd_path():
    x = torch.randn(200)
    for act in (BinaryActivation(), QuantizedActivation(2, alpha=0.4)):
        with torch.no_grad():
            fast = act(x)
        slow = act(x.clone().requires_grad_())
        assert torch.equal(fast, slow.detach())


def test_binary_swap_trains_a_tiny_net():
    """A binarised MLP on linearly separable data learns with the clipped ReLU STE."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 20, generator=gen)
    y = (x @ torch.randn(20, generator=gen) > 0).long()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 2))
    report = swap_activations(net, bits=1, ste="clipped_relu")
    assert report.swapped == ["1"] and report.model is net
    assert isinstance(net[1], BinaryActivation)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for step in range(100):
        i = torch.arange(step * 64, step * 64 + 64) % 512
        loss = F.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    assert acc > 0.85


# --------------------------------------------------------------------------- swapping


def test_swap_resnet20_counts_and_skip():
    model = resnet20(in_channels=1)
    report = swap_activations(model, bits=1, skip=["layer1.*", "relu"])
    assert report.model is model and not report.traced
    assert report.num_swapped == 12 and report.num_skipped == 7
    assert report.counts() == {"swapped": 12, "skipped": 7}
    assert "relu" in report.skipped and "layer2.0.relu1" in report.swapped
    assert isinstance(model.relu, nn.ReLU)
    assert isinstance(model.layer1[0].relu1, nn.ReLU)
    assert isinstance(model.layer3[2].relu2, BinaryActivation)
    assert sum(isinstance(m, BinaryActivation) for m in model.modules()) == 12
    json.dumps(report.to_dict())
    with torch.no_grad():
        model.eval()(torch.randn(2, 1, 16, 16))


def test_skip_string_unmatched_patterns_and_relu6(caplog, monkeypatch):
    import logging

    # the CLI (tested elsewhere in the same process) may have turned propagation off
    monkeypatch.setattr(logging.getLogger("compressor"), "propagate", True)
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU6(), nn.Conv2d(2, 2, 1), nn.ReLU())
    with caplog.at_level("WARNING", logger="compressor.activations"):
        report = swap_activations(net, bits=2, skip="3")
    assert report.swapped == ["1"] and report.skipped == ["3"]
    assert isinstance(net[1], QuantizedActivation) and isinstance(net[3], nn.ReLU)
    report = swap_activations(nn.Sequential(nn.ReLU()), skip=["typo*"])
    assert report.unmatched_skip == ["typo*"]
    assert "typo*" in caplog.text


def test_shared_relu_instance_gets_one_replacement():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.a = nn.ReLU()
            self.b = self.a

        def forward(self, x):
            return self.b(self.fc(self.a(x)))

    m = Shared()
    report = swap_activations(m, bits=2)
    assert sorted(report.swapped) == ["a", "b"]
    assert m.a is m.b and isinstance(m.a, QuantizedActivation)
    assert len(list(m.parameters())) == 3  # fc.weight, fc.bias, one alpha


def test_root_relu_is_replaced():
    report = swap_activations(nn.ReLU())
    assert isinstance(report.model, BinaryActivation) and report.swapped == [""]


def test_lenet_functional_relus_swapped_via_fx():
    torch.manual_seed(0)
    model = lenet5(in_channels=1)
    x = torch.randn(3, 1, 28, 28)
    report = swap_activations(model, bits=1, skip=["act_fx_3"])
    gm = report.model
    assert report.traced and isinstance(gm, fx.GraphModule)
    assert report.swapped == ["act_fx_0", "act_fx_1", "act_fx_2"]
    assert report.skipped == ["act_fx_3"]
    assert isinstance(gm.act_fx_0, BinaryActivation)
    assert gm.training == model.training
    # Same parameter names and values; binary hidden activations in the graph.
    assert gm.state_dict().keys() == model.state_dict().keys()
    out = gm(x)
    assert out.shape == (3, 10)
    seen = []
    gm.act_fx_2.register_forward_hook(lambda m, i, o: seen.append(o))
    gm(x)
    assert set(seen[0].unique().tolist()) <= {0.0, 1.0}
    # Gradients reach the first conv through three binary activations.
    gm(x).sum().backward()
    assert gm.conv1.weight.grad is not None and gm.conv1.weight.grad.abs().sum() > 0


def test_functional_relus_inside_blocks_get_scoped_names():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x)) + x.relu() + F.relu6(x, inplace=False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Block(), Block())
            self.out = nn.ReLU()

        def forward(self, x):
            return self.out(F.relu(self.blocks(x)))

    report = swap_activations(Net(), bits=2, skip=["blocks.1.*"])
    assert report.swapped == [
        "out",
        "blocks.0.act_fx_0",
        "blocks.0.act_fx_1",
        "blocks.0.act_fx_2",
        "act_fx_0",
    ]
    assert report.skipped == ["blocks.1.act_fx_0", "blocks.1.act_fx_1", "blocks.1.act_fx_2"]
    assert isinstance(report.model.get_submodule("blocks.0.act_fx_1"), QuantizedActivation)
    report.model(torch.randn(1, 2, 4, 4))
    assert set(activation_configs(report.model)) == set(report.swapped)


def test_untraceable_model_with_functional_relu_raises():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
                x = -x
            return F.relu(self.fc(x))

    with pytest.raises(BadInputError, match="Untraceable.*nn.ReLU modules") as info:
        swap_activations(Untraceable())
    assert info.value.exit_code == 2
    # Leaving functional ReLUs alone works.
    report = swap_activations(Untraceable(), functional=False)
    assert report.num_swapped == 0


def test_untraceable_model_with_relu_modules_only_swaps_in_place():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            if x.sum() > 0:
                x = -x
            return self.act(self.fc(x))

    m = Untraceable()
    report = swap_activations(m)
    assert report.model is m and report.swapped == ["act"] and not report.traced


def test_bad_arguments():
    with pytest.raises(BadInputError, match="`ste` must be one of clipped_relu.*'relu'"):
        BinaryActivation("rleu")
    with pytest.raises(BadInputError, match=r"`bits` must be an integer in \[1, 8\]"):
        swap_activations(nn.ReLU(), bits=0)
    with pytest.raises(BadInputError, match="BinaryActivation"):
        QuantizedActivation(1)
    with pytest.raises(BadInputError, match="`skip`"):
        swap_activations(nn.ReLU(), skip=[1])


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("ste", STE_CHOICES)
def test_config_round_trip(bits, ste):
    cfg = describe_activation_config(bits, ste)
    assert json.loads(json.dumps(cfg)) == cfg
    act = activation_from_config(cfg)
    assert type(act) is type(make_activation(bits, ste))
    assert act.config() == cfg and act.ste == ste and act.bits == bits


def test_config_errors():
    with pytest.raises(BadInputError, match="unknown activation config keys"):
        activation_from_config({"bits": 1, "steps": 3})
    with pytest.raises(BadInputError, match="does not match"):
        activation_from_config({"type": "binary", "bits": 2})


def test_saved_quantized_model_reloads_with_same_activations():
    torch.manual_seed(0)
    model = swap_activations(lenet5(), bits=2).model
    with torch.no_grad():
        model.act_fx_1.alpha.fill_(0.7)
    configs = activation_configs(model)
    state = model.state_dict()
    # Rebuild: the same swap on a fresh model, then the weights (alpha included).
    fresh = swap_activations(lenet5(), bits=2).model
    assert activation_configs(fresh) == configs
    fresh.load_state_dict(state)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# --------------------------------------------------------------------------- ONNX


def export_and_run(model: nn.Module, x: torch.Tensor, *, dynamo: bool = False):
    """Export to ONNX in memory; return (onnx op types, onnxruntime output)."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["x"])
            proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return [n.op_type for n in proto.graph.node], out


def input_far_from_threshold(model, shape, margin=1e-5, tries=30):
    """An input whose binary activations' inputs all stay over ``margin`` away from 0.

    Float rounding differs between PyTorch and onnxruntime by ~1e-7; a
    pre-activation closer to 0 than that could flip a unit, so the comparison
    avoids such inputs instead of loosening the tolerance.
    """
    closest = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: closest.append(i[0].abs().min().item()))
        for m in model.modules()
        if isinstance(m, BinaryActivation)
    ]
    try:
        for seed in range(tries):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            closest.clear()
            with torch.no_grad():
                model(x)
            if min(closest) > margin:
                return x
    finally:
        for h in hooks:
            h.remove()
    pytest.fail("no input kept every binary pre-activation away from 0")


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: lenet5(in_channels=1), (4, 1, 28, 28)),
        (lambda: resnet20(in_channels=1), (2, 1, 16, 16)),
    ],
    ids=["lenet5", "resnet20"],
)
def test_binarized_onnx_matches_torch(build, shape):
    torch.manual_seed(0)
    model = swap_activations(build(), bits=1).model.eval()
    x = input_far_from_threshold(model, shape)
    with torch.no_grad():
        ref = model(x).numpy()
    ops, out = export_and_run(model, x)
    assert "Greater" in ops and "Cast" in ops
    assert "Relu" not in ops  # every ReLU became a comparison
    np.testing.assert_array_equal(out.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_quantized_onnx_matches_torch():
    torch.manual_seed(0)
    model = swap_activations(lenet5(), bits=2).model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantizedActivation):
                m.alpha.fill_(0.37)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    ops, out = export_and_run(model, x)
    assert "Round" in ops and "Clip" in ops
    np.testing.assert_array_equal(out.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_binarized_onnx_dynamo_exporter():
    """The dynamo exporter (torch's default) also emits Greater + Cast."""
    torch.manual_seed(0)
    model = swap_activations(lenet5(in_channels=1), bits=1).model.eval()
    x = input_far_from_threshold(model, (2, 1, 28, 28))
    with torch.no_grad():
        ref = model(x).numpy()
    ops, out = export_and_run(model, x, dynamo=True)
    assert "Greater" in ops and "Cast" in ops and "Relu" not in ops
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_swap_report_is_a_dataclass_with_model():
    report = SwapReport(swapped=["a"], skipped=[])
    assert report.model is None and report.num_swapped == 1
