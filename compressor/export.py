"""ONNX export, verification against PyTorch, latency measurement and profiling, int8 quantization.

Exporter choice (measured with torch 2.14, opset 18, random-init torchvision
models at 1x3x64x64): the ``torch.export``-based exporter (``dynamo=True``, the
default since torch 2.9) exported resnet18/50, mobilenet_v2, efficientnet_b0,
vgg11_bn, regnet_x_400mf, densenet121, LeNet-style Linear heads and
straight-through binary activations with a dynamic batch axis, all within
2e-6 relative of PyTorch. The legacy TorchScript exporter (``dynamo=False``)
is 3-10x faster but deprecated, and fails on vgg11_bn at 64x64
(``adaptive_avg_pool2d`` to an output size that does not divide the input). So
:func:`export_onnx` uses the dynamo exporter and falls back to TorchScript only
when the dynamo exporter raises.

Weights are always stored inside the single ``.onnx`` file (no external data
file), which limits a model to protobuf's 2 GB; larger models are refused.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import functools
import io
import json
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.errors import BadInputError, CompressorError, VerificationError
from compressor.fileio import atomic_output

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "output"
# protobuf refuses messages of 2 GiB or more; keep a margin for the graph itself.
_MAX_INLINE_BYTES = 2**31 - 64 * 2**20


class ExportError(CompressorError):
    """Neither ONNX exporter could convert the model (exit code 1)."""


# --------------------------------------------------------------------------- export


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` in eval mode; the caller's model is left untouched."""
    return copy.deepcopy(model).to("cpu").eval()


def _model_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def _quiet(what: str) -> Iterator[None]:
    """Capture the exporters' prints and warnings and log them at debug level."""
    out = io.StringIO()
    with (
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(out),
    ):
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                log.debug("%s: %s: %s", what, w.category.__name__, w.message)
            if out.getvalue().strip():
                log.debug("%s output:\n%s", what, out.getvalue().rstrip())


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(exc).__name__}: {msg[:limit]}"


