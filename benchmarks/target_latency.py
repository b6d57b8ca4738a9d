"""``--target-latency``: does the compressed model land at the asked latency on this machine?

For torchvision's mobilenet_v2 (random weights, ``num_classes=10``, 3x224x224, batch 1
by default) this script:

1. measures the baseline's onnxruntime latency in this process and asks ``compress``
   for each of ``--fractions`` of it (``--target-latency MS``), with a few training
   steps on random images (the latency depends on the channel counts the budget
   chooses, not on the accuracy, so the accuracy gate is off);
2. reads what the report says: the latency the latency model predicted for the zero
   set, and the latency measured after export side by side with the baseline;
3. measures ``model.onnx`` again **in a fresh process**, side by side with the
   baseline's ONNX model, and records how far that lands from the asked latency.

The goal: within 10% of the asked latency in the fresh process. Absolute times on a
shared machine drift between minutes, so the record also gives the fresh speedup over
the baseline measured beside it, applied to the baseline latency the target was asked
from (``fresh_drift_corrected_vs_asked``).

    .venv/bin/python benchmarks/target_latency.py                   # mobilenet_v2, 224x224
    .venv/bin/python benchmarks/target_latency.py --quick           # resnet18 at 64x64
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

import compressor  # noqa: E402
from benchmarks.common import command_line, load_average, machine_info, write_json  # noqa: E402
from compressor import export  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.target_latency")

FRESH = """
import json, sys
from compressor import export
paths, shape, batch = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
ms = export.measure_latency(paths, shape, batch_sizes=(batch,), repeats=int(sys.argv[4]),
                            threads=int(sys.argv[5]))
print(json.dumps({k: v[batch] for k, v in ms.items()}))
"""


def fresh_latency(paths: dict, shape, batch: int, threads: int, repeats: int = 60) -> dict:
    """Median ms of each ONNX model, measured side by side in a new Python process."""
    out = subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps({k: str(v) for k, v in paths.items()}),
         json.dumps(list(shape)), str(batch), str(repeats), str(threads)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_inputs(work: Path, arch: str, side: int, images: int) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    checkpoint = work / f"{arch}.pt"
    torch.save(model.state_dict(), checkpoint)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, 3, side, side), dtype=np.uint8)
    y = rng.integers(0, 10, images)
    data = work / "data.npz"
    half = images // 2
    np.savez(data, x_train=x[:half], y_train=y[:half], x_val=x[half:], y_val=y[half:])
    return checkpoint, data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="mobilenet_v2")
    p.add_argument("--side", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    p.add_argument("--steps", type=int, default=4, help="training steps per run")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--quick", action="store_true", help="resnet18 at 64x64, one fraction")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "target_latency.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.side, args.fractions = "resnet18", 64, [0.6]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    shape = (3, args.side, args.side)
    rows = []
    with tempfile.TemporaryDirectory(prefix="target-latency-") as tmp:
        work = Path(tmp)
        checkpoint, data = make_inputs(work, args.arch, args.side, images=32)
        base_onnx = work / "baseline.onnx"
        model = getattr(torchvision.models, args.arch)(num_classes=10)
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        export.export_onnx(model, torch.zeros(1, *shape), base_onnx)
        base_ms = export.measure_latency(
            {"b": base_onnx}, shape, batch_sizes=(args.batch,), threads=args.threads
        )
        base_ms = base_ms["b"][args.batch]
        for fraction in args.fractions:
            asked = fraction * base_ms
            out = work / f"run_{fraction:g}"
            report = compressor.compress(
                str(checkpoint), arch=args.arch, data=str(data), out=out, device="cpu",
                target_latency=asked, latency_batch=args.batch,
                overrides=["train.epochs=1", f"train.max_steps_per_epoch={args.steps}",
                           "train.batch_size=8", "train.bn_recalibration_batches=1",
                           "gates.max_accuracy_drop=null", "export.verify_samples=4",
                           f"export.latency_threads={args.threads}"],
            )  # fmt: skip
            (entry,) = report["target"]["targets"]
            fresh = fresh_latency({"baseline": base_onnx, "compressed": out / "model.onnx"},
                                  shape, args.batch, args.threads)  # fmt: skip
            row = {
                "fraction": fraction,
                "asked_ms": asked,
                "predicted_ms": entry["predicted_ms"],
                "report_ms": entry["reached_ms"],
                "report_baseline_ms": entry["baseline_ms"],
                "fresh_ms": fresh["compressed"],
                "fresh_baseline_ms": fresh["baseline"],
                "fresh_vs_asked": fresh["compressed"] / asked,
                "within_10pct": abs(fresh["compressed"] / asked - 1) <= 0.1,
                # the same, with machine drift taken out: the fresh speedup over the baseline
                # measured beside it, applied to the baseline latency the target was asked from
                "fresh_drift_corrected_vs_asked": fresh["compressed"]
                / fresh["baseline"]
                * base_ms
                / asked,
                "macs_x": report["reduction"]["macs_x"],
                "latency_model": entry["model"],
                "exit_code": report["exit_code"],
                "timings_s": report["timings_s"],
            }
            log.info(
                "%s", {k: v for k, v in row.items() if k not in ("latency_model", "timings_s")}
            )
            rows.append(row)
    write_json(Path(args.out), {
        "benchmark": "target_latency",
        "command": command_line("benchmarks/target_latency.py", argv),
        "machine": machine_info(),
        "load_average": load_average(),
        "arch": args.arch, "input_shape": list(shape), "batch": args.batch,
        "onnxruntime_threads": args.threads,
        "baseline_ms_before": base_ms,
        "runs": rows,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
