"""What channel removal can reach on real architectures, and why the rest stays.

Per model (random weights, 10 classes, 3x64x64; ViTs built for 64x64): the channel groups,
the share of MACs that removing 50% of every group's units removes (the first half, then
removed for real: the parity check of ``prune_zero_channels`` runs, and MACs are counted
again), and the layers left whole with their reasons. Writes
``benchmarks/results/architectures.json``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/architectures.py   # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import command_line, machine_info, write_json  # noqa: E402
from compressor.groups import build_groups  # noqa: E402
from compressor.metrics import count_macs  # noqa: E402
from compressor.prune import prune_zero_channels  # noqa: E402

MODELS = [
    "torchvision:resnext50_32x4d",
    "torchvision:regnet_y_400mf",
    "torchvision:shufflenet_v2_x1_0",
    "torchvision:convnext_tiny",
    "torchvision:vit_b_16",
    "torchvision:swin_t",
    "timm:resnet50",
    "timm:efficientnet_b0",
    "timm:convnext_atto",
    "timm:vit_tiny_patch16_224",
    "timm:deit_tiny_patch16_224",
]


def build(spec: str) -> torch.nn.Module:
    source, name = spec.split(":", 1)
    if source == "timm":
        import timm

        kwargs = {"img_size": 64} if name.startswith(("vit", "deit")) else {}
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    import torchvision

    kwargs = {"image_size": 64} if name.startswith("vit") else {}
    return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)


def measure(spec: str) -> dict:
    """Groups, the MACs share removed at 50% of the removable units, and the layers left whole."""
    torch.manual_seed(0)
    model = build(spec).eval()
    x = torch.randn(2, 3, 64, 64)
    groups = build_groups(model, x[:1])
    masks = [torch.arange(g.size) < g.size // 2 for g in groups]
    predicted, _ = groups.estimate_cost(masks)
    groups.scale_(dict(model.named_parameters()), [(~m).float() for m in masks])
    macs0 = groups.total_macs
    result = prune_zero_channels(model, groups, x)  # raises if the outputs moved
    macs = count_macs(model, x[:1])
    reasons = Counter(groups.excluded.values())
    return {
        "model": spec,
        "groups": len(groups),
        "units": groups.total_channels,
        "macs": macs0,
        "removable_share_at_half": round(1 - macs / macs0, 4),
        "predicted_share_at_half": round(1 - predicted / macs0, 4),
        "relative_diff": result.relative_diff,
        "layers_left_whole": len(groups.excluded),
        "reasons": dict(reasons.most_common()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--out", default="benchmarks/results/architectures.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for spec in args.models:
        row = measure(spec)
        print(row, file=sys.stderr)
        rows.append(row)
    write_json(
        args.out,
        {
            "command": command_line("benchmarks/architectures.py", argv),
            "machine": machine_info(),
            "models": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