def _export_dynamo(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    program = torch.onnx.export(
        model,
        (x,),
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        verbose=False,
    )
    program.save(str(path), external_data=False)


def _drop_debug_metadata(model) -> None:
    """Clear the exporter's per-node debug metadata (Python stack traces with local file
    paths, FX node text, module scopes): a third of a small model's graph bytes, and
    nothing onnxruntime reads. ``model`` is an ``onnx_ir.Model``."""
    import onnx_ir as ir

    for graph in (model.graph, *model.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            node.metadata_props.clear()
    model.graph.metadata_props.clear()


def _short_names(taken: set[str]) -> Iterator[str]:
    """``a`` ... ``Z``, ``aa``, ``ba`` ...: C identifiers, shortest first, none in ``taken``."""
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    rest = letters + "0123456789_"
    for length in range(1, 8):
        for i in range(len(letters) * len(rest) ** (length - 1)):
            i, first = divmod(i, len(letters))
            name = letters[first]
            for _ in range(length - 1):
                i, j = divmod(i, len(rest))
                name += rest[j]
            if name not in taken:
                yield name
    raise AssertionError("more than 10**12 names")  # pragma: no cover


def _drop_bias_zero_points(graph) -> None:
    """Remove the zero points of ``DequantizeLinear`` nodes (ONNX domain) on int32 tensors
    (the quantized biases) that are constant zeros.

    Exactly equivalent by the ONNX spec: an omitted ``x_zero_point`` is 0, and the input
    ``x``, not the zero point, fixes the integer type. The spec allows more (any all-zero
    DequantizeLinear zero point; an all-zero uint8 QuantizeLinear one, since an omitted
    one means uint8), but onnxruntime (1.32) then no longer fuses a ``Gemm``'s QDQ group
    into ``QGemm`` (measured on ResNet-20): the file would run other kernels. Bias zero
    points are not read by its fusions.
    """
    import onnx_ir as ir

    for node in graph:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        zp = node.inputs[2] if len(node.inputs) == 3 else None
        if (
            zp is not None
            and zp.is_initializer()
            and not zp.is_graph_input()
            and zp.const_value is not None
            and zp.const_value.dtype == ir.DataType.INT32
            and not np.any(zp.const_value.numpy())
        ):
            node.resize_inputs(2)


def _drop_unused_initializers(graph) -> None:
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_input() and not value.is_graph_output():
            graph.initializers.pop(name)


def compact_onnx_graph(model, *, rename: bool = True):
    """A copy of the ``onnx.ModelProto`` ``model`` that carries only what a runtime needs and
    computes exactly the same outputs (``model`` is left unchanged). ``rename=False`` keeps
    every tensor name (the float ``model.onnx``: its weights keep the layer names the report
    and the user's tools read) and drops the rest.

    - ``value_info`` is dropped (intermediate shapes and types: shape inference, which
      onnxruntime and ``onnx.checker`` run anyway, recomputes them);
    - node names, doc strings and metadata (:func:`_drop_debug_metadata`), graph and
      model doc strings and model metadata are dropped;
    - every tensor name but the main graph's inputs and outputs (which callers bind by)
      becomes a short unique one (``a`` ... ``Z``, ``aa`` ...): the quantizer's names
      such as ``layer1.0.conv1.weight_bias_quantized_scale`` were most of an INT8
      model's graph bytes;
    - the quantized biases' zero points, all zero, are dropped (the ONNX default; see
      :func:`_drop_bias_zero_points`), and so are initializers that nothing reads;
    - opset imports of domains no node uses are dropped.

    Local functions are left as they are. The caller checks the result with
    ``onnx.checker`` (see :func:`quantize_int8`).
    """
    import onnx
    import onnx_ir as ir

    proto = onnx.ModelProto()
    proto.CopyFrom(model)  # the IR model shares its tensors' protos, which renaming edits
    m = ir.serde.deserialize_model(proto)
    _drop_debug_metadata(m)
    graphs = list(m.graphs())
    for graph in graphs:
        _drop_bias_zero_points(graph)
        _drop_unused_initializers(graph)
        for node in graph:
            node.name = None
            node.doc_string = None
        graph.doc_string = None
    m.doc_string = None
    m.metadata_props.clear()

    if rename:
        _rename_values(m, graphs)
    used = (
        {""}
        | {n.domain for g in graphs for n in g}
        | {n.domain for f in m.functions.values() for n in f}
    )
    for domain in [d for d in m.opset_imports if d not in used]:
        del m.opset_imports[domain]

    out = ir.serde.serialize_model(m)
    _clear_value_info(out.graph)
    return out


def _rename_values(m, graphs) -> None:
    """Short unique names for every tensor but the main graph's inputs and outputs."""
    import onnx_ir as ir

    keep = {v.name for v in (*m.graph.inputs, *m.graph.outputs)}
    values: dict[int, ir.Value] = {}  # each value once, in graph order
    for graph in graphs:
        for value in (*graph.inputs, *graph.initializers.values()):
            values[id(value)] = value
        for node in graph:
            values.update((id(v), v) for v in node.outputs)
        values.update((id(v), v) for v in graph.outputs)
    rename = [v for v in values.values() if v.name and v.name not in keep]  # "": output left out
    names = _short_names({v.name for v in values.values() if v.name is not None})
    for value in rename:
        value.name = next(names)
        value.doc_string = None
        value.metadata_props.clear()


def _clear_value_info(graph) -> None:
    """Drop ``value_info`` from a ``GraphProto`` and from every subgraph in it."""
    del graph.value_info[:]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                _clear_value_info(attr.g)
            for g in attr.graphs:
                _clear_value_info(g)


def _compact_onnx_file(path: Path, *, rename: bool = True) -> None:
    """:func:`compact_onnx_graph` on the ONNX file at ``path``, rewritten in place."""
    import onnx

    onnx.save(compact_onnx_graph(onnx.load(str(path)), rename=rename), str(path))


def _export_torchscript(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        do_constant_folding=True,
    )


_EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    exporters: Sequence[str] = ("dynamo", "torchscript"),
) -> str:
    """Export ``model`` (a CPU copy in eval mode) to one ``.onnx`` file at ``path``.

    The graph has one input ``input`` and one output ``output``, both with a
    dynamic batch axis (axis 0), and carries only what a runtime needs and the layer
    names of its weights (:func:`compact_onnx_graph` without renaming: no exporter
    metadata, ``value_info``, node names or doc strings). The file is written atomically: a reader sees either the previous file or
    the complete new one. ``exporters`` are tried in order (see the module docstring);
    returns the name of the one that worked.

    Raises :class:`BadInputError` for a model over 2 GB (not supported: weights
    stay inside the file) and :class:`ExportError` when every exporter fails.
    """
    unknown = [e for e in exporters if e not in _EXPORTERS]
    if unknown or not exporters:
        raise BadInputError(
            f"`exporters` must be a non-empty list of {sorted(_EXPORTERS)}. Got {list(exporters)} instead."
        )
    if not isinstance(example_input, torch.Tensor):
        raise BadInputError(
            f"`example_input` must be a torch.Tensor. Got {type(example_input).__name__} instead."
        )
    size = _model_bytes(model)
    if size >= _MAX_INLINE_BYTES:
        raise BadInputError(
            f"The model has {size / 2**30:.2f} GiB of weights; a single-file ONNX model must stay "
            "under 2 GB (protobuf limit) and external data files are not supported."
        )
    cpu_model = _cpu_eval_copy(model)
    x = example_input.detach().to("cpu")
    if x.shape[0] == 1:  # torch.export specialises a dimension of size 1 to a constant
        x = x.expand(2, *x.shape[1:]).contiguous()  # (torchvision's ViT: its class token)
    errors = []
    with atomic_output(path) as tmp, torch.no_grad():
        for name in exporters:
            try:
                with _quiet(f"{name} exporter"):
                    _EXPORTERS[name](cpu_model, x, tmp, opset)
            except Exception as exc:  # exporters raise many types; try the next one
                log.debug("%s exporter failed", name, exc_info=True)
                errors.append(f"{name}: {_first_line(exc)}")
                continue
            _compact_onnx_file(tmp, rename=False)
            if errors:
                log.warning(
                    "ONNX export fell back to the %s exporter (%s)", name, "; ".join(errors)
                )
            log.debug("exported %s with the %s exporter", path, name)
            return name
        raise ExportError("ONNX export failed. " + " | ".join(errors))
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- inspect


def check_onnx(path: str | os.PathLike) -> None:
    """Run ``onnx.checker.check_model(path, full_check=True)`` (includes shape inference).

    Raises :class:`VerificationError` when the file is missing, unreadable or invalid.
    """
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, protobuf errors
        raise VerificationError(f"ONNX checker rejected {path}: {_first_line(exc, 500)}") from exc


def _load_graph_only(path: str | os.PathLike):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def onnx_weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of the model's weights alone: every initializer's data (main graph), without
    the graph's nodes and names, which quantization does not shrink."""
    import onnx

    model = _load_graph_only(path)  # dims and types are enough
    total = 0
    for init in model.graph.initializer:
        n = math.prod(init.dims)
        total += n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


def onnx_size_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of the ONNX model, including any external data files it references."""
    path = Path(path)
    total = path.stat().st_size
    model = _load_graph_only(path)
    files = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                files.add(entry.value)
    for name in files:
        data = path.parent / name
        if data.exists():
            total += data.stat().st_size
    return total


def onnx_op_types(path: str | os.PathLike) -> set[str]:
    """All operator types in the model: main graph, subgraphs and local functions."""
    model = _load_graph_only(path)
    ops: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            ops.add(node.op_type)
            for attr in node.attribute:
                if attr.HasField("g"):
                    visit(attr.g.node)
                for g in attr.graphs:
                    visit(g.node)

    visit(model.graph.node)
    for fn in model.functions:
        visit(fn.node)
    return ops


# --------------------------------------------------------------------------- onnxruntime


class _OrtModel:
    """An onnxruntime CPU session on one ONNX file, fed through its (single) input.

    All sessions share the same options: errors-only logging, sequential
    execution and, when ``threads`` is given, that many intra-op threads and one
    inter-op thread (otherwise onnxruntime's defaults). With ``profile_prefix``,
    onnxruntime records every node's run time (see :func:`op_profile`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int | None = None,
        profile_prefix: str | os.PathLike | None = None,
    ) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only
        if profile_prefix is not None:  # per-node timings, written by ``end_profiling()``
            opts.enable_profiling = True
            opts.profile_file_prefix = str(profile_prefix)
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The model's first output for the batch ``x``."""
        return self.session.run(None, {self.input_name: x})[0]

    def bind(self, x: np.ndarray) -> Callable[[], list]:
        """A call without arguments that runs the batch ``x``; the feed is built once, here,
        so that timing the call times ``InferenceSession.run`` alone."""
        return functools.partial(self.session.run, None, {self.input_name: x})


# --------------------------------------------------------------------------- verify


def onnx_runner(path: str | os.PathLike, threads: int | None = None) -> Callable:
    """The ONNX model at ``path`` as a function of one input batch (a float32 numpy array)
    giving its first output, in onnxruntime on the CPU."""
    return _OrtModel(path, threads)


def _batches(inputs, batch_size: int, max_samples: int | None) -> Iterator[torch.Tensor]:
    """Yield input tensors from a tensor (split in batches) or an iterable of batches.

    Items of an iterable may be tensors or ``(x, y, ...)`` tuples (a DataLoader).
    """
    if isinstance(inputs, torch.Tensor):
        source: Iterable = torch.split(inputs, batch_size)
    else:
        source = inputs
    seen = 0
    for item in source:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise BadInputError(f"verification inputs must be tensors. Got {type(x).__name__}.")
        if max_samples is not None:
            x = x[: max_samples - seen]
        if len(x) == 0:
            break
        seen += len(x)
        yield x
        if max_samples is not None and seen >= max_samples:
            break


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: torch.Tensor | Iterable,
    *,
    batch_size: int = 64,
    max_samples: int | None = None,
) -> dict:
    """Compare ``model`` (a CPU copy in eval mode; inputs as float32) with the ONNX file in onnxruntime.

    ``inputs`` is a tensor (split into ``batch_size`` batches) or an iterable of
    batches (tensors or ``(x, y)`` tuples). Returns a dict:

    - ``torch_vs_onnxruntime_max_abs``: max |torch - onnxruntime| over all outputs;
    - ``relative_max_abs``: that divided by max |torch output| (0 when both are 0);
    - ``top1_agreement``: fraction (0..1) of samples whose argmax agrees;
    - ``samples``: the number of samples compared.

    PyTorch runs on CPU on purpose: on a GPU, TF32 convolutions alone differ by ~1e-3.
    """
    cpu_model = _cpu_eval_copy(model)
    onnx_model = _OrtModel(path)
    max_abs = 0.0
    ref_max = 0.0
    agree = 0
    n = 0
    finite = True
    with torch.no_grad():
        for x in _batches(inputs, batch_size, max_samples):
            x = x.detach().to("cpu", torch.float32)
            ref = cpu_model(x).numpy()
            got = onnx_model(x.numpy())
            if got.shape != ref.shape:
                raise VerificationError(
                    f"ONNX output shape {tuple(got.shape)} differs from PyTorch's {tuple(ref.shape)}."
                )
            ref2 = ref.reshape(len(ref), -1)
            got2 = got.reshape(len(got), -1)
            finite = finite and bool(np.isfinite(ref2).all() and np.isfinite(got2).all())
            max_abs = max(max_abs, float(np.max(np.abs(got2 - ref2), initial=0.0)))
            ref_max = max(ref_max, float(np.max(np.abs(ref2), initial=0.0)))
            agree += int((got2.argmax(axis=1) == ref2.argmax(axis=1)).sum())
            n += len(ref2)
    if n == 0:
        raise BadInputError("verify_onnx needs at least one input sample. Got none.")
    if not finite:
        max_abs = rel = float("nan")
    elif ref_max > 0:
        rel = max_abs / ref_max
    else:
        rel = 0.0 if max_abs == 0 else float("inf")
    return {
        "torch_vs_onnxruntime_max_abs": max_abs,
        "relative_max_abs": rel,
        "top1_agreement": agree / n,
        "samples": n,
    }


