"""How many batches BatchNorm recalibration needs (``train.bn_recalibration_batches``).

The bundled example (ResNet-20, Fashion-MNIST) with 30% of every channel group's
units zeroed (smallest norms first, as a budget would) is evaluated on the
5,000-image validation split carved by ``benchmarks/default_command.py``:
without recalibration, then after recalibrating the BatchNorm statistics on
``B`` training batches of 128 for several ``B``, two shuffles each.

Writes ``benchmarks/results/recalibration.json``.

    .venv/bin/python benchmarks/recalibration.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import command_line, machine_info  # noqa: E402
from benchmarks.default_command import carve  # noqa: E402
from benchmarks.train_baseline import DEFAULT_CACHE, DEFAULT_DATA  # noqa: E402
from compressor import train  # noqa: E402
from compressor.checkpoint import load_checkpoint  # noqa: E402
from compressor.data import load_data, make_loaders  # noqa: E402
from compressor.fileio import atomic_write_text  # noqa: E402
from compressor.groups import build_groups  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion-mnist" / "model.pt"
CPU = torch.device("cpu")


def sparse_example(fraction: float) -> torch.nn.Module:
    """The bundled example with ``fraction`` of each group's units (smallest norms) zeroed."""
    model = load_checkpoint(EXAMPLE, arch="resnet20").model
    groups = build_groups(model, torch.randn(1, 1, 28, 28))
    tensors = dict(model.named_parameters())
    keep = []
    for norms in groups.channel_norms(tensors):
        k = int(fraction * len(norms))
        mask = torch.ones(len(norms))
        mask[torch.argsort(norms)[:k]] = 0.0
        keep.append(mask)
    groups.scale_(tensors, keep)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="2,5,10,25,50")
    p.add_argument("--fraction", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recalibration.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = load_data(carve(Path(DEFAULT_DATA), Path(DEFAULT_CACHE), 10000))
    model = sparse_example(args.fraction)
    _, val_loader = make_loaders(splits, batch_size=128, seed=0)
    rows = [{"batches": 0, "seed": None, "accuracy": train.evaluate(model, val_loader, CPU)[0]}]
    for batches in (int(b) for b in args.batches.split(",")):
        for seed in (0, 1):
            recalibrated = copy.deepcopy(model)
            train_loader, _ = make_loaders(splits, batch_size=128, seed=seed)
            train.recalibrate_bn(recalibrated, train_loader, CPU, batches)
            accuracy = train.evaluate(recalibrated, val_loader, CPU)[0]
            rows.append({"batches": batches, "seed": seed, "accuracy": accuracy})
            print(f"{batches} batches, shuffle {seed}: {accuracy:.2f}%", flush=True)
    payload = {
        "benchmark": "recalibration",
        "command": command_line("benchmarks/recalibration.py", argv),
        "machine": machine_info(),
        "zeroed_fraction": args.fraction,
        "runs": rows,
    }
    atomic_write_text(Path(args.out), json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
