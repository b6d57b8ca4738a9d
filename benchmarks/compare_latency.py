"""Time exported models side by side in onnxruntime: the benchmark ResNet-20's baseline
and the compact models of earlier ``compress`` runs (their ``model.onnx``).

Runs are interleaved in one process (``export.measure_latency_stats``), so machine
noise hits every model alike. Each compact model's kept channels per group come from
the ``report.json`` beside it.

    .venv/bin/python benchmarks/compare_latency.py \\
        round_to_1=benchmarks/.cache/default_command_10000/model.onnx \\
        round_to_auto=/tmp/other_cache/default_command_10000/model.onnx
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import command_line, load_average, machine_info, write_json  # noqa: E402
from benchmarks.train_baseline import DEFAULT_CACHE  # noqa: E402
from compressor import export  # noqa: E402
from compressor.models import resnet20  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINE = DEFAULT_CACHE / "resnet20_fmnist_e8_s0_h5000.pt"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="NAME=PATH of a model.onnx")
    p.add_argument("--baseline", default=str(BASELINE), help="the ResNet-20 state_dict")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare_latency.json"))
    args = p.parse_args(argv)
    paths = dict(item.split("=", 1) for item in args.models)
    rows = {}
    for name, path in paths.items():
        report = Path(path).with_name("report.json")
        info = json.loads(report.read_text()) if report.exists() else {}
        rows[name] = {
            "path": path,
            "recipe_prune": (info.get("recipe") or {}).get("prune"),
            "macs_x": (info.get("reduction") or {}).get("macs_x"),
            "channels_kept": [g["after"] for g in info.get("channel_groups", [])],
        }
    with tempfile.TemporaryDirectory() as tmp:
        model = resnet20(num_classes=10, in_channels=1)
        model.load_state_dict(torch.load(args.baseline, map_location="cpu", weights_only=True))
        base = Path(tmp) / "baseline.onnx"
        export.export_onnx(model, torch.zeros(1, 1, 28, 28), base)
        stats = export.measure_latency_stats(
            {"baseline": base, **paths}, (1, 28, 28), batch_sizes=args.batches,
            threads=args.threads, repeats=args.repeats,
        )  # fmt: skip
    result = {"baseline": {f"batch_{b}": s["median_ms"] for b, s in stats["baseline"].items()}}
    for name in paths:
        ms = {f"batch_{b}": s["median_ms"] for b, s in stats[name].items()}
        rows[name]["median_ms"] = ms
        rows[name]["speedup"] = {k: result["baseline"][k] / v for k, v in ms.items()}
        print(name, {k: round(v, 3) for k, v in ms.items()}, rows[name]["channels_kept"])
    print("baseline", {k: round(v, 3) for k, v in result["baseline"].items()})
    write_json(Path(args.out), {
        "benchmark": "compare_latency",
        "command": command_line("benchmarks/compare_latency.py", argv),
        "machine": machine_info(),
        "load_average": load_average(),
        "onnxruntime_threads": args.threads,
        "baseline_ms": result["baseline"],
        "models": rows,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