def verify_or_raise(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: torch.Tensor | Iterable,
    *,
    tolerance: float = 1e-4,
    min_top1_agreement: float = 1.0,
    batch_size: int = 64,
    max_samples: int | None = None,
) -> dict:
    """:func:`verify_onnx`, then raise :class:`VerificationError` (exit 4) when it fails.

    Fails when ``relative_max_abs > tolerance`` (or is not finite) or when
    ``top1_agreement < min_top1_agreement``. Binary (step) activations can flip
    a unit whose pre-activation is within float rounding of 0, so a caller with
    such a model may relax both numbers. Returns the metrics on success.
    """
    m = verify_onnx(model, path, inputs, batch_size=batch_size, max_samples=max_samples)
    problems = []
    if not m["relative_max_abs"] <= tolerance:  # also catches NaN
        problems.append(
            f"relative max abs difference {m['relative_max_abs']:.3g} > tolerance {tolerance:g} "
            f"(max abs {m['torch_vs_onnxruntime_max_abs']:.3g})"
        )
    if m["top1_agreement"] < min_top1_agreement:
        problems.append(
            f"top-1 agreement {m['top1_agreement']:.4f} < {min_top1_agreement:g} "
            f"({round((1 - m['top1_agreement']) * m['samples'])} of {m['samples']} samples differ)"
        )
    if problems:
        raise VerificationError(
            f"ONNX model {path} disagrees with PyTorch on {m['samples']} samples: "
            + "; ".join(problems)
        )
    return m


