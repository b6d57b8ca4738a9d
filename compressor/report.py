"""The run report: plain dicts in, ``report.json``, ``report.md`` and plots out.

Nothing here knows about models: the caller measures, this module records,
judges gates and renders. Schema version 1 (``SCHEMA_VERSION``); a reader
should check ``report["schema"]``. Keys (``None`` where not measured):

- ``schema`` (1), ``tool`` {name, version}, ``created`` (ISO 8601, UTC),
  ``command`` (argv list or None), ``recipe`` (the resolved recipe dict);
- ``input`` {checkpoint, arch, task, data, device};
- ``metric`` {name, higher_is_better}: the task's metric (``--task``), which the
  ``accuracy`` keys below hold (top-1 percent for ``classification``);
- ``baseline`` / ``compressed`` {accuracy (percent), params, macs, onnx_bytes};
  ``compressed`` also {weight_sparsity (fraction of exactly-zero conv/linear
  weights of the shipped, compact model: the Conv/Gemm/MatMul weight
  initializers of model.onnx), sparse_model_weight_sparsity (the same count on
  the sparse model before its zero channels were removed), channels_kept,
  channels_total (over the prunable channel groups, ``channel_groups``)};
- ``channel_groups`` [{root, before, after}]: each prunable channel group by
  its root layer, with its channels before and after removal (the units of
  ``channels_kept`` / ``channels_total``);
- ``preprocessing`` None (not known: no data) or {scale, mean, std,
  input_shape}: what the exported model expects, ``x = (pixels * scale -
  mean) / std`` per channel on float32 NCHW input of ``input_shape`` (C, H, W);
- ``reduction`` {macs_x, params_x, size_x} (baseline / compressed);
- ``verification`` {onnx_checker, sparse_vs_pruned_max_abs,
  torch_vs_onnxruntime_max_abs, top1_agreement (0..1), samples, notes};
- ``latency_ms`` {baseline: {batch_1: ms}, compressed: {batch_1: ms},
  speedup: {batch_1: x}} (median onnxruntime CPU latency), and where profiled
  ``op_profile_ms`` {baseline: {kind: ms}, compressed: {kind: ms}}: onnxruntime's
  per-node profile at the same batch, summed per kind of op (``export.op_profile``),
  slowest first;
- ``layers`` [{name, type, shape_before, shape_after, sparsity}] (shape[0] is
  the number of output channels);
- ``epochs`` [{epoch, loss, accuracy, weight_sparsity, channel_sparsity, beta,
  strength, macs_x, params_x}] (the sparse model after each epoch; ``strength``
  is the controller's internal threshold, not shown in report.md);
- ``target`` None or {kind, asked, reached, within, targets}: ``targets`` lists
  every target given [{kind, asked, reached, met, max_reachable}], the top-level
  kind/asked/reached are the first's and ``within`` is every target met; ``kind`` ``seek_macs``
  (``--max-accuracy-drop`` alone) adds ``stages`` [{step, macs_x, accuracy, stderr,
  within}], the seeker's checks of the sparse model (``stderr``: the standard error of
  the drop, paired per validation sample; ``within``: drop + ``target.seek_margin``
  stderr within the allowance);
- ``activations`` None or {bits, ste, swapped, skipped, functional (False: functional
  ReLUs were not looked for and stayed full precision), calibration_batches,
  layers: {name: {type, bits, ste, channels, alpha: {min, median, max},
  theta (binary)}} (the learned per-channel scale and threshold of the shipped
  model), switch: None or {fraction, steps, trace [{step, t, sparse_accuracy}],
  sparse_accuracy_before, sparse_accuracy_after}} (the gradual switch from ReLU);
- ``int8`` None (``export.int8: off``) or {mode (static|dynamic), required, file
  (``model.int8.onnx``, or None when it was left out), passed, gate (as in ``gates``,
  named ``int8_accuracy_drop``: baseline accuracy minus the INT8 model's, against
  ``gates.max_accuracy_drop``; it joins ``gates`` only with ``export.int8_required``),
  error, calibration_samples (static), onnx_checker, onnx_bytes, float_onnx_bytes,
  size_x (float / int8 bytes), weights_size_x (the same for the weights alone),
  accuracy and float_accuracy (percent, onnxruntime, validation split), top1_agreement (0..1, INT8 vs float ONNX;
  None for a task whose outputs are not class scores), output_relative_error (``||int8 - float|| / ||float||``
  over the outputs), samples,
  latency_ms {float: {batch_16: ms}, int8: {batch_16: ms}, speedup: {batch_16: x}}};
- ``gates`` [{name, threshold, value, passed, detail}];
- ``timings_s`` {stage: seconds}, ``exit_code``, ``outputs`` [file names];
- ``error`` (only on a failed run): what went wrong.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compressor import __version__
from compressor.errors import (
    EXIT_BAD_INPUT,
    EXIT_GATE_FAILED,
    EXIT_OK,
    EXIT_OTHER,
    EXIT_VERIFICATION_FAILED,
)
from compressor.fileio import atomic_output, atomic_write_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TARGET_SLACK = 0.95  # a target counts as reached within 5% of the asked factor
# the latency model's baseline and the one timed beside the compressed model differ by more
# than this share: the machine's speed changed between them (the report says so)
LATENCY_DRIFT = 0.2
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CHANNELS_PNG = "channels_per_layer.png"
TRAINING_PNG = "training.png"
OP_PROFILE_ROWS = 8  # op kinds in report.md's profile table; the rest are summed as "other"

# target kind -> key of ``reduction`` holding the reached factor
_TARGET_KEYS = {"macs": "macs_x", "params": "params_x", "size": "size_x"}
_TARGET_WORDS = {
    "macs": "fewer MACs",
    "params": "fewer params",
    "size": "smaller ONNX file",
    "latency": "latency speedup",
}
_RESULTS = {
    EXIT_OK: ("✅", "PASS"),
    EXIT_OTHER: ("❌", "FAILED"),
    EXIT_BAD_INPUT: ("❌", "BAD INPUT"),
    EXIT_GATE_FAILED: ("❌", "GATE FAILED"),
    EXIT_VERIFICATION_FAILED: ("❌", "VERIFICATION FAILED"),
}


# --------------------------------------------------------------------------- building


def new_report(
    *,
    command: Sequence[str] | None = None,
    recipe: Mapping | None = None,
    input: Mapping | None = None,
    created: str | None = None,
) -> dict:
    """A schema-1 report with every key present and nothing measured yet."""
    return {
        "schema": SCHEMA_VERSION,
        "tool": {"name": "compressor", "version": __version__},
        "created": created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command) if command is not None else None,
        "recipe": dict(recipe) if recipe is not None else {},
        "input": {"checkpoint": None, "arch": None, "data": None, "device": None, **(input or {})},
        "baseline": {"accuracy": None, "params": None, "macs": None, "onnx_bytes": None},
        "compressed": {
            "accuracy": None,
            "params": None,
            "macs": None,
            "onnx_bytes": None,
            "weight_sparsity": None,
            "sparse_model_weight_sparsity": None,
            "channels_kept": None,
            "channels_total": None,
        },
        "channel_groups": [],
        "preprocessing": None,
        "reduction": {"macs_x": None, "params_x": None, "size_x": None},
        "verification": {
            "onnx_checker": None,
            "sparse_vs_pruned_max_abs": None,
            "torch_vs_onnxruntime_max_abs": None,
            "top1_agreement": None,
            "samples": None,
            "notes": [],
        },
        "latency_ms": None,
        "layers": [],
        "epochs": [],
        "target": None,
        "activations": None,
        "gates": [],
        "timings_s": {},
        "exit_code": None,
        "outputs": [],
    }


def _ratio(before: Any, after: Any) -> float | None:
    if not _is_num(before) or not _is_num(after) or after <= 0:
        return None
    return float(before) / float(after)


def reduction_factors(baseline: Mapping, compressed: Mapping) -> dict:
    """``{macs_x, params_x, size_x}``: baseline / compressed, None where unknown."""
    return {
        "macs_x": _ratio(baseline.get("macs"), compressed.get("macs")),
        "params_x": _ratio(baseline.get("params"), compressed.get("params")),
        "size_x": _ratio(baseline.get("onnx_bytes"), compressed.get("onnx_bytes")),
    }


def latency_section(
    medians: Mapping[str, Mapping[int, float]],
    *,
    baseline: str = "baseline",
    compressed: str = "compressed",
    op_profiles: Mapping[str, Mapping[str, float]] | None = None,
) -> dict:
    """Turn ``{name: {batch: ms}}`` (as from ``export.measure_latency``) into ``latency_ms``;
    ``op_profiles`` ``{name: {kind: ms}}`` (as from ``export.op_profile``) adds
    ``op_profile_ms``."""
    base = {f"batch_{b}": float(ms) for b, ms in medians.get(baseline, {}).items()}
    comp = {f"batch_{b}": float(ms) for b, ms in medians.get(compressed, {}).items()}
    speedup = {k: _ratio(base[k], comp[k]) for k in base if k in comp}
    section = {"baseline": base, "compressed": comp, "speedup": speedup}
    if op_profiles is not None:
        section["op_profile_ms"] = {
            "baseline": dict(op_profiles.get(baseline, {})),
            "compressed": dict(op_profiles.get(compressed, {})),
        }
    return section


def int8_latency(medians: Mapping[str, Mapping[int, float]]) -> dict:
    """``{float, int8, speedup}`` (each ``{batch_N: ms}``; speedup = float / int8) from
    ``export.measure_latency`` of the models named ``float`` and ``int8``."""
    section = latency_section(medians, baseline="float", compressed="int8")
    return {
        "float": section["baseline"],
        "int8": section["compressed"],
        "speedup": section["speedup"],
    }


def target_summary(kind: str, asked: float, reached: float | None) -> dict:
    """``{kind, asked, reached, within}``; within: reached >= 95% of the asked factor."""
    within = _is_num(reached) and float(reached) >= TARGET_SLACK * float(asked)
    return {"kind": kind, "asked": float(asked), "reached": reached, "within": bool(within)}


# --------------------------------------------------------------------------- gates


def _target_reached(report_like: Mapping, target: Mapping) -> float | None:
    if _is_num(target.get("reached")):
        return float(target["reached"])
    kind = target.get("kind")
    if kind in _TARGET_KEYS:
        return (report_like.get("reduction") or {}).get(_TARGET_KEYS[kind])
    if kind == "latency":
        speedup = (report_like.get("latency_ms") or {}).get("speedup")
        if isinstance(speedup, Mapping):
            return speedup.get("batch_1")
        return speedup if _is_num(speedup) else None
    return None


def evaluate_gates(
    report_like: Mapping,
    *,
    max_accuracy_drop: float | None = None,
    target: Mapping | None = None,
) -> list[dict]:
    """Judge the run's gates; returns ``[{name, threshold, value, passed, detail}]``.

    - ``accuracy_drop`` (when ``max_accuracy_drop`` is given): passes when
      ``baseline.accuracy - compressed.accuracy <= max_accuracy_drop`` (points);
      reversed (``compressed - baseline``) when ``report_like["metric"]`` says the
      task's metric is lower-is-better (``higher_is_better: false``; then in its units);
      when either accuracy is None the gate fails with detail "not measured".
    - ``target_<kind>`` (when ``target`` or ``report_like["target"]`` is set; one
      gate per entry of ``target["targets"]`` when it lists several):
      ``target`` is ``{kind, asked}`` plus optionally ``reached``; otherwise the
      reached factor is read from ``reduction`` (macs, params, size) or
      ``latency_ms.speedup.batch_1`` (latency). Passes when
      ``reached >= 0.95 * asked``.
    """
    gates = []
    if max_accuracy_drop is not None:
        base = (report_like.get("baseline") or {}).get("accuracy")
        comp = (report_like.get("compressed") or {}).get("accuracy")
        if _is_num(base) and _is_num(comp):
            drop = float(base) - float(comp)
            if not (report_like.get("metric") or {}).get("higher_is_better", True):
                drop = -drop
            passed = drop <= max_accuracy_drop
            detail = f"{drop:.2f} points {'<=' if passed else '>'} {max_accuracy_drop:g}"
        else:
            drop, passed, detail = None, False, "not measured"
        gates.append(
            {
                "name": "accuracy_drop",
                "threshold": float(max_accuracy_drop),
                "value": drop,
                "passed": passed,
                "detail": detail,
            }
        )
    if target is None:
        target = report_like.get("target")
    # several targets at once (``target["targets"]``): one gate each
    for one in (target.get("targets") or [target]) if target else []:
        asked = float(one["asked"])
        reached = _target_reached(report_like, one)
        threshold = TARGET_SLACK * asked
        passed = _is_num(reached) and float(reached) >= threshold
        if _is_num(reached) and _is_num(one.get("asked_ms")) and _is_num(one.get("reached_ms")):
            detail = (
                f"{float(one['reached_ms']):.3g} ms reached, {float(one['asked_ms']):.3g} ms asked "
                f"(<= {float(one['asked_ms']) / TARGET_SLACK:.3g} ms needed)"
            )
        elif _is_num(reached):
            detail = (
                f"{float(reached):.2f}x reached, {asked:.2f}x asked (>= {threshold:.2f}x needed)"
            )
        else:
            detail = "not measured"
        gates.append(
            {
                "name": f"target_{one.get('kind', 'unknown')}",
                "threshold": threshold,
                "value": float(reached) if _is_num(reached) else None,
                "passed": bool(passed),
                "detail": detail,
            }
        )
    return gates


def int8_gate(int8: Mapping, baseline_accuracy: Any, max_accuracy_drop: float | None) -> dict:
    """The INT8 model's gate ``int8_accuracy_drop``: it was made without error, passed the
    ONNX checker and (when ``max_accuracy_drop`` is set) lost at most that many points of
    the baseline's accuracy. Same fields as :func:`evaluate_gates`' gates."""
    acc = int8.get("accuracy")
    drop = (
        float(baseline_accuracy) - float(acc)
        if _is_num(baseline_accuracy) and _is_num(acc)
        else None
    )
    if int8.get("error"):
        passed, detail = False, str(int8["error"])
    elif not int8.get("onnx_checker"):
        passed, detail = False, "the ONNX checker rejected it"
    elif max_accuracy_drop is None:
        passed, detail = True, "no accuracy gate"
    elif drop is None:
        passed, detail = False, "accuracy not measured"
    else:
        passed = drop <= max_accuracy_drop
        detail = f"{drop:.2f} points {'<=' if passed else '>'} {max_accuracy_drop:g}"
    return {
        "name": "int8_accuracy_drop",
        "threshold": float(max_accuracy_drop) if max_accuracy_drop is not None else None,
        "value": drop,
        "passed": bool(passed),
        "detail": detail,
    }


def gates_passed(gates: Sequence[Mapping]) -> bool:
    """True when every gate passed (also when there are none)."""
    return all(g.get("passed") for g in gates)


# --------------------------------------------------------------------------- formatting


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _count(n: Any) -> str:
    if not _is_num(n):
        return "—"
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _bytes(n: Any) -> str:
    if not _is_num(n):
        return "—"
    n = float(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _x(v: Any) -> str:
    return f"{float(v):.2f}x" if _is_num(v) else "—"


def _pct(v: Any, *, frac: bool = False, digits: int = 2) -> str:
    if not _is_num(v):
        return "—"
    return f"{float(v) * (100 if frac else 1):.{digits}f}%"


def _latency_drift(target: Mapping) -> list[str]:
    """A warning (one line, or none) when the latency model's baseline (timed before
    training) and the baseline timed beside the compressed model differ by more than
    :data:`LATENCY_DRIFT`: the plan was made for a machine that ran at another speed."""
    calibrated = (target.get("model") or {}).get("base_ms")
    beside = target.get("baseline_ms")
    if not (_is_num(calibrated) and _is_num(beside)) or min(calibrated, beside) <= 0:
        return []
    ratio = float(calibrated) / float(beside)
    if abs(ratio - 1) <= LATENCY_DRIFT:
        return []
    return [
        f"⚠️ The latency model timed the baseline at {_ms(calibrated)} ms, {ratio:.2f}x the "
        f"{_ms(beside)} ms timed beside the compressed model: this machine ran at another "
        "speed while it was calibrated (other work on its cores?), so the asked milliseconds "
        "were planned against that speed. Run again on a quieter machine."
    ]


def _ms(v: Any) -> str:
    if not _is_num(v):
        return "—"
    return f"{float(v):.2f}" if abs(v) >= 1 else f"{float(v):.3f}"


def _sci(v: Any) -> str:
    return f"{float(v):.2e}" if _is_num(v) else "—"


def _num(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or v is None:
        return "—" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if _is_num(v):
        return f"{float(v):.{digits}g}"
    return _cell(v)


def _cell(v: Any) -> str:
    """Text for a Markdown table cell: no pipes or newlines."""
    if v is None:
        return "—"
    if isinstance(v, (list, tuple)):
        v = "×".join(str(i) for i in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _accuracy_delta(base: Any, comp: Any) -> str:
    if not (_is_num(base) and _is_num(comp)):
        return "not measured" if base is None or comp is None else "—"
    d = float(comp) - float(base)
    return f"{d:+.2f} pts"


def _batch_keys(*dicts: Mapping) -> list[str]:
    keys: list[str] = []
    for d in dicts:
        keys += [k for k in d if k not in keys]

    def order(k: str):
        tail = k.rsplit("_", 1)[-1]
        return (0, int(tail)) if tail.isdigit() else (1, k)

    return sorted(keys, key=order)


# --------------------------------------------------------------------------- markdown


def _headline(report: Mapping) -> str:
    code = report.get("exit_code")
    icon, word = (
        _RESULTS.get(code, ("⏳", "INCOMPLETE")) if code is not None else ("⏳", "INCOMPLETE")
    )
    base = report.get("baseline") or {}
    comp = report.get("compressed") or {}
    red = {**reduction_factors(base, comp), **_drop_none(report.get("reduction") or {})}
    bits = []
    if _is_num(red.get("macs_x")):
        bits.append(f"{_x(red['macs_x'])} fewer MACs")
    if _is_num(red.get("params_x")):
        bits.append(f"{_x(red['params_x'])} fewer params")
    metric = _metric_name(report)
    if metric != "accuracy" and (_is_num(base.get("accuracy")) or _is_num(comp.get("accuracy"))):
        bits.append(f"{metric} {_num(base.get('accuracy'))} → {_num(comp.get('accuracy'))}")
    elif _is_num(base.get("accuracy")) or _is_num(comp.get("accuracy")):
        bits.append(
            f"accuracy {_pct(base.get('accuracy'))} → {_pct(comp.get('accuracy'))}"
            f" ({_accuracy_delta(base.get('accuracy'), comp.get('accuracy'))})"
        )
    arch = (report.get("input") or {}).get("arch")
    title = f"compressor: {word}"
    if code is not None:
        title += f" (exit {code})"
    title += f" — {arch}" if arch else ""
    failed = [g for g in report.get("gates") or [] if not g.get("passed")]
    if failed:
        title += f" (failed: {', '.join(str(g.get('name')) for g in failed)})"
        title += ": " + "; ".join(_gate_summary(report, g) for g in failed)
    text = f"## {icon} {title}" + ("\n\n**" + " · ".join(bits) + "**" if bits else "")
    if report.get("error"):
        text += f"\n\n> **Error:** {_cell(report['error'])}"
    return text


def _metric_name(report: Mapping) -> str:
    """The task's metric that the ``accuracy`` keys hold (``report["metric"]["name"]``)."""
    return str((report.get("metric") or {}).get("name") or "accuracy")


