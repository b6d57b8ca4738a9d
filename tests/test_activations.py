"""Binary / k-bit activations: STE gradients, per-channel scale and threshold, calibration,
the gradual switch, exact channel removal, training, swapping, configs, ONNX export."""

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

import compressor
from compressor.activations import (
    STE_CHOICES,
    ActivationSwitch,
    BinaryActivation,
    QuantizedActivation,
    SwapReport,
    activation_configs,
    activation_from_config,
    calibrate,
    describe_activation_config,
    lloyd_max_binary,
    make_activation,
    mse_best_alpha,
    summarize,
    swap_activations,
    switch_blends,
)
from compressor.checkpoint import save_compact
from compressor.errors import BadInputError
from compressor.groups import build_groups
from compressor.models import lenet5, resnet20
from compressor.prune import prune_zero_channels
from tests.helpers import randomize_bn, zero_fraction_of_groups

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
        ("clipped_relu", [0, 0, 1, 0, 0]),  # 1{|x - 0.5| < 0.5}: the clipped ReLU on (0, 1)
        ("relu", [0, 0, 0, 1, 1]),  # 1{x > theta}
        ("identity", [1, 1, 1, 1, 1]),
    ],
)
def test_binary_forward_and_ste(ste, expect):
    y, g = grad_of(BinaryActivation(ste, alpha=1.0, theta=0.5))
    assert y.tolist() == [0, 0, 0, 1, 1]
    assert g.tolist() == expect


def test_binary_defaults_are_the_bare_step_and_clipped_relu():
    y, g = grad_of(BinaryActivation())  # alpha 1, theta 0: 1{x > 0}, 1{0 < x < 1}
    assert y.tolist() == [0, 0, 1, 1, 1]
    assert g.tolist() == [0, 0, 1, 0, 0]


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
    assert act.alpha.weight.grad.item() == 6.0


