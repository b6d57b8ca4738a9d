"""Helpers shared by the tests."""

import numpy as np
import torch


def random_npz(path, shape, n_train=128, n_val=64, classes=10, seed=0):
    """Random uint8 images and labels as the ``.npz`` that ``compress --data`` reads."""
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        y_train=rng.integers(0, classes, n_train),
        x_val=rng.integers(0, 256, (n_val, *shape), dtype=np.uint8),
        y_val=rng.integers(0, classes, n_val),
    )
    return path


def randomize_bn(model: torch.nn.Module) -> None:
    """Give BatchNorm non-trivial statistics and biases, so that exactness checks mean something."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def zero_fraction_of_groups(groups, model, fraction: float, seed: int = 0) -> None:
    """Zero ``fraction`` of the units of every group (all member slices), in place."""
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for g in groups:
        f = torch.ones(g.size)
        f[torch.randperm(g.size, generator=gen)[: int(fraction * g.size)]] = 0
        factors.append(f)
    groups.scale_(dict(model.named_parameters()), factors)


def fashion_mnist_dir():
    """``shared/data/fashion-mnist`` beside the repository (as CI lays it out), else /work/shared."""
    from pathlib import Path

    beside = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
    return beside if beside.is_dir() else Path("/work/shared/data/fashion-mnist")


def _small_fpn_backbone(width: int):
    """Five stride-2 conv-BN-ReLU stages (16 to 64 channels) with a ``width``-channel FPN on
    the last three and P6/P7: the five levels torchvision's RetinaNet and FCOS expect, at a
    small fraction of ResNet-50-FPN's cost and tensors."""
    from collections import OrderedDict

    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import Conv2dNormActivation

    widths = (3, 16, 24, 32, 48, 64)
    body = torch.nn.Sequential(
        OrderedDict(
            (f"c{i + 1}", Conv2dNormActivation(widths[i], widths[i + 1], stride=2))
            for i in range(5)
        )
    )
    return BackboneWithFPN(
        body, {"c3": "0", "c4": "1", "c5": "2"}, list(widths[3:]), width,
        extra_blocks=LastLevelP6P7(width, width),
    )  # fmt: skip


def small_retinanet(num_classes: int = 3, size: int = 128, width: int = 32):
    """torchvision's RetinaNet on :func:`_small_fpn_backbone`, images resized to ``size``:
    the detector a user passes as ``--arch tests.helpers:small_retinanet``."""
    from torchvision.models.detection import RetinaNet

    return RetinaNet(_small_fpn_backbone(width), num_classes, min_size=size, max_size=size)


def small_fcos(num_classes: int = 3, size: int = 128, width: int = 64):
    """torchvision's FCOS on :func:`_small_fpn_backbone`, images resized to ``size``:
    ``--arch tests.helpers:small_fcos``. Its head's GroupNorm has 32 groups: ``width`` 64
    gives each two channels (one channel on P7's single pixel cannot be normalised)."""
    from torchvision.models.detection import FCOS

    return FCOS(_small_fpn_backbone(width), num_classes, min_size=size, max_size=size)