def _gate_summary(report: Mapping, gate: Mapping) -> str:
    """One failed gate in words, e.g. ``accuracy 91.2% → 13.5% (-77.7 points, gate 5.0)``."""
    if gate.get("name") == "accuracy_drop":
        base = (report.get("baseline") or {}).get("accuracy")
        comp = (report.get("compressed") or {}).get("accuracy")
        limit = gate.get("threshold")
        limit_txt = f"gate {float(limit):.1f}" if _is_num(limit) else "gate"
        if not (_is_num(base) and _is_num(comp)):
            return f"{_metric_name(report)} not measured ({limit_txt})"
        if _metric_name(report) != "accuracy":
            return f"{_metric_name(report)} {_num(base)} → {_num(comp)} ({limit_txt})"
        return (
            f"accuracy {_pct(base, digits=1)} → {_pct(comp, digits=1)} "
            f"({float(comp) - float(base):+.1f} points, {limit_txt})"
        )
    return _cell(gate.get("detail") or "failed")


def _drop_none(d: Mapping) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _summary_table(report: Mapping) -> list[str]:
    base = report.get("baseline") or {}
    comp = report.get("compressed") or {}
    red = {**reduction_factors(base, comp), **_drop_none(report.get("reduction") or {})}
    metric = _metric_name(report)
    show = _pct if metric == "accuracy" else _num
    rows = [
        [
            "Accuracy (top-1)" if metric == "accuracy" else metric,
            show(base.get("accuracy")) if base.get("accuracy") is not None else "not measured",
            show(comp.get("accuracy")) if comp.get("accuracy") is not None else "not measured",
            _accuracy_delta(base.get("accuracy"), comp.get("accuracy")),
        ],
        ["Params", _count(base.get("params")), _count(comp.get("params")), _x(red.get("params_x"))],
        ["MACs", _count(base.get("macs")), _count(comp.get("macs")), _x(red.get("macs_x"))],
        [
            "ONNX size",
            _bytes(base.get("onnx_bytes")),
            _bytes(comp.get("onnx_bytes")),
            _x(red.get("size_x")),
        ],
    ]
    lat = report.get("latency_ms") or {}
    lb, lc = lat.get("baseline") or {}, lat.get("compressed") or {}
    speedup = lat.get("speedup")
    for key in _batch_keys(lb, lc):
        if isinstance(speedup, Mapping):
            s = speedup.get(key)
        elif key == "batch_1" and _is_num(speedup):
            s = speedup
        else:
            s = None
        if s is None:
            s = _ratio(lb.get(key), lc.get(key))
        label = key.replace("batch_", "batch ")
        rows.append(
            [
                f"Latency, {label} (ms, ORT CPU median)",
                _ms(lb.get(key)),
                _ms(lc.get(key)),
                _x(s),
            ]
        )
    lines = _table(["", "Baseline", "Compressed", "Change"], rows)
    extra = []
    if comp.get("weight_sparsity") is not None:
        text = f"weight sparsity {_pct(comp['weight_sparsity'], frac=True, digits=1)}"
        if _is_num(comp.get("sparse_model_weight_sparsity")):
            before = _pct(comp["sparse_model_weight_sparsity"], frac=True, digits=1)
            text += f" ({before} in the sparse model before its zero channels were removed)"
        extra.append(text)
    if comp.get("channels_kept") is not None and comp.get("channels_total"):
        kept, total = comp["channels_kept"], comp["channels_total"]
        extra.append(f"channels kept {kept} / {total} ({_pct(kept / total, frac=True, digits=1)})")
    if extra:
        lines += ["", "Compressed model: " + ", ".join(extra) + "."]
    return lines