# --------------------------------------------------------------------------- latency


def measure_latency_stats(
    paths: Mapping[str, str | os.PathLike],
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, dict[int, dict[str, float]]]:
    """Time onnxruntime CPU inference; returns ``{name: {batch: {median_ms, p90_ms, min_ms, n}}}``.

    ``input_shape`` is one sample's shape, without the batch axis (e.g. ``(3, 32, 32)``).
    All sessions are created up front with the same options (``threads`` intra-op
    threads, or onnxruntime's default), then runs are interleaved (A, B, B, A,
    A, B ...: the order alternates) so machine noise hits every model alike.
    """
    if not paths:
        raise BadInputError("measure_latency needs at least one model path. Got none.")
    if repeats < 1 or warmup < 0:
        raise BadInputError(f"`repeats` must be >= 1 and `warmup` >= 0. Got {repeats}, {warmup}.")
    names = list(paths)
    models = {k: _OrtModel(paths[k], threads) for k in names}
    rng = np.random.default_rng(seed)
    result: dict[str, dict[int, dict[str, float]]] = {k: {} for k in names}
    for batch in batch_sizes:
        x = rng.standard_normal((int(batch), *map(int, input_shape))).astype(np.float32)
        runs = {k: models[k].bind(x) for k in names}
        for _ in range(warmup):
            for k in names:
                runs[k]()
        times: dict[str, list[float]] = {k: [] for k in names}
        for r in range(repeats):
            for k in names if r % 2 == 0 else reversed(names):
                t0 = time.perf_counter()
                runs[k]()
                times[k].append((time.perf_counter() - t0) * 1e3)
        for k in names:
            ts = sorted(times[k])
            result[k][int(batch)] = {
                "median_ms": statistics.median(ts),
                "p90_ms": ts[min(len(ts) - 1, int(np.ceil(0.9 * len(ts))) - 1)],
                "min_ms": ts[0],
                "n": len(ts),
            }
    return result


