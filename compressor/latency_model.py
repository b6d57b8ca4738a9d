"""A latency model of the exported network on this machine, for ``--target-latency``.

The budget needs the latency of every candidate zero set, many times a step, so
it cannot export and time each one. It asks this model instead, calibrated once
before training from real onnxruntime timings on this machine:

1. **Per layer.** Every conv and linear layer is exported alone (one ``Conv`` or
   ``MatMul`` node, its own kernel, stride, groups and input size, at the latency
   batch) at a few widths ``p`` (both channel counts times ``p``) and timed;
   the time of an empty model (the per-call overhead) is taken off. A zero set
   that leaves a layer the shares ``keep_in`` and ``keep_out`` of its channels
   costs the layer's time at ``p = sqrt(keep_in keep_out)`` (its MACs share;
   ``keep_out`` for a depthwise conv), interpolated between the timed widths.
2. **The rest** (activations, adds, pooling, layout reorders) is the whole
   model's measured time minus the layers' sum, scaled by the share of the
   layers' output elements that is kept.
3. **Mapped onto the real graph.** The compact models with every group cut to
   :data:`CHECK_WIDTHS` of its units are exported and timed side by side with the
   baseline; the layer-wise sum ``R`` is mapped to measured milliseconds by the
   monotone piecewise-linear function through those points ``(R, ms)``. That
   absorbs what isolated layers miss: fused activations, layout reorders shared
   between layers, and kernel changes with the width (measured on the bundled
   ResNet-20 at batch 16: 8.6 ms at 5/8 of the channels, 4.1 ms at 1/2).
4. **Checked on the zero set itself.** Before the budget freezes its zero set it
   times the compact model that set leaves, beside the baseline
   (:func:`time_zero_set`), and adds that reading as one more point
   (:meth:`LatencyModel.add_probe`), in the calibration's time scale: the reading
   times the calibration's baseline over the baseline timed beside it, so a
   machine that runs faster or slower now than during calibration does not
   shift the map.

The model is monotone in every group's kept units, so the budget's bisection on
the group threshold stays valid. The report measures the latency reached on the
exported compact model, side by side with the baseline.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compressor.groups import ChannelGroups

log = logging.getLogger(__name__)

WIDTHS = (1.0, 0.75, 0.5, 0.25)  # the shares of a layer's channels that are timed
CHECK_WIDTHS = (0.75, 0.5, 0.375, 0.25)  # the real compact models timed, as shares kept


@dataclass(frozen=True)
class LayerTiming:
    """One layer's onnxruntime time (ms, overhead taken off) at each of ``widths``."""

    widths: tuple[float, ...]  # descending
    ms: tuple[float, ...]
    out_elements: int  # output elements per sample: the rest's weight for this layer

    def at(self, p: float) -> float:
        """Linear interpolation in ``p`` (0 at ``p = 0``), monotone by construction."""
        w, t = (*self.widths, 0.0), (*self.ms, 0.0)
        for i in range(len(w) - 1):
            if p >= w[i + 1]:
                span = w[i] - w[i + 1]
                frac = (p - w[i + 1]) / span if span > 0 else 1.0
                return t[i + 1] + frac * (t[i] - t[i + 1])
        return 0.0


def _layer_sum(
    groups: ChannelGroups,
    layers: dict[str, LayerTiming],
    rest_ms: float,
    keep: dict[str, tuple[float, float]],
) -> float:
    """The layer-wise sum ``R`` at the kept shares ``keep`` (layer: (in, out)): each layer's
    time at its width plus ``rest_ms`` scaled by the share of output elements kept."""
    total, kept_elements, all_elements = 0.0, 0.0, 0
    for name, timing in layers.items():
        keep_in, keep_out = keep.get(name, (1.0, 1.0))
        p = keep_out if groups.layers[name].depthwise else math.sqrt(max(keep_in * keep_out, 0.0))
        total += timing.at(p)
        kept_elements += keep_out * timing.out_elements
        all_elements += timing.out_elements
    return total + rest_ms * kept_elements / (all_elements or 1)