def _op_profile_lines(report: Mapping) -> list[str]:
    """Where the time went: the ``OP_PROFILE_ROWS`` op kinds slowest in either model (in order
    of baseline time), the rest as "other", and the total."""
    prof = (report.get("latency_ms") or {}).get("op_profile_ms") or {}
    base, comp = prof.get("baseline") or {}, prof.get("compressed") or {}
    if not (base or comp):
        return []
    kinds = sorted(set(base) | set(comp), key=lambda k: -max(base.get(k, 0), comp.get(k, 0)))
    shown = sorted(kinds[:OP_PROFILE_ROWS], key=lambda k: (-base.get(k, 0), -comp.get(k, 0)))
    rest = kinds[OP_PROFILE_ROWS:]
    rows = [(k, base.get(k), comp.get(k)) for k in shown]  # None: not in that model
    if rest:
        rows.append(("other", *(sum(p.get(k, 0.0) for k in rest) for p in (base, comp))))
    rows.append(("total", sum(base.values()), sum(comp.values())))
    return [
        "### Where the time went",
        "",
        "onnxruntime's per-node profile at the batch of the latency above, summed per kind of op "
        "(ms per run; an activation fused into a convolution counts as the convolution; "
        "NCHWc = blocked-layout kernels, layout reorder = conversions to and from that layout).",
        "",
        *_table(
            ["Op kind", "Baseline ms", "Compressed ms", "Baseline ÷ compressed"],
            [[_cell(k), _ms(b), _ms(c), _x(_ratio(b, c))] for k, b, c in rows],
        ),
    ]