def test_quantized_alpha_grad_is_ae_exact_derivative():
    """Away from the steps, the level index is the true derivative in alpha."""
    act = QuantizedActivation(4, "clipped_relu", alpha=0.3)
    x = torch.tensor([0.1, 0.65, 1.7, 2.9, 9.0, -2.0], dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0, 4.0], dtype=torch.float64)
    act.double()
    (act(x) * w).sum().backward()
    eps = 1e-6
    with torch.no_grad():
        act.alpha.weight += eps
        up = (act(x) * w).sum()
        act.alpha.weight -= 2 * eps
        down = (act(x) * w).sum()
    assert act.alpha.weight.grad.item() == pytest.approx(float(up - down) / (2 * eps), rel=1e-6)


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
    # Same parameter names and values, plus each activation's alpha and theta.
    added = {f"act_fx_{i}.{p}.weight" for i in range(3) for p in ("alpha", "theta")}
    assert gm.state_dict().keys() == model.state_dict().keys() | added
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
    assert "--set activations.functional=false" in str(info.value)  # the recipe's way out
    # Leaving functional ReLUs alone works, and the compact file's config says so (a reload
    # must not trace either)
    report = swap_activations(Untraceable(), functional=False)
    assert report.num_swapped == 0 and report.functional is False
    from compressor.checkpoint import _activation_config

    assert _activation_config(report)["functional"] is False
    assert _activation_config(swap_activations(nn.ReLU()))["functional"] is True


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
        model.act_fx_1.alpha.weight.fill_(0.7)
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
    closest = []  # of x - theta, the input of the step
    hooks = [
        m.theta.register_forward_hook(lambda m, i, o: closest.append(o.abs().min().item()))
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
    calibrate(model, [(torch.randn(shape), None)], torch.device("cpu"), batches=1)
    randomize_channels(model)
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
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    calibrate(model, [(x, None)], torch.device("cpu"), batches=1)
    randomize_channels(model)
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


# --------------------------------------------------------------------------- per-channel scale


def randomize_channels(model: nn.Module, seed: int = 0) -> None:
    """Distinct per-channel alpha in [0.5, 1.5] and theta in [-0.2, 0.6] (negative: clamped)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BinaryActivation | QuantizedActivation):
                w = m.alpha.weight
                w.copy_(0.5 + torch.rand(w.shape, generator=gen))
                if m.theta is not None:
                    w = m.theta.weight
                    w.copy_(-0.2 + 0.8 * torch.rand(w.shape, generator=gen))


def per_channel(act: nn.Module, channels: int, alpha, theta=None) -> nn.Module:
    act.alpha.set_values(torch.tensor(alpha, dtype=torch.float64))
    if theta is not None:
        act.theta.set_values(torch.tensor(theta, dtype=torch.float64))
    assert act.alpha.num_parameters == channels
    return act.double()


def test_binary_per_channel_forward_and_theta_clamp():
    act = per_channel(BinaryActivation(), 2, [0.5, 2.0], [0.3, -1.0])
    x = torch.tensor([[0.2, 0.0], [0.4, -0.5], [0.0, 0.1]], dtype=torch.float64)
    # channel 0: 0.5 * 1{x > 0.3}; channel 1: theta clamped to 0, 2 * 1{x > 0}
    assert act(x).tolist() == [[0.0, 0.0], [0.5, 0.0], [0.0, 2.0]]
    assert act(torch.zeros(3, 2, 4, 4, dtype=torch.float64)).abs().max() == 0  # act(0) == 0


def test_binary_coarse_gradient_is_the_ramp_proxy():
    """In x and theta the backward is the gradient of the ramp clamp(x - theta + b, 0, alpha),
    b = min(theta, alpha/2); in alpha the a.e. exact derivative, 1{x > theta} (finite
    differences). Channels: theta = alpha/2 (calibrated), theta > alpha/2, theta < alpha/2."""
    gen = torch.Generator().manual_seed(0)
    act = per_channel(BinaryActivation(), 3, [0.5, 1.0, 2.0], [0.25, 0.7, 0.4])
    x = (3 * torch.rand(64, 3, 2, 2, generator=gen, dtype=torch.float64) - 1).requires_grad_()
    w = torch.randn(64, 3, 2, 2, generator=gen, dtype=torch.float64)
    (act(x) * w).sum().backward()

    alpha = act.alpha.weight.detach().view(1, 3, 1, 1)
    theta = act.theta.weight.detach().clone().view(1, 3, 1, 1).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    b = torch.minimum(theta.detach(), alpha / 2)  # the ramp's offset: not differentiated
    ramp = torch.clamp(x2 - theta + b, torch.zeros_like(alpha), alpha)
    (ramp * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(act.theta.weight.grad, theta.grad.flatten())

    eps = 1e-6
    for c in range(3):
        with torch.no_grad():
            act.alpha.weight[c] += eps
            up = (act(x) * w).sum()
            act.alpha.weight[c] -= 2 * eps
            down = (act(x) * w).sum()
            act.alpha.weight[c] += eps
        assert act.alpha.weight.grad[c].item() == pytest.approx(float(up - down) / (2 * eps))


def test_kbit_per_channel_gradients():
    gen = torch.Generator().manual_seed(1)
    act = per_channel(QuantizedActivation(2), 2, [0.3, 0.8])
    x = (4 * torch.rand(50, 2, generator=gen, dtype=torch.float64) - 1).requires_grad_()
    w = torch.randn(50, 2, generator=gen, dtype=torch.float64)
    (act(x) * w).sum().backward()
    alpha = act.alpha.weight.detach()
    inside = (x > 0) & (x < 3 * alpha)  # the clipped ReLU clamp(x, 0, 3 alpha)
    torch.testing.assert_close(x.grad, w * inside)
    index = torch.clamp(torch.round(x.detach() / alpha), 0, 3)
    torch.testing.assert_close(act.alpha.weight.grad, (w * index).sum(0))


# --------------------------------------------------------------------------- calibration


def test_lloyd_max_of_a_uniform_is_two_thirds():
    """U(0, 1): alpha = E[r | r > alpha/2] = (1 + alpha/2) / 2 gives alpha = 2/3, theta = 1/3;
    a row with no positive value gets the other rows' median."""
    r = torch.stack([torch.linspace(0, 1, 100001), torch.zeros(100001)])
    alpha, theta = lloyd_max_binary(r, iterations=40)
    assert alpha[0].item() == pytest.approx(2 / 3, abs=1e-4)
    assert theta[0].item() == pytest.approx(1 / 3, abs=1e-4)
    assert alpha[1].item() == alpha[0].item()


def test_mse_best_alpha_beats_its_neighbours():
    r = torch.rand(3, 2000, generator=torch.Generator().manual_seed(0)) ** 2 * 5

    def mse(a):
        return (r - a[:, None] * torch.clamp(torch.round(r / a[:, None]), 0, 3)).pow(2).mean(1)

    best = mse_best_alpha(r, levels=3)
    for factor in (0.8, 0.9, 1.1, 1.25):
        assert (mse(best) <= mse(best * factor)).all()


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_calibration_lowers_the_quantisation_error(bits):
    """Per channel, the calibrated activation is closer to the ReLU it replaces (MSE on the
    calibration data, which the full-precision network, t = 0, computes) than alpha = 1,
    theta = 0."""
    torch.manual_seed(0)
    model = resnet20(in_channels=1).eval()
    randomize_bn(model)
    model = swap_activations(model, bits=bits).model
    loader = [(torch.randn(16, 1, 16, 16), None) for _ in range(2)]
    inputs: dict[str, torch.Tensor] = {}
    swapped = [m for m in model.modules() if isinstance(m, BinaryActivation | QuantizedActivation)]
    hooks = [
        m.register_forward_pre_hook(lambda m, i, n=n: inputs.setdefault(n, i[0]))
        for n, m in model.named_modules()
        if m in swapped
    ]
    ActivationSwitch(model, total_steps=1, fraction=1.0)  # t = 0: the ReLU network
    with torch.no_grad():
        model(loader[0][0])
    for h in hooks:
        h.remove()
    for m in swapped:
        m.blend = 1.0
    acts = dict(model.named_modules())
    before = {n: F.mse_loss(acts[n](x), x.relu()).item() for n, x in inputs.items()}
    channels = calibrate(model, loader, torch.device("cpu"), batches=2)
    assert set(channels) == set(inputs) and all(c > 1 for c in channels.values())
    with torch.no_grad():
        after = {n: F.mse_loss(acts[n](x), x.relu()).item() for n, x in inputs.items()}
    for name in inputs:
        assert after[name] < before[name], name
    assert sum(after.values()) < 0.5 * sum(before.values())


def test_calibration_of_a_shared_activation_gives_one_value():
    relu = nn.ReLU()
    net = nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu)
    model = swap_activations(net, bits=1).model
    assert calibrate(model, [(torch.randn(8, 4), None)], torch.device("cpu"), 1) == {"1": 1}


