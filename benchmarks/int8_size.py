"""INT8 file sizes before and after ``export.compact_onnx_graph``: where the bytes of
``model.onnx`` and ``model.int8.onnx`` go, and the float / INT8 size ratio.

Two models: the bundled example's ResNet-20 (``examples/fashion-mnist/model.pt``,
0.27 M parameters, calibrated on 256 of its training images) and torchvision's
resnet18 (random init, 10 classes, 1x3x64x64 input, calibrated on 32 random
inputs), where the graph's fixed overhead weighs less. "before" is each file as
``export_onnx`` and ``quantize_int8`` wrote it before the compaction step (the
exporter's debug metadata dropped, nothing else); "after" is the file as shipped
now. Each compacted file is checked (``onnx.checker``) and run against its
uncompacted twin in onnxruntime on random inputs: ``outputs_identical`` is
``np.array_equal`` of the two.

    .venv/bin/python benchmarks/int8_size.py
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import command_line, machine_info, write_json  # noqa: E402
from compressor import export  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion-mnist"


@contextlib.contextmanager
def without_compaction():
    """``export_onnx`` and ``quantize_int8`` as they were before the compaction step: they
    only dropped the exporter's per-node debug metadata."""
    import onnx_ir as ir

    def drop_debug_metadata(path: Path, *, rename: bool = True) -> None:
        model = ir.load(str(path))
        export._drop_debug_metadata(model)
        ir.save(model, str(path))

    kept = export._compact_onnx_file
    export._compact_onnx_file = drop_debug_metadata
    try:
        yield
    finally:
        export._compact_onnx_file = kept


def anatomy(path: Path) -> dict:
    """Bytes of the file, of its initializers' data, and of the rest (nodes, names, types)."""
    import onnx

    graph = onnx.load(str(path)).graph
    size = export.onnx_size_bytes(path)
    weights = export.onnx_weight_bytes(path)
    return {
        "bytes": size,
        "initializer_data_bytes": weights,
        "other_bytes": size - weights,
        "nodes": len(graph.node),
        "initializers": len(graph.initializer),
        "value_info": len(graph.value_info),
    }


def measure(name: str, model, example, calibration, inputs, work: Path) -> dict:
    files = {}
    for stage in ("before", "after"):
        fp32, static, dynamic = (
            work / f"{name}.{stage}.{k}.onnx" for k in ("fp32", "static", "dynamic")
        )
        with without_compaction() if stage == "before" else contextlib.nullcontext():
            export.export_onnx(model, example, fp32)
            export.quantize_int8(fp32, static, mode="static", calibration=calibration)
            export.quantize_int8(fp32, dynamic, mode="dynamic")
        files[stage] = {"fp32": fp32, "int8_static": static, "int8_dynamic": dynamic}
    row: dict = {"params": sum(p.numel() for p in model.parameters())}
    x = inputs.numpy()
    for kind in ("fp32", "int8_static", "int8_dynamic"):
        before, after = files["before"][kind], files["after"][kind]
        export.check_onnx(after)
        same = np.array_equal(export._OrtModel(before)(x), export._OrtModel(after)(x))
        row[kind] = {"before": anatomy(before), "after": anatomy(after), "outputs_identical": same}
    for kind in ("int8_static", "int8_dynamic"):
        row[f"{kind}_size_x"] = {
            stage: row["fp32"][stage]["bytes"] / row[kind][stage]["bytes"]
            for stage in ("before", "after")
        }
        row[f"{kind}_weights_size_x"] = (
            row["fp32"]["after"]["initializer_data_bytes"]
            / row[kind]["after"]["initializer_data_bytes"]
        )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_size.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    from compressor import checkpoint, data

    splits = data.load_data(EXAMPLE / "data.npz")
    resnet20 = checkpoint.load_checkpoint(
        EXAMPLE / "model.pt", arch="resnet20", in_channels=1
    ).model
    calibration = torch.stack([x for x, _ in data.subset(splits.train, 256, 0)])
    models = {
        "resnet20_fashion_mnist": (resnet20, calibration[:1], calibration, calibration[:64]),
    }
    import torchvision

    resnet18 = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(48, 3, 64, 64)
    models["resnet18_random_64px"] = (resnet18, x[:1], x[:32], x[32:])
    rows = {}
    with tempfile.TemporaryDirectory(prefix="int8-size-") as tmp:
        for name, (model, example, cal, inputs) in models.items():
            rows[name] = row = measure(name, model, example, cal, inputs, Path(tmp))
            print(
                name,
                {k: row["fp32"][k]["bytes"] for k in ("before", "after")},
                {k: row["int8_static"][k]["bytes"] for k in ("before", "after")},
                {k: round(v, 3) for k, v in row["int8_static_size_x"].items()},
            )
    write_json(Path(args.out), {
        "benchmark": "int8_size",
        "command": command_line("benchmarks/int8_size.py", argv),
        "machine": machine_info(),
        "models": rows,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