def measure_latency(
    paths: Mapping[str, str | os.PathLike],
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
) -> dict[str, dict[int, float]]:
    """Median onnxruntime CPU latency in ms: ``{name: {batch: ms}}``.

    See :func:`measure_latency_stats` (same arguments) for p90 and the method.
    """
    stats = measure_latency_stats(
        paths,
        input_shape,
        batch_sizes=batch_sizes,
        warmup=warmup,
        repeats=repeats,
        threads=threads,
    )
    return {k: {b: s["median_ms"] for b, s in v.items()} for k, v in stats.items()}


def _conv_kind(args: Mapping) -> str:
    """``depthwise conv``, ``1x1 conv`` or ``KxK conv`` from a profiled Conv's input shapes."""
    shapes = [next(iter(d.values())) for d in args.get("input_type_shape", [])]
    if len(shapes) < 2 or len(shapes[1]) != 4:
        return "conv"
    x, w = shapes[0], shapes[1]
    in_ch = x[1] * (x[4] if len(x) == 5 else 1)  # NCHWc inputs are (N, C/b, H, W, b)
    if w[1] == 1 and w[0] >= in_ch > 1:  # one input channel per group: group == channels
        return "depthwise conv"
    return "1x1 conv" if w[2] == w[3] == 1 else f"{w[2]}x{w[3]} conv"


def _op_kind(event: Mapping) -> str:
    """The kind of op a profiled node is: its op type, with convolutions split by shape and
    kernel layout, and onnxruntime's layout conversions named ``layout reorder``."""
    op = event["args"].get("op_name", "?")
    if op in ("Conv", "FusedConv"):
        layout = "NCHWc" if "_nchwc" in event["name"] else "plain NCHW"
        return f"{_conv_kind(event['args'])} ({layout})"
    if op in ("ReorderInput", "ReorderOutput"):
        return "layout reorder"
    return op