# --------------------------------------------------------------------------- the switch


def test_switch_blends_relu_into_the_step_and_finishes_at_one():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    model = swap_activations(model, bits=1).model
    act = model[1]
    evaluated, recalibrated = [], []
    switch = ActivationSwitch(
        model, total_steps=16, fraction=0.5,
        evaluate=lambda: float(len(evaluated.append(1) or evaluated)),
        recalibrate=lambda: recalibrated.append(1),
    )  # fmt: skip
    assert switch.ramp_steps == 8 and act.blend == 0
    x = torch.tensor([-1.0, 0.4, 2.0])
    assert torch.equal(act(x), x.relu())  # t = 0: the ReLU
    for _ in range(4):
        switch()
    assert act.blend == 0.5
    torch.testing.assert_close(act(x), 0.5 * x.relu() + 0.5 * (x > 0).float())
    saved = switch.state_dict()
    for _ in range(6):
        switch()
    assert act.blend == 1 and recalibrated == [1]  # BatchNorm once, when t reached 1
    assert [row["t"] for row in switch.trace] == [0.0, 0.25, 0.5, 0.75, 1.0]
    summary = switch.summary()
    assert summary["sparse_accuracy_before"] == 1 and summary["sparse_accuracy_after"] == 5

    fresh = ActivationSwitch(model, total_steps=16, fraction=0.5)  # --resume
    assert act.blend == 0
    fresh.load_state_dict(saved)
    assert act.blend == 0.5 and fresh.trace == switch.trace[:3]
    fresh.finish()
    assert act.blend == 1
    with pytest.raises(RuntimeError, match="half switched"):
        ActivationSwitch(model, total_steps=4, fraction=1.0)
        export_and_run(model, torch.randn(2, 3))


def test_switch_fraction_zero_quantises_from_the_start():
    model = swap_activations(nn.Sequential(nn.ReLU()), bits=2).model
    switch = ActivationSwitch(model, total_steps=10, fraction=0.0, evaluate=lambda: 1.0)
    assert model[0].blend == 1
    switch()
    assert switch.trace == []


def test_input_first_switches_one_activation_after_another():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU())
    model = swap_activations(model, bits=1).model
    first, second = model[1], model[3]
    switch = ActivationSwitch(model, total_steps=8, fraction=1.0, order="input_first")
    seen = []
    for _ in range(8):
        switch()
        seen.append((first.blend, second.blend))
    # the first activation is binary before the second starts to move
    assert seen == [(0.25, 0), (0.5, 0), (0.75, 0), (1, 0), (1, 0.25), (1, 0.5), (1, 0.75), (1, 1)]
    assert switch_blends(0.5, 4, "together") == [0.5] * 4
    with pytest.raises(ValueError, match="input_first"):
        ActivationSwitch(model, total_steps=8, fraction=1.0, order="backwards")