class LatencyModel:
    """Predicted onnxruntime latency (ms) of the compact model a zero set leaves."""

    def __init__(
        self,
        groups: ChannelGroups,
        layers: dict[str, LayerTiming],
        *,
        base_ms: float,
        rest_ms: float,
        measured: Sequence[tuple[float, float, float]] = (),
        probed: Sequence[tuple[float, float, float]] = (),
        batch: int = 1,
    ):
        self.groups = groups
        self.layers = layers
        self.base_ms = float(base_ms)  # measured whole-model latency, nothing removed
        self.rest_ms = float(rest_ms)
        self.batch = int(batch)
        # (share kept, layer-wise sum R, measured ms) of the real compact models
        self.measured = [tuple(map(float, m)) for m in measured]
        # (R, predicted ms, measured ms) of the budget's zero sets, timed during training
        self.probed = [tuple(map(float, m)) for m in probed]
        self._fit()

    def _fit(self) -> None:
        self._points = _monotone_points(
            [(self._raw({name: (1.0, 1.0) for name in self.layers}), self.base_ms)]
            + [(r, ms) for _, r, ms in self.measured]
            + [(r, ms) for r, _, ms in self.probed]
        )

    def _raw(self, keep: dict[str, tuple[float, float]]) -> float:
        return _layer_sum(self.groups, self.layers, self.rest_ms, keep)

    def raw(self, zero_masks: Sequence[torch.Tensor]) -> float:
        """The layer-wise sum ``R`` (ms of isolated layers plus the scaled rest)."""
        return self._raw(self.groups.layer_keep(zero_masks))

    def predict(self, zero_masks: Sequence[torch.Tensor]) -> float:
        """The latency (ms) at the latency batch once the ``zero_masks`` units are removed."""
        return _interpolate(self._points, self.raw(zero_masks))

    def add_probe(
        self, zero_masks: Sequence[torch.Tensor], measured_ms: float, baseline_ms: float
    ) -> tuple[float, float]:
        """Add the compact model of ``zero_masks``, timed at ``measured_ms`` beside a baseline
        timed at ``baseline_ms``, as a point of the map (scaled to the calibration's baseline);
        returns (predicted, measured) ms, both on the calibration's scale."""
        predicted = self.predict(zero_masks)
        scaled = measured_ms * self.base_ms / max(baseline_ms, 1e-9)
        self.probed.append((self.raw(zero_masks), predicted, scaled))
        self._fit()
        return predicted, scaled

    def summary(self) -> dict:
        return {
            "batch": self.batch,
            "base_ms": self.base_ms,
            "layers_ms": sum(t.ms[0] for t in self.layers.values()),
            "rest_ms": self.rest_ms,
            "uniform_ms": {f"{keep:g}": ms for keep, _, ms in self.measured},
            "probed": [{"predicted_ms": p, "measured_ms": m} for _, p, m in self.probed],
        }

    def state_dict(self) -> dict:
        return {
            "layers": {
                k: {"widths": list(t.widths), "ms": list(t.ms), "out_elements": t.out_elements}
                for k, t in self.layers.items()
            },
            "base_ms": self.base_ms,
            "rest_ms": self.rest_ms,
            "measured": [list(m) for m in self.measured],
            "probed": [list(m) for m in self.probed],
            "batch": self.batch,
        }

    @classmethod
    def from_state(cls, groups: ChannelGroups, state: dict) -> LatencyModel:
        layers = {
            k: LayerTiming(tuple(v["widths"]), tuple(v["ms"]), int(v["out_elements"]))
            for k, v in state["layers"].items()
        }
        return cls(
            groups, layers, base_ms=state["base_ms"], rest_ms=state["rest_ms"],
            measured=[tuple(m) for m in state["measured"]],
            probed=[tuple(m) for m in state.get("probed", ())], batch=state["batch"],
        )  # fmt: skip