def op_profile(
    path: str | os.PathLike,
    input_shape: Sequence[int],
    *,
    batch: int = 1,
    runs: int = 5,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """onnxruntime's own per-node run times, summed per kind of op: ``{kind: ms per run}``,
    slowest first.

    The session has :func:`measure_latency_stats`'s options. One warm-up run on a random
    batch of ``batch`` samples of ``input_shape`` is dropped, then each kind's time is its
    median over ``runs`` runs (robust to a busy machine's slow runs); their sum is the time a
    run spends in nodes, close to its latency (profiling adds a little to each node).

    Kinds are onnxruntime's op types after its graph optimisations (an activation fused
    into a convolution counts as the convolution), with convolutions split by shape
    (``depthwise conv``, ``1x1 conv``, ``3x3 conv`` ...) and kernel: ``(NCHWc)``, MLAS's
    blocked-layout kernels (channel counts padded up to the block size, 8 with AVX2
    and 16 with AVX-512), or ``(plain NCHW)``; ``layout reorder`` is the
    conversion to and from the blocked layout. The profile file is written into a
    temporary folder, deleted before returning.
    """
    if runs < 1 or batch < 1:
        raise BadInputError(f"`runs` and `batch` must be >= 1. Got {runs}, {batch}.")
    x = np.random.default_rng(seed).standard_normal((int(batch), *map(int, input_shape)))
    with tempfile.TemporaryDirectory(prefix="compressor-profile-") as tmp:
        model = _OrtModel(path, threads, profile_prefix=Path(tmp) / "ort")
        run = model.bind(x.astype(np.float32))
        for _ in range(runs + 1):
            run()
        events = json.loads(Path(model.session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    per_run: list[dict[str, float]] = [{} for _ in starts]  # kind -> ms, per run
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            kinds = per_run[bisect.bisect_right(starts, e["ts"]) - 1]
            kind = _op_kind(e)
            kinds[kind] = kinds.get(kind, 0.0) + e["dur"] / 1e3
    per_run = per_run[1:]  # without the warm-up run
    medians = {k: statistics.median(r.get(k, 0.0) for r in per_run) for k in set().union(*per_run)}
    return {k: round(v, 4) for k, v in sorted(medians.items(), key=lambda kv: -kv[1])}


# --------------------------------------------------------------------------- quantize

INT8_MODES = ("static", "dynamic")
CALIBRATION_BATCH = 32


class CalibrationReader:
    """onnxruntime's ``CalibrationDataReader`` over float32 batches (``get_next``, ``rewind``).

    A virtual subclass of ``onnxruntime.quantization.CalibrationDataReader`` (its
    ``__subclasshook__`` accepts any class with ``get_next``), so this module can be
    imported without loading onnxruntime's quantization package.
    """

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self.input_name = input_name
        self.batches = list(batches)
        self.samples = sum(len(b) for b in self.batches)
        self._next = 0

    def get_next(self) -> dict | None:
        if self._next >= len(self.batches):
            return None
        self._next += 1
        return {self.input_name: self.batches[self._next - 1]}

    def rewind(self) -> None:
        self._next = 0


def _prepare_for_quantization(path: Path, work: Path) -> Path:
    """``quant_pre_process`` (shape inference, onnxruntime's graph optimisations such as
    Conv+BatchNorm folding) into ``work``; the model as it is when that fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "preprocessed.onnx"
    try:
        with _quiet("quant_pre_process"):
            quant_pre_process(str(path), str(pre))
        return pre
    except Exception as exc:  # symbolic shape inference refuses some graphs
        log.info("quantization pre-processing skipped (%s)", _first_line(exc))
        return path


def _calibration_reader(path, calibration) -> CalibrationReader:
    if isinstance(calibration, np.ndarray):
        calibration = torch.from_numpy(calibration)
    batches = []
    for x in _batches(calibration if calibration is not None else [], CALIBRATION_BATCH, None):
        batches.append(x.detach().to("cpu", torch.float32).numpy())
    if not batches:
        raise BadInputError("static int8 quantization needs calibration inputs. Got none.")
    return CalibrationReader(_load_graph_only(path).graph.input[0].name, batches)


def quantize_int8(
    path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    mode: str = "dynamic",
    calibration: torch.Tensor | np.ndarray | Iterable | None = None,
) -> dict:
    """Quantize the ONNX model at ``path`` to int8 and write it (atomically) to ``out_path``.

    ``static``: ``quantize_static`` in QDQ format, per-channel int8 weights, uint8
    activations whose ranges (MinMax) come from running ``calibration`` through the
    float model: input batches (a tensor or array of samples, or an iterable of
    tensors or ``(x, y)`` tuples) preprocessed exactly as the model's input.
    ``dynamic``: ``quantize_dynamic``, per-channel uint8 weights, activations
    quantized at run time. The float model is first prepared with
    ``quant_pre_process``, and the result is compacted with :func:`compact_onnx_graph`
    (what it drops, mostly the quantizer's long tensor names and ``value_info``, was 10%
    of the bundled ResNet-20's INT8 file and 32% of that of its compact model at 2x fewer
    MACs). Accuracy is not checked here: see :func:`compare_onnx`.

    Static weights use 7 bits (``reduce_range``): on x86 CPUs with AVX2 or AVX-512
    but no VNNI, onnxruntime multiplies uint8 by int8 with ``VPMADDUBSW``, whose
    int16 sums saturate with full-range weights (measured: a LeNet went from 100%
    to 80% top-1; the bundled ResNet-20 lost 0.7 points, 0.1 with 7 bits). Dynamic
    weights are uint8: onnxruntime's ``ConvInteger`` with int8 weights is 3x slower
    than with uint8 on such CPUs (and slower than the float model).
    Returns ``{"mode", "calibration_samples"}`` (None for dynamic).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode not in INT8_MODES:
        raise BadInputError(f"`mode` must be one of {INT8_MODES}. Got {mode!r} instead.")
    reader = _calibration_reader(path, calibration) if mode == "static" else None
    with tempfile.TemporaryDirectory(prefix="compressor-int8-") as work:
        source = str(_prepare_for_quantization(Path(path), Path(work)))
        with atomic_output(out_path) as tmp, _quiet(f"quantize_{mode}"):
            if reader is None:
                quantize_dynamic(source, str(tmp), per_channel=True, weight_type=QuantType.QUInt8)
            else:
                quantize_static(
                    source,
                    str(tmp),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    reduce_range=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                )
            _compact_onnx_file(tmp)
    return {"mode": mode, "calibration_samples": reader.samples if reader else None}


def compare_onnx(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    inputs: torch.Tensor | Iterable,
    *,
    batch_size: int = 64,
) -> dict:
    """Top-1 and outputs of two ONNX models on the same inputs, in onnxruntime.

    ``inputs``: a tensor (split into ``batch_size`` batches) or an iterable of
    tensors or ``(x, y)`` tuples. Returns ``{"reference_accuracy", "accuracy"}``
    (percent; None without labels), ``top1_agreement`` (0..1: the argmax of each
    sample's flattened outputs agrees), ``output_relative_error`` (``||candidate -
    reference|| / ||reference||`` over all outputs: what compares models whose outputs
    are not class scores, such as a detector's raw head) and ``samples``.
    """
    ref_model, cand_model = _OrtModel(reference), _OrtModel(candidate)
    if isinstance(inputs, torch.Tensor):
        inputs = torch.split(inputs, batch_size)
    n = agree = ref_correct = correct = 0
    diff_sq = ref_sq = 0.0
    labelled = True
    for item in inputs:
        x = item[0] if isinstance(item, (tuple, list)) else item
        y = item[1] if isinstance(item, (tuple, list)) and len(item) > 1 else None
        x = x.detach().to("cpu", torch.float32).numpy()
        ref_out = ref_model(x).reshape(len(x), -1).astype(np.float64)
        got_out = cand_model(x).reshape(len(x), -1).astype(np.float64)
        diff_sq += float(np.square(got_out - ref_out).sum())
        ref_sq += float(np.square(ref_out).sum())
        ref, got = ref_out.argmax(axis=1), got_out.argmax(axis=1)
        agree += int((ref == got).sum())
        if y is None:
            labelled = False
        else:
            y = np.asarray(y).reshape(-1)
            ref_correct += int((ref == y).sum())
            correct += int((got == y).sum())
        n += len(x)
    if n == 0:
        raise BadInputError("compare_onnx needs at least one input sample. Got none.")
    return {
        "reference_accuracy": 100.0 * ref_correct / n if labelled else None,
        "accuracy": 100.0 * correct / n if labelled else None,
        "top1_agreement": agree / n,
        "output_relative_error": math.sqrt(diff_sq / ref_sq) if ref_sq else math.sqrt(diff_sq),
        "samples": n,
    }