# --------------------------------------------------------------------------- removal, saving


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: lenet5(in_channels=1), (8, 1, 28, 28)),
        (lambda: resnet20(in_channels=1), (8, 1, 16, 16)),
    ],
    ids=["lenet5", "resnet20"],
)
def test_exact_removal_takes_the_per_channel_values_along(build, shape, bits, tmp_path):
    """Half of every channel group zeroed (ResNet-20: the residual stream's groups too): the
    pruned model, whose per-channel alpha/theta lost the removed channels' entries, computes
    what the sparse model did; it saves and loads back (compressor.load) unchanged."""
    torch.manual_seed(0)
    model = build().eval()
    randomize_bn(model)
    model = swap_activations(model, bits=bits).model
    x = torch.randn(shape)
    calibrate(model, [(x, None)], torch.device("cpu"), batches=1)
    randomize_channels(model)
    groups = build_groups(model, x[:1])
    assert not groups.excluded  # the per-channel values keep every group removable
    zero_fraction_of_groups(groups, model, 0.5)
    model.eval()
    with torch.no_grad():
        sparse = model(x)
    result = prune_zero_channels(model, groups, x)
    assert result.channels_removed > 0
    with torch.no_grad():
        pruned = model(x)
    assert torch.equal(pruned, sparse) or (pruned - sparse).abs().max() <= 1e-5 * sparse.abs().max()
    acts = [m for m in model.modules() if isinstance(m, BinaryActivation | QuantizedActivation)]
    assert any(m.alpha.num_parameters < 64 for m in acts)
    for act in acts:  # each keeps one value per channel left
        assert act.alpha.weight.shape == (act.alpha.num_parameters,)
    summary = summarize(model)  # what the report shows: theta as used (clamped at 0)
    assert [row["channels"] for row in summary.values()] == [a.alpha.num_parameters for a in acts]
    assert all(row["theta"]["min"] >= 0 for row in summary.values() if bits == 1)

    arch = "lenet5" if isinstance(model, fx.GraphModule) else "resnet20"
    report = swap_activations(build(), bits=bits)
    save_compact(model, tmp_path / "m.safetensors", arch=arch,
                 build_kwargs={"in_channels": 1}, activations=report)  # fmt: skip
    loaded = compressor.load(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned)


# --------------------------------------------------------------------------- end to end


def separable_images(path, n_train=768, n_val=256, seed=0):
    """Four classes of 1x16x16 uint8 images: a bright quadrant plus noise."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 4, n)
        x = rng.integers(0, 90, (n, 1, 16, 16))
        for i, label in enumerate(y):
            r, c = divmod(int(label), 2)
            x[i, 0, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] += 140
        return x.astype(np.uint8), y

    (xt, yt), (xv, yv) = make(n_train), make(n_val)
    np.savez(path, x_train=xt, y_train=yt, x_val=xv, y_val=yv)
    return xt, yt


@pytest.mark.slow
def test_binary_recipe_end_to_end_keeps_a_trained_model_accurate(tmp_path):
    """A trained ResNet-20 through `compress` with the tl1-group-binary recipe:
    the compact binarized model stays above 90% (its input model: 100%), removal is exact
    and onnxruntime agrees."""
    torch.manual_seed(0)
    xt, yt = separable_images(tmp_path / "data.npz")
    model = resnet20(num_classes=4, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.tensor(xt).float() / 255, torch.tensor(yt)
    for step in range(120):
        i = torch.arange(step * 64, step * 64 + 64) % len(x)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    report = compressor.compress(
        tmp_path / "model.pt", arch="resnet20", data=str(tmp_path / "data.npz"),
        recipe="tl1-group-binary", out=tmp_path / "out", device="cpu",
        overrides=["train.epochs=2", "train.batch_size=64", "train.bn_recalibration_batches=4",
                   "export.verify_samples=64"],
    )  # fmt: skip
    assert report["exit_code"] == 0, report.get("error")
    assert report["baseline"]["accuracy"] >= 99
    assert report["compressed"]["accuracy"] >= 90
    assert report["verification"]["sparse_vs_pruned_relative"] <= 1e-5
    assert report["verification"]["top1_agreement"] == 1.0
    act = report["activations"]
    assert act["bits"] == 1 and act["swapped"]
    assert set(act["layers"]) == set(act["swapped"])
    switch = act["switch"]
    assert switch["sparse_accuracy_before"] is not None
    assert switch["sparse_accuracy_after"] is not None