def _verification_lines(report: Mapping) -> list[str]:
    v = report.get("verification") or {}
    if not v:
        return []
    checker = v.get("onnx_checker")
    checker_txt = "—" if checker is None else ("✅ passed" if checker else "❌ failed")
    agree = v.get("top1_agreement")
    samples = v.get("samples")
    agree_txt = _pct(agree, frac=True) + (f" of {samples} samples" if samples else "")
    rows = [
        ["ONNX checker (full)", checker_txt],
        ["Sparse vs pruned model, max abs diff", _sci(v.get("sparse_vs_pruned_max_abs"))],
        ["PyTorch vs onnxruntime, max abs diff", _sci(v.get("torch_vs_onnxruntime_max_abs"))],
        ["Top-1 agreement (PyTorch vs onnxruntime)", agree_txt if _is_num(agree) else "—"],
    ]
    lines = ["### Verification", "", *_table(["Check", "Result"], rows)]
    if v.get("onnx_contents"):  # the task exports part of the model (detection: the raw head)
        lines += ["", f"model.onnx holds: {v['onnx_contents']}."]
    notes = v.get("notes")
    if isinstance(notes, str):
        notes = [notes] if notes else []
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return lines


def _int8_line(report: Mapping) -> list[str]:
    q = report.get("int8")
    if not q:
        return []
    gate = q.get("gate") or {}
    mode = f"{q.get('mode')}{', required' if q.get('required') else ''}"
    if not q.get("onnx_bytes"):
        return [f"**INT8 ({mode}):** ❌ not shipped: {_cell(gate.get('detail'))}."]
    lat = q.get("latency_ms") or {}
    key = next(iter(_batch_keys(lat.get("float") or {}, lat.get("int8") or {})), "batch_16")
    verdict = (
        f"✅ `{_cell(q.get('file'))}`"
        if q.get("file")
        else f"❌ not shipped ({_cell(gate.get('detail'))})"
    )
    return [
        f"**INT8 ({mode}):** {verdict}: {_bytes(q.get('onnx_bytes'))} "
        f"({_x(q.get('size_x'))} smaller than model.onnx; its weights "
        f"{_x(q.get('weights_size_x'))}), accuracy {_pct(q.get('accuracy'))} "
        f"(float {_pct(q.get('float_accuracy'))}), {_int8_agreement(q)}, "
        f"latency {key.replace('_', ' ')} {_ms((lat.get('int8') or {}).get(key))} ms vs "
        f"{_ms((lat.get('float') or {}).get(key))} ms float "
        f"({_x((lat.get('speedup') or {}).get(key))}); accuracy gate: {_cell(gate.get('detail'))}."
    ]


