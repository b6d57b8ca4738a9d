"""Where onnxruntime reorders tensor layouts in a model's optimised graph, and why.

On x86 onnxruntime runs convolutions in a blocked channel layout (NCHWc, 8 or 16
channels a block) and converts back and forth (``ReorderInput`` /
``ReorderOutput``) around every op that has no blocked kernel. Those conversions
copy whole feature maps, so their time scales with the channels kept, not with
the MACs, and they are part of why a model with fewer MACs is not as much faster
(``benchmarks/RESULTS.md`` section 2).

For each torchvision model (random weights, 224x224, batch 1) this exports the
ONNX graph with compressor's exporter, lets onnxruntime optimise it with every
graph optimisation (the graph it runs), and counts each reorder by the op that
produced its input and the ops that read its output. Writes
``benchmarks/results/layout_reorders.json``.

    .venv/bin/python benchmarks/layout_reorders.py --models efficientnet_b0 mobilenet_v2
    .venv/bin/python benchmarks/layout_reorders.py --models efficientnet_b0 --exporter torchscript
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

from benchmarks.common import command_line, machine_info  # noqa: E402
from compressor.export import export_onnx  # noqa: E402
from compressor.fileio import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REORDERS = ("ReorderInput", "ReorderOutput")


def optimised_graph(path: Path, out: Path) -> onnx.ModelProto:
    """The graph onnxruntime runs on this CPU (all optimisations, one thread)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # the NCHWc "hardware specific" save warning
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(out))


def reorder_contexts(graph: onnx.GraphProto) -> list[dict]:
    """Each kind of reorder by the op that feeds it and the ops that read it, with counts."""
    producer = {out: node for node in graph.node for out in node.output}
    readers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node.op_type)
    counts = collections.Counter()
    for node in graph.node:
        if node.op_type in REORDERS:
            source = producer.get(node.input[0])
            after = tuple(sorted(readers[node.output[0]]))
            counts[(node.op_type, source.op_type if source else "graph input", after)] += 1
    return [
        {"reorder": kind, "after": source, "before": list(after), "count": n}
        for (kind, source, after), n in counts.most_common()
    ]


def study(name: str, exporter: str) -> dict:
    model = torchvision.models.get_model(name, weights=None).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        used = export_onnx(model, torch.randn(1, 3, 224, 224), path, exporters=(exporter,))
        exported = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
        graph = optimised_graph(path, Path(tmp) / "optimised.onnx").graph
    ops = collections.Counter(n.op_type for n in graph.node)
    return {
        "model": name,
        "exporter": used,
        "exported_ops": dict(exported.most_common()),
        "optimised_ops": dict(ops.most_common()),
        "reorders": sum(ops[k] for k in REORDERS),
        "contexts": reorder_contexts(graph),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["efficientnet_b0", "mobilenet_v2"])
    p.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "layout_reorders.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = [study(name, args.exporter) for name in args.models]
    for row in rows:
        print(f"{row['model']} ({row['exporter']}): {row['reorders']} reorders")
        for c in row["contexts"]:
            print(f"  {c['count']:3d} {c['reorder']} after {c['after']}, before {c['before']}")
    out = Path(args.out)
    runs = json.loads(out.read_text()).get("runs", {}) if out.exists() else {}
    runs[args.exporter] = {  # the other exporter's rows are kept
        "command": command_line("benchmarks/layout_reorders.py", argv),
        "machine": machine_info(),
        "models": rows,
    }
    result = {"benchmark": "layout_reorders", "runs": runs}
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
