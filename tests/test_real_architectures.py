"""Exact channel removal on real architectures (engine issue): zero 40% of every group,
prune, and check output parity, cost reduction, one training step and ONNX parity."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

from compressor import export
from compressor.groups import build_groups
from compressor.metrics import count_macs, count_params
from compressor.models import lenet5, resnet20
from compressor.prune import prune_zero_channels
from tests.helpers import randomize_bn, zero_fraction_of_groups

TORCHVISION = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "vgg11_bn",
    "efficientnet_b0",
    "regnet_x_400mf",
    "densenet121",
]


def _check_exact_removal(model, x, tmp_path):
    model.eval()
    randomize_bn(model)
    groups = build_groups(model, x[:1])
    assert len(groups) > 0
    zero_fraction_of_groups(groups, model, 0.4)
    macs0, params0 = count_macs(model, x[:1]), count_params(model)
    result = prune_zero_channels(model, groups, x)
    # (a) parity, relative to the output scale
    assert result.relative_diff <= 1e-4
    # (b) cost fell
    assert count_macs(model, x[:1]) < 0.75 * macs0
    assert count_params(model) < 0.75 * params0
    # (c) still trains one step
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    # (c) exports, and onnxruntime agrees
    model.eval()
    path = tmp_path / "pruned.onnx"
    export.export_onnx(model, x[:1], path)
    export.check_onnx(path)
    ort = export.verify_onnx(model, path, x)
    assert ort["relative_max_abs"] <= 1e-4
    assert ort["top1_agreement"] == 1.0


def test_exact_removal_resnet20(tmp_path):
    _check_exact_removal(resnet20(), torch.randn(4, 3, 32, 32), tmp_path)


def test_exact_removal_lenet_linear_hidden_layers(tmp_path):
    _check_exact_removal(lenet5(in_channels=1), torch.randn(4, 1, 28, 28), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_exact_removal_torchvision(name, tmp_path):
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    _check_exact_removal(model, torch.randn(2, 3, 64, 64), tmp_path)