def _int8_agreement(q: Mapping) -> str:
    """How close the INT8 model's outputs are to the float model's: top-1 agreement for
    class scores, the relative error of the outputs otherwise (a detector's raw head)."""
    samples = _num(q.get("samples"))
    if q.get("top1_agreement") is None:
        error = q.get("output_relative_error")
        shown = "n/a" if error is None else f"{100 * error:.2f}%"
        return f"outputs within {shown} (relative) of the float model's on {samples} samples"
    agreement = _pct(q.get("top1_agreement"), frac=True, digits=1)
    return f"top-1 agreement with the float model {agreement} of {samples}"


def _gate_lines(report: Mapping) -> list[str]:
    gates = report.get("gates") or []
    lines = ["### Gates", ""]
    if not gates:
        return lines + ["No gates were set."]
    rows = []
    for g in gates:
        value = g.get("value")
        rows.append(
            [
                _cell(g.get("name")),
                _num(g.get("threshold")),
                _num(value) if value is not None else "not measured",
                ("✅ pass" if g.get("passed") else "❌ fail"),
                _cell(g.get("detail", "")),
            ]
        )
    return lines + _table(["Gate", "Threshold", "Value", "Result", "Detail"], rows)


def _target_line(report: Mapping) -> list[str]:
    t = report.get("target")
    if not t:
        return []
    if t.get("kind") == "seek_macs":
        checks = ", ".join(
            f"{_x(c['macs_x'])} {c['accuracy']:.2f}%"
            + (f" ±{c['stderr']:.2f}" if c.get("stderr") else "")
            + f" {'✅' if c['within'] else '❌'}"
            for c in t.get("stages") or []
        )
        return [
            f"**Seek:** the largest MACs reduction within the accuracy budget: "
            f"{_x(t.get('reached'))} reached"
            + (f" (checks of the sparse model: {checks})." if checks else ".")
        ]
    parts, notes = [], []
    for one in t.get("targets") or [t]:  # every target given
        ok = "✅" if one.get("met", one.get("within")) else "❌"
        if one.get("kind") == "latency" and _is_num(one.get("asked_ms")):
            parts.append(
                f"latency {_ms(one['asked_ms'])} ms at batch {one.get('batch')} asked, "
                f"{_ms(one.get('reached_ms'))} ms reached {ok} (baseline "
                f"{_ms(one.get('baseline_ms'))} ms, measured side by side; the latency model "
                f"calibrated on this machine predicted {_ms(one.get('predicted_ms'))} ms"
                + _probes(one)
                + ")"
            )
            notes += _latency_drift(one)
            continue
        what = _TARGET_WORDS.get(one.get("kind"), f"{one.get('kind')} reduction")
        parts.append(f"{_x(one.get('asked'))} {what} asked, {_x(one.get('reached'))} reached {ok}")
    return [
        f"**Target:** {'; '.join(parts)} "
        f"(counts when within {round((1 - TARGET_SLACK) * 100)}% of the asked factor).",
        *notes,
    ]


def _probes(latency_target: Mapping) -> str:
    """The zero sets the budget timed before freezing, as the latency model read them."""
    probes = (latency_target.get("model") or {}).get("probed") or []
    if not probes:
        return ""
    return "; the compact models of the zero sets timed before the freeze: " + ", ".join(
        f"{_ms(p.get('measured_ms'))} ms where {_ms(p.get('predicted_ms'))} ms was predicted"
        for p in probes
    )