def _monotone_points(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """``(R, ms)`` sorted by ``R``, anchored at the largest ``R`` (the baseline) and made
    non-decreasing downwards from it (a running minimum: a smaller model read slower than
    a larger one is noise), with the origin prepended."""
    ordered = sorted(((max(r, 0.0), max(ms, 0.0)) for r, ms in points), reverse=True)
    result, low = [], math.inf
    for r, ms in ordered:
        low = min(low, ms)
        if result and r >= result[-1][0]:  # the same R twice: keep the first (larger) one
            continue
        result.append((r, low))
    return [(0.0, 0.0), *reversed(result)]


def _interpolate(points: Sequence[tuple[float, float]], r: float) -> float:
    """The piecewise-linear function through ``points`` at ``r`` (the last slope beyond)."""
    for (r0, m0), (r1, m1) in zip(points, points[1:], strict=False):
        if r <= r1:
            return m0 + (m1 - m0) * (r - r0) / (r1 - r0)
    if len(points) < 2:
        return r
    (r0, m0), (r1, m1) = points[-2], points[-1]
    return m1 + (m1 - m0) * (r - r1) / (r1 - r0)


# ------------------------------------------------------------------ calibration


def _layer_inputs(model: nn.Module, names: Sequence[str], example: torch.Tensor) -> dict:
    """Input and output shapes of every named layer on ``example``."""
    shapes: dict[str, tuple] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def hook(m, inputs, output, n=name):
            shapes[n] = (tuple(inputs[0].shape), tuple(output.shape))

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model.eval()(example.to(device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def _scaled(channels: int, p: float, groups: int = 1, block: int = 1) -> int:
    """``p`` of ``channels`` in whole conv groups and, where it fits, whole runtime blocks."""
    from compressor.runtime import kept_in_blocks

    per = max(1, round(p * channels / groups))
    if groups == 1:
        return kept_in_blocks(per, channels, block)
    return per * groups


def _layer_graph(
    module: nn.Module, in_shape: tuple, p: float, block: int = 1, depthwise: bool = False
):
    """One ``Conv`` (or ``MatMul``) node with ``module``'s geometry at width ``p``
    (``depthwise``: :attr:`compressor.groups.LayerInfo.depthwise`)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    if isinstance(module, nn.modules.conv._ConvNd):
        if depthwise:
            cin = cout = groups = _scaled(module.in_channels, p, block=block)
        else:
            groups = module.groups
            cin = _scaled(module.in_channels, p, groups, block)
            cout = _scaled(module.out_channels, p, groups, block)
        kernel = list(module.kernel_size)
        w = rng.standard_normal((cout, cin // groups, *kernel)).astype(np.float32) * 0.1
        attrs = {
            "kernel_shape": kernel,
            "strides": list(module.stride),
            "dilations": list(module.dilation),
            "group": groups,
        }
        if isinstance(module.padding, str):
            attrs["auto_pad"] = "SAME_UPPER" if module.padding == "same" else "VALID"
        else:
            attrs["pads"] = list(module.padding) * 2
        x_shape = [in_shape[0], cin, *in_shape[2:]]
        inits = [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.zeros(cout, np.float32), "b"),
        ]
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
    else:  # nn.Linear on (..., in): rows of a MatMul
        rows = math.prod(in_shape[:-1])
        cin = _scaled(module.in_features, p, block=block)
        cout = _scaled(module.out_features, p, block=block)
        x_shape = [rows, cin]
        w = rng.standard_normal((cin, cout)).astype(np.float32) * 0.1
        inits = [numpy_helper.from_array(w, "w")]
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "layer",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        initializer=inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), x_shape


def _empty_graph():
    import onnx
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "empty",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), [1]


def _time_graphs(graphs: dict, *, threads: int | None, repeats: int) -> dict[str, float]:
    """Median ms of each ``(onnx model, input shape)``, runs interleaved across models."""
    import onnx

    from compressor import export

    names = list(graphs)
    with tempfile.TemporaryDirectory(prefix="compressor-latency-") as tmp:
        paths = {}
        for i, name in enumerate(names):
            paths[name] = Path(tmp) / f"{i}.onnx"
            onnx.save(graphs[name][0], paths[name])
        result = {}
        # one call per input shape: measure_latency feeds one shape to all its models
        by_shape: dict[tuple, list[str]] = {}
        for name in names:
            by_shape.setdefault(tuple(graphs[name][1]), []).append(name)
        for shape, members in by_shape.items():
            ms = export.measure_latency(
                {n: paths[n] for n in members}, shape[1:], batch_sizes=(shape[0],),
                warmup=3, repeats=repeats, threads=threads,
            )  # fmt: skip
            result.update({n: ms[n][shape[0]] for n in members})
    return result


def _uniform_zero(groups: ChannelGroups, keep: float, round_to: int) -> list[torch.Tensor]:
    """Every group cut to ``keep`` of its units (in runtime blocks): the last ones zero."""
    from compressor.runtime import kept_in_blocks

    masks = []
    for g, block in zip(groups, groups.unit_blocks(round_to), strict=True):
        m = torch.zeros(g.size, dtype=torch.bool)
        m[kept_in_blocks(max(1, math.ceil(keep * g.size)), g.size, block) :] = True
        masks.append(m)
    return masks


def _compact_copy(
    model: nn.Module, groups: ChannelGroups, zero: list[torch.Tensor], example, round_to: int = 1
):
    """A copy of ``model`` with the ``zero`` units removed for real, as the run removes them:
    kept counts rounded up to multiples of ``round_to`` channels (zero channels kept)."""
    from compressor.prune import prune_zero_channels

    twin = copy.deepcopy(model).cpu().eval()
    factors = [(~z).to(torch.float32) for z in zero]
    with torch.no_grad():  # every member slice (conv rows, BatchNorm gamma and beta) zero
        groups.scale_(dict(twin.named_parameters()), factors)
    with torch.enable_grad():  # Torch-Pruning traces the graph with autograd
        prune_zero_channels(twin, groups, example.cpu(), round_to=round_to, tolerance=math.inf)
    return twin


def time_zero_set(
    model: nn.Module,
    groups: ChannelGroups,
    zero_masks: Sequence[torch.Tensor],
    input_shape: Sequence[int],
    baseline_onnx: str | Path,
    *,
    batch: int = 1,
    round_to: int = 1,
    threads: int | None = None,
    repeats: int = 30,
) -> tuple[float, float]:
    """Median ms of the compact model the ``zero_masks`` units' removal leaves (kept counts
    in multiples of ``round_to``, as the run removes them), and of the baseline's ONNX model
    timed beside it (runs interleaved), on this machine now."""
    from compressor import export

    example = torch.zeros(batch, *input_shape)
    with tempfile.TemporaryDirectory(prefix="compressor-latency-") as tmp:
        path = Path(tmp) / "zero_set.onnx"
        export.export_onnx(
            _compact_copy(model, groups, list(zero_masks), example, round_to), example[:1], path
        )
        ms = export.measure_latency(
            {"baseline": Path(baseline_onnx), "compact": path}, tuple(input_shape),
            batch_sizes=(batch,), repeats=repeats, threads=threads,
        )  # fmt: skip
    return ms["compact"][batch], ms["baseline"][batch]


def calibrate(
    model: nn.Module,
    groups: ChannelGroups,
    input_shape: Sequence[int],
    baseline_onnx: str | Path,
    *,
    batch: int = 1,
    round_to: int = 1,
    threads: int | None = None,
    repeats: int = 20,
) -> LatencyModel:
    """Time the layers at :data:`WIDTHS`, the baseline, and the compact models at
    :data:`CHECK_WIDTHS` on this machine; returns the calibrated :class:`LatencyModel`
    (see the module docstring)."""
    from compressor import export

    example = torch.zeros(batch, *input_shape)
    modules = dict(model.named_modules())
    names = [n for n in groups.layers if n in modules]
    shapes = _layer_inputs(model, names, example)
    graphs = {"empty": _empty_graph()}
    for name in names:
        if name not in shapes:
            continue  # not on the forward path
        for p in WIDTHS:
            graphs[(name, p)] = _layer_graph(
                modules[name], shapes[name][0], p, round_to, groups.layers[name].depthwise
            )
    timed = _time_graphs(graphs, threads=threads, repeats=repeats)
    overhead = timed.pop("empty")
    layers = {}
    for name in names:
        if name not in shapes:
            continue
        ms = [max(0.0, timed[(name, p)] - overhead) for p in WIDTHS]
        for i in range(len(ms) - 2, -1, -1):  # monotone: a wider layer is never faster
            ms[i] = max(ms[i], ms[i + 1])
        out_elements = math.prod(shapes[name][1][1:])
        layers[name] = LayerTiming(WIDTHS, tuple(ms), int(out_elements))

    uniform = {keep: _uniform_zero(groups, keep, round_to) for keep in CHECK_WIDTHS}
    with tempfile.TemporaryDirectory(prefix="compressor-latency-") as tmp:
        paths = {"baseline": Path(baseline_onnx)}
        for keep, zero in uniform.items():
            paths[keep] = Path(tmp) / f"keep_{keep:g}.onnx"
            export.export_onnx(
                _compact_copy(model, groups, zero, example), example[:1], paths[keep]
            )
        ms = export.measure_latency(
            paths, tuple(input_shape), batch_sizes=(batch,), repeats=max(repeats, 30),
            threads=threads,
        )  # fmt: skip
    base_ms = ms["baseline"][batch]
    rest = max(0.0, base_ms - sum(t.ms[0] for t in layers.values()))
    measured = [
        (keep, _layer_sum(groups, layers, rest, groups.layer_keep(zero)), ms[keep][batch])
        for keep, zero in uniform.items()
    ]
    latency = LatencyModel(
        groups, layers, base_ms=base_ms, rest_ms=rest, measured=measured, batch=batch
    )
    log.info(
        "latency model (batch %d): baseline %.3f ms (isolated layers %.3f ms, the rest %.3f ms); "
        "compact models %s",
        batch, base_ms, sum(t.ms[0] for t in layers.values()), rest,
        ", ".join(f"{keep:g} of the channels {m:.3f} ms (layer sum {r:.3f})"
                  for keep, r, m in measured),
    )  # fmt: skip
    return latency