def _method_line(report: Mapping) -> list[str]:
    """Which penalty chose the zero channels, and how far ``w`` stayed from its sparse copy."""
    m = report.get("method")
    if not m:
        return []
    trace = m.get("trace") or []
    gaps = [row["w_minus_u"] for row in trace if _is_num(row.get("w_minus_u"))]
    gap = f"; max |w - u| during training {_sci(max(gaps))}" if gaps else ""
    allocation = m.get("allocation") or {}
    caps = ""
    if allocation.get("kind") == "sensitivity":
        caps = (
            ", each group's share capped by a one-shot sensitivity analysis of the input model "
            "(`target.allocation: sensitivity`)"
        )
    return [
        f"**Method:** RVSM; zero channels chosen by the `{m.get('group_term')}` group term's "
        f"prox ({m.get('zero_set_chosen_by')}{caps}), individual term "
        f"`{m.get('individual_term')}`, group weighting `{m.get('group_weighting')}`{gap}."
    ]


def _activation_line(report: Mapping) -> list[str]:
    a = report.get("activations")
    if not a:
        return []
    lines = [
        f"**Activations:** {a.get('bits')}-bit, STE `{a.get('ste')}`; "
        f"swapped {_names(a.get('swapped'))}; kept full precision {_names(a.get('skipped'))}"
        + (
            " and every functional ReLU (`activations.functional: false`)."
            if a.get("functional") is False
            else "."
        )
    ]
    switch = a.get("switch")
    if isinstance(switch, Mapping):
        lines[0] += (
            f" Switched from ReLU over the first {_pct(switch.get('fraction'), frac=True, digits=0)}"
            f" of training ({_num(switch.get('steps'))} steps): sparse accuracy "
            f"{_pct(switch.get('sparse_accuracy_before'))} before, "
            f"{_pct(switch.get('sparse_accuracy_after'))} after."
        )
    layers = a.get("layers")
    if isinstance(layers, Mapping) and layers:
        lines += [
            "",
            "| activation | channels | scale alpha (min / median / max) | threshold theta |",
            "|---|---:|---|---|",
        ]
        for name, row in layers.items():
            lines.append(
                f"| `{_cell(name)}` | {_num(row.get('channels'))} | {_spread(row.get('alpha'))} "
                f"| {_spread(row.get('theta'))} |"
            )
    return lines


def _names(names: Any) -> str:
    if not isinstance(names, (list, tuple)) or not names:
        return "none"
    return ", ".join(f"`{_cell(n)}`" for n in names)


def _spread(stats: Any) -> str:
    """``min / median / max`` of a per-channel value, or a dash."""
    if not isinstance(stats, Mapping):
        return "—"
    return " / ".join(_num(stats.get(k), 3) for k in ("min", "median", "max"))


def _fmt_scale(scale: Any) -> str:
    if _is_num(scale) and math.isclose(float(scale), 1 / 255, rel_tol=1e-9):
        return "1/255"
    return _num(scale, 6)


def _nums(values: Any) -> str:
    if not isinstance(values, (list, tuple)):
        return "—"
    return "[" + ", ".join(_num(v, 6) for v in values) + "]"


def _preprocessing_lines(report: Mapping) -> list[str]:
    p = report.get("preprocessing")
    if not isinstance(p, Mapping):
        return []
    shape = p.get("input_shape")
    mean, std = p.get("mean"), p.get("std")
    scale = p.get("scale")
    if _is_num(scale) and float(scale) != 1.0:
        source = f"pixels × {_fmt_scale(scale)}"
    else:
        source = "values (float data, used as stored)"
    normalised = not (
        isinstance(mean, list) and isinstance(std, list)
        and all(m == 0 for m in mean) and all(s == 1 for s in std)
    )  # fmt: skip
    formula = f"(({source}) − mean) / std" if normalised else source
    text = (
        f"**Input preprocessing** (what `model.onnx` expects): float32 NCHW, one sample "
        f"{_cell(shape)} (C×H×W), x = {formula}"
    )
    text += f" with mean {_nums(mean)}, std {_nums(std)} per channel." if normalised else "."
    return [text]


def _layer_lines(report: Mapping) -> list[str]:
    layers = report.get("layers") or []
    if not layers:
        return []
    rows = [
        [
            f"`{_cell(layer.get('name'))}`",
            _cell(layer.get("type")),
            _cell(layer.get("shape_before")),
            _cell(layer.get("shape_after")),
            _pct(layer.get("sparsity"), frac=True, digits=1),
        ]
        for layer in layers
    ]
    return [
        f"<details><summary>Per-layer shapes ({len(layers)} layers)</summary>",
        "",
        *_table(["Layer", "Type", "Shape before", "Shape after", "Weight sparsity"], rows),
        "",
        "</details>",
    ]


def _left_whole_lines(report: Mapping) -> list[str]:
    """The layers no channel group thins (report.json ``layers_left_whole``), by reason."""
    left = report.get("layers_left_whole") or []
    if not left:
        return []
    by_reason: dict[str, list[str]] = {}
    for row in left:
        by_reason.setdefault(_cell(row.get("reason")), []).append(f"`{_cell(row.get('layer'))}`")
    lines = [f"**Layers left whole ({len(left)}):**", ""]
    for reason, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        lines.append(f"- {reason} ({len(names)}): {', '.join(names[:5])}{more}")
    return lines


_EPOCH_COLS = [
    ("epoch", "Epoch", lambda v: _num(v)),
    ("loss", "Loss", lambda v: _num(v, 4)),
    ("accuracy", "Accuracy", lambda v: _pct(v)),
    ("weight_sparsity", "Weight sparsity", lambda v: _pct(v, frac=True, digits=1)),
    ("channel_sparsity", "Channel sparsity", lambda v: _pct(v, frac=True, digits=1)),
    ("beta", "β", lambda v: _num(v, 3)),
    ("macs_x", "MACs reduction", lambda v: _x(v)),
    ("params_x", "Params reduction", lambda v: _x(v)),
]


def _epoch_lines(report: Mapping) -> list[str]:
    epochs = report.get("epochs") or []
    if not epochs:
        return ["### Training", "", "No training epochs were run."]
    cols = [c for c in _EPOCH_COLS if any(e.get(c[0]) is not None for e in epochs)]
    metric = (report.get("metric") or {}).get("name", "accuracy")
    if metric != "accuracy":  # another task's metric (e.g. detection's map): its own units
        cols = [
            (k, metric, lambda v: _num(v, 4)) if k == "accuracy" else (k, t, f) for k, t, f in cols
        ]
    rows = [[fmt(e.get(key)) for key, _, fmt in cols] for e in epochs]
    return ["### Training", "", *_table([title for _, title, _ in cols], rows)]


def _footer_lines(report: Mapping) -> list[str]:
    lines = []
    timings = report.get("timings_s") or {}
    if timings:
        total = sum(v for v in timings.values() if _is_num(v))
        parts = [f"{_cell(k)} {float(v):.1f} s" for k, v in timings.items() if _is_num(v)]
        lines.append(f"**Timings:** {' · '.join(parts)} (total {total:.1f} s)")
    inp = report.get("input") or {}
    if any(inp.values()):
        parts = [f"{k} `{_cell(v)}`" for k, v in inp.items() if v is not None]
        lines.append("**Input:** " + ", ".join(parts))
    outputs = report.get("outputs") or []
    if outputs:
        lines.append("**Outputs:** " + ", ".join(f"`{_cell(o)}`" for o in outputs))
    cmd = report.get("command")
    tool = report.get("tool") or {}
    created = report.get("created")
    meta = f"{tool.get('name', 'compressor')} {tool.get('version', '')}".strip()
    if created:
        meta += f", {created}"
    if report.get("exit_code") is not None:
        meta += f", exit code {report['exit_code']}"
    lines.append(f"<sub>{meta}</sub>")
    lines = "\n\n".join(lines).split("\n")  # one paragraph each
    if cmd:
        lines += ["", "```", shlex.join(str(c) for c in cmd), "```"]
    recipe = report.get("recipe")
    if recipe:
        lines += [
            "",
            "<details><summary>Resolved recipe</summary>",
            "",
            "```json",
            json.dumps(_jsonable(recipe), indent=2, sort_keys=True),
            "```",
            "",
            "</details>",
        ]
    return lines


def render_markdown(report: Mapping) -> str:
    """Markdown for a CI job summary (GitHub's ``$GITHUB_STEP_SUMMARY``) or a PR comment."""
    sections = [
        [_headline(report)],
        _summary_table(report),
        _op_profile_lines(report),
        _target_line(report),
        _method_line(report),
        _preprocessing_lines(report),
        _activation_line(report),
        _verification_lines(report),
        _int8_line(report),
        _gate_lines(report),
        _epoch_lines(report),
        _layer_lines(report),
        _left_whole_lines(report),
        _footer_lines(report),
    ]
    out = []
    for section in sections:
        if section:
            out += [*section, ""]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # Agg-compatible, no pyplot, no global backend

    return Figure(figsize=(width, height), layout="constrained")


def _save_png(fig, path: Path) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _channel_bars(report: Mapping) -> list[tuple[str, int, int]]:
    """(name, before, after) per prunable channel group; the report's ``channels_kept`` and
    ``channels_total`` are the sums. Reports without ``channel_groups`` fall back to the
    conv/linear layers (norm layers repeat their producer's channels)."""
    groups = [
        g for g in report.get("channel_groups") or []
        if _is_num(g.get("before")) and _is_num(g.get("after"))
    ]  # fmt: skip
    if groups:
        return [(str(g.get("root")), int(g["before"]), int(g["after"])) for g in groups]
    return [
        (
            str(layer.get("name")),
            int(layer["shape_before"][0]),
            int(layer["shape_after"][0]) if layer["shape_after"] else 0,
        )
        for layer in report.get("layers") or []
        if layer.get("shape_before")
        and len(layer["shape_before"]) > 1  # conv/linear weights; norm layers are 1-d
        and layer.get("shape_after") is not None
    ]


def plot_channels(report: Mapping, path: str | os.PathLike) -> bool:
    """Bar chart of the channels of each prunable channel group (by its root layer), before vs
    after; the title's totals are the report's ``channels_kept`` of ``channels_total``.
    False (no file) when there is nothing to plot."""
    bars = _channel_bars(report)
    if not bars:
        return False
    names = [b[0] for b in bars]
    before = [b[1] for b in bars]
    after = [b[2] for b in bars]
    n = len(bars)
    fig = _new_figure(min(24.0, max(6.0, 0.35 * n + 2)), 4.5)
    ax = fig.add_subplot()
    xs = range(n)
    w = 0.42
    ax.bar([i - w / 2 for i in xs], before, w, label="before", color="#b0b7c3")
    ax.bar([i + w / 2 for i in xs], after, w, label="after", color="#2f6fdb")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7 if n > 30 else 8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylabel("channels")
    ax.set_xlabel("channel group (named by its root layer)")
    kept, total = sum(after), sum(before)
    ax.set_title(f"Channels per prunable group: {kept} of {total} kept")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    _save_png(fig, Path(path))
    return True


def _series(epochs: Sequence[Mapping], key: str) -> tuple[list, list]:
    pts = [(e.get("epoch", i), e.get(key)) for i, e in enumerate(epochs)]
    pts = [(x, y) for x, y in pts if _is_num(x) and _is_num(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _asked_targets(report: Mapping) -> dict[str, float]:
    """Reduction factor asked per kind (macs, params, size) from ``report["target"]``
    (one target summary, a list of them, or ``{"targets": [...]}``)."""
    target = report.get("target")
    if isinstance(target, Mapping) and isinstance(target.get("targets"), Sequence):
        items = list(target["targets"])
    elif isinstance(target, Mapping):
        items = [target]
    elif isinstance(target, Sequence) and not isinstance(target, str):
        items = list(target)
    else:
        items = []
    return {
        str(t.get("kind")): float(t["asked"])
        for t in items
        if isinstance(t, Mapping) and _is_num(t.get("asked"))
    }


def _accuracy_gate(report: Mapping) -> float | None:
    for g in report.get("gates") or []:
        if g.get("name") == "accuracy_drop" and _is_num(g.get("threshold")):
            return float(g["threshold"])
    return None


def plot_training(report: Mapping, path: str | os.PathLike) -> bool:
    """Per epoch: training loss; the sparse model's accuracy against the baseline (and the
    accuracy gate); the reduction reached against the target asked.

    False (no file) when no epoch has a value to plot.
    """
    epochs = report.get("epochs") or []
    loss = _series(epochs, "loss")
    acc = _series(epochs, "accuracy")
    asked = _asked_targets(report)
    reductions = [
        (key, label, color, _series(epochs, key), asked.get(kind))
        for key, kind, label, color in (
            ("macs_x", "macs", "MACs", "#27ae60"),
            ("params_x", "params", "params", "#d35400"),
        )
    ]
    # MACs always (what the seeker and a MACs target move); params when it is a target
    reductions = [r for r in reductions if r[3][0] and (r[0] == "macs_x" or r[4] is not None)]
    panels = [p for p in (loss, acc) if p[0]]
    trace = (report.get("method") or {}).get("trace") or []
    stages = (report.get("target") or {}).get("stages") or []
    switch = ((report.get("activations") or {}).get("switch") or {}).get("trace") or []
    if not panels and not reductions:
        return False
    n = len(panels) + bool(reductions) + bool(trace) + bool(stages) + bool(switch)
    fig = _new_figure(4.2 * n, 3.6)
    axes = fig.subplots(1, n, squeeze=False)[0]
    i = 0
    if loss[0]:
        axes[i].plot(*loss, marker="o", color="#c0392b")
        axes[i].set_title("training loss")
        axes[i].set_xlabel("epoch")
        i += 1
    if acc[0]:
        axes[i].plot(*acc, marker="o", color="#2f6fdb", label="sparse model")
        base = (report.get("baseline") or {}).get("accuracy")
        if _is_num(base):
            axes[i].axhline(base, ls="--", color="grey", label="baseline")
            gate = _accuracy_gate(report)
            if gate is not None:
                axes[i].axhline(base - gate, ls=":", color="#c0392b", label=f"gate (-{gate:g})")
        comp = (report.get("compressed") or {}).get("accuracy")
        if _is_num(comp):
            axes[i].plot([acc[0][-1]], [comp], marker="*", ms=12, ls="", color="#1a3d7c",
                         label="shipped model")  # fmt: skip
        axes[i].set_title("accuracy (%)")
        axes[i].set_xlabel("epoch")
        axes[i].legend(fontsize=8)
        i += 1
    if reductions:
        ax = axes[i]
        for _key, label, color, series, target in reductions:
            ax.plot(*series, marker="o", color=color, label=f"{label} reached")
            if target is not None:
                ax.axhline(target, ls="--", color=color, label=f"{label} target {target:g}x")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title("reduction reached (x fewer)")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        i += 1
    epoch_axes = axes[:i]
    if trace:
        _plot_splitting(axes[i], trace)
        i += 1
    if stages:
        _plot_seek(axes[i], stages, (report.get("baseline") or {}).get("accuracy"))
        i += 1
    if switch:
        _plot_switch(axes[i], switch)
    from matplotlib.ticker import MaxNLocator

    for ax in epoch_axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save_png(fig, Path(path))
    return True


def _plot_splitting(ax, trace: Sequence[Mapping]) -> None:
    """Per logged step: ``max |w - u|`` (how far the trained weights are from the sparse copy)
    and the budget's group threshold (in units of a typical unit of each group)."""
    steps = [row["step"] for row in trace]
    ax.plot(steps, [row.get("w_minus_u") for row in trace], color="#8e44ad", label="max |w - u|")
    ax.set_xlabel("step")
    ax.set_title("splitting")
    ax.grid(alpha=0.3)
    taus = [row.get("tau") for row in trace]
    if any(_is_num(t) for t in taus):
        twin = ax.twinx()
        twin.plot(steps, [t if _is_num(t) else None for t in taus], color="#16a085", ls="--",
                  label="group threshold")  # fmt: skip
        twin.set_ylabel("group threshold (x median unit norm)")
        twin.legend(fontsize=8, loc="upper right")
    ax.legend(fontsize=8, loc="upper left")


def _plot_seek(ax, stages: Sequence[Mapping], baseline: float | None) -> None:
    """The accuracy seeker's checks: the sparse model's accuracy at the end of each stage
    (bars: the standard error of its drop), filled when within the allowed drop, hollow
    when over it, labelled with the MACs reduction the stage held."""
    for row in stages:
        ok = bool(row.get("within"))
        ax.errorbar([row["step"]], [row["accuracy"]], yerr=[row.get("stderr") or 0.0],
                    marker="o", ls="", color="#2f6fdb", capsize=2,
                    markerfacecolor="#2f6fdb" if ok else "white")  # fmt: skip
        ax.annotate(f"{row['macs_x']:.2f}x", (row["step"], row["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))  # fmt: skip
    if _is_num(baseline):
        ax.axhline(baseline, ls="--", color="grey", label="baseline")
        ax.legend(fontsize=8)
    ax.set_title("accuracy seeker (filled: within)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _plot_switch(ax, trace: Sequence[Mapping]) -> None:
    """Accuracy of the sparse model over the switch from full-precision to quantised
    activations (``t`` from 0 to 1)."""
    ax.plot([row["t"] for row in trace], [row["sparse_accuracy"] for row in trace],
            marker="o", color="#c0392b")  # fmt: skip
    ax.set_title("accuracy over the activation switch (%)")
    ax.set_xlabel("t (0: full precision, 1: quantised)")
    ax.grid(alpha=0.3)


# --------------------------------------------------------------------------- writing


def _jsonable(obj: Any) -> Any:
    """Plain JSON: non-finite floats become None, tuples lists, numpy/torch scalars numbers."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_jsonable(v) for v in obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return _jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    raise TypeError(f"report value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


def write_report(report: Mapping, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``report.json``, ``report.md`` and the plots (each atomically) into ``out_dir``.

    Plots without data are skipped. The written report's ``outputs`` is the
    given list plus the files written here (``report.json`` is written last, so
    its presence means the report is complete). Returns the paths written.
    The ``report`` argument itself is not modified.
    """
    out = Path(out_dir)
    report = _jsonable(report)
    written: list[Path] = []
    for name, plot in ((CHANNELS_PNG, plot_channels), (TRAINING_PNG, plot_training)):
        try:
            if plot(report, out / name):
                written.append(out / name)
        except OSError:
            raise
        except Exception:  # a broken plot must not cost the run its report
            log.warning("could not draw %s", name, exc_info=True)
    names = [REPORT_JSON, REPORT_MD, *(p.name for p in written)]
    outputs = list(report.get("outputs") or [])
    report["outputs"] = outputs + [n for n in names if n not in outputs]
    report.setdefault("schema", SCHEMA_VERSION)
    atomic_write_text(out / REPORT_MD, render_markdown(report))
    atomic_write_text(out / REPORT_JSON, json.dumps(report, indent=2, allow_nan=False) + "\n")
    return [out / REPORT_JSON, out / REPORT_MD, *written]
