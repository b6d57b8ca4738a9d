import json
import math

import pytest

from compressor import report as rp
from compressor.errors import EXIT_GATE_FAILED, EXIT_OK, EXIT_VERIFICATION_FAILED

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic(epochs=3, exit_code=EXIT_OK):
    r = rp.new_report(
        command=["compress", "model.pt", "--recipe", "tl1-group"],
        recipe={"name": "tl1-group", "train": {"epochs": epochs, "lr": 0.01}},
        input={"checkpoint": "model.pt", "arch": "resnet20", "data": "fashion-mnist"},
        created="2025-01-01T00:00:00+00:00",
    )
    r["input"]["device"] = "cpu"
    r["baseline"].update(accuracy=93.6, params=272_474, macs=41_214_656, onnx_bytes=1_100_000)
    r["compressed"].update(
        accuracy=93.1,
        params=88_000,
        macs=17_100_000,
        onnx_bytes=360_000,
        weight_sparsity=0.42,
        channels_kept=300,
        channels_total=448,
    )
    r["reduction"] = rp.reduction_factors(r["baseline"], r["compressed"])
    r["verification"].update(
        onnx_checker=True,
        sparse_vs_pruned_max_abs=1.2e-6,
        torch_vs_onnxruntime_max_abs=3.4e-6,
        top1_agreement=1.0,
        samples=256,
        notes=["BN recalibrated on 200 batches"],
    )
    r["latency_ms"] = rp.latency_section(
        {"baseline": {1: 1.5, 8: 6.0}, "compressed": {1: 0.75, 8: 2.0}}
    )
    r["layers"] = [
        {"name": "conv1", "type": "Conv2d", "shape_before": [16, 1, 3, 3],
         "shape_after": [12, 1, 3, 3], "sparsity": 0.1},
        {"name": "layer1.0|conv1", "type": "Conv2d", "shape_before": [16, 16, 3, 3],
         "shape_after": [8, 12, 3, 3], "sparsity": 0.5},
        {"name": "fc", "type": "Linear", "shape_before": [10, 64], "shape_after": [10, 40],
         "sparsity": 0.0},
    ]  # fmt: skip
    r["epochs"] = [
        {"epoch": i + 1, "loss": 1.0 / (i + 1), "accuracy": 90.0 + i, "weight_sparsity": 0.1 * i,
         "channel_sparsity": 0.05 * i, "beta": 1.0, "strength": 0.5 + i, "macs_x": 1.0 + 0.5 * i}
        for i in range(epochs)
    ]  # fmt: skip
    r["target"] = rp.target_summary("macs", 2.5, r["reduction"]["macs_x"])
    r["gates"] = rp.evaluate_gates(r, max_accuracy_drop=1.0)
    r["timings_s"] = {"train": 120.5, "prune": 1.25, "export": 3.0}
    r["exit_code"] = exit_code
    r["outputs"] = ["model.onnx", "model.safetensors"]
    return r


def test_write_report_files(tmp_path):
    r = synthetic()
    before = json.dumps(r, sort_keys=True)
    paths = rp.write_report(r, tmp_path)
    assert json.dumps(r, sort_keys=True) == before, "the caller's dict must not change"
    names = [p.name for p in paths]
    assert names == ["report.json", "report.md", "channels_per_layer.png", "training.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names), "no temp files left"
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG_SIGNATURE
            assert p.stat().st_size > 1000

    data = json.loads((tmp_path / "report.json").read_text())
    assert data["schema"] == 1
    assert data["tool"]["name"] == "compressor"
    assert data["outputs"] == [
        "model.onnx", "model.safetensors", "report.json", "report.md",
        "channels_per_layer.png", "training.png",
    ]  # fmt: skip
    data.pop("outputs")
    expected = json.loads(before)
    expected.pop("outputs")
    assert data == expected


def test_markdown_content(tmp_path):
    rp.write_report(synthetic(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    first = md.splitlines()[0]
    assert first.startswith("## ✅") and "PASS" in first and "resnet20" in first
    for text in [
        "2.41x fewer MACs",  # 41.21 M / 17.1 M
        "3.10x fewer params",
        "93.60%",
        "93.10%",
        "-0.50 pts",
        "41.21 M",
        "17.10 M",
        "272.47 k",
        "1.05 MiB",
        "| Latency, batch 1 (ms, ORT CPU median) | 1.50 | 0.750 | 2.00x |",
        "| Latency, batch 8 (ms, ORT CPU median) | 6.00 | 2.00 | 3.00x |",
        "channels kept 300 / 448",
        "| ONNX checker (full) | ✅ passed |",
        "3.40e-06",
        "100.00% of 256 samples",
        "BN recalibrated",
        "| accuracy_drop | 1 | 0.5 | ✅ pass |",
        "**Target:** 2.50x fewer MACs asked, 2.41x reached ✅",
        "<details><summary>Per-layer shapes (3 layers)</summary>",
        "`layer1.0\\|conv1`",  # pipes escaped inside table cells
        "16×16×3×3",
        "| Epoch | Loss | Accuracy |",
        "compress model.pt --recipe tl1-group",
        "train 120.5 s",
        '"lr": 0.01',
    ]:
        assert text in md, text
    # every table row has the header's number of cells
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert all(line.endswith("|") for line in rows)


@pytest.mark.parametrize(
    "code, word",
    [(EXIT_GATE_FAILED, "GATE FAILED"), (EXIT_VERIFICATION_FAILED, "VERIFICATION FAILED")],
)
def test_headline_by_exit_code(code, word):
    head = rp.render_markdown(synthetic(exit_code=code)).splitlines()[0]
    assert head.startswith("## ❌") and word in head


def test_headline_names_failed_gates():
    r = synthetic(exit_code=EXIT_GATE_FAILED)
    r["gates"] = rp.evaluate_gates(r, max_accuracy_drop=0.1)
    head = rp.render_markdown(r).splitlines()[0]
    assert "GATE FAILED" in head and "(failed: accuracy_drop)" in head
    assert "| accuracy_drop | 0.1 | 0.5 | ❌ fail |" in rp.render_markdown(r)


def test_zero_epochs_and_no_layers(tmp_path):
    r = synthetic(epochs=0)
    r["layers"] = []
    r["latency_ms"] = None
    r["compressed"]["accuracy"] = None
    paths = rp.write_report(r, tmp_path)
    assert [p.name for p in paths] == ["report.json", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
    data = json.loads((tmp_path / "report.json").read_text())
    assert "training.png" not in data["outputs"] and "channels_per_layer.png" not in data["outputs"]
    md = (tmp_path / "report.md").read_text()
    assert "No training epochs were run." in md
    assert "not measured" in md


def test_empty_report_renders(tmp_path):
    paths = rp.write_report(rp.new_report(), tmp_path)
    assert [p.name for p in paths] == ["report.json", "report.md"]
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("## ⏳ compressor: INCOMPLETE")
    assert "No gates were set." in md


def test_error_is_shown():
    r = rp.new_report()
    r["exit_code"] = EXIT_VERIFICATION_FAILED
    r["error"] = "ONNX model disagrees"
    md = rp.render_markdown(r)
    assert "VERIFICATION FAILED" in md and "> **Error:** ONNX model disagrees" in md


def test_json_is_strict(tmp_path):
    import numpy as np

    r = synthetic()
    r["verification"]["torch_vs_onnxruntime_max_abs"] = float("nan")
    r["compressed"]["params"] = np.int64(88_000)
    r["baseline"]["macs"] = np.float32(4.0e7)
    r["layers"][0]["shape_before"] = (16, 1, 3, 3)
    rp.write_report(r, tmp_path)
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["verification"]["torch_vs_onnxruntime_max_abs"] is None
    assert data["compressed"]["params"] == 88_000
    assert data["layers"][0]["shape_before"] == [16, 1, 3, 3]


def test_only_training_plot_with_partial_epoch_data(tmp_path):
    r = rp.new_report()
    r["epochs"] = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4, "accuracy": None}]
    paths = rp.write_report(r, tmp_path)
    assert [p.name for p in paths] == ["report.json", "report.md", "training.png"]
    assert (tmp_path / "training.png").read_bytes()[:8] == PNG_SIGNATURE
    md = (tmp_path / "report.md").read_text()
    assert "| Epoch | Loss |" in md and "Strength" not in md


# --------------------------------------------------------------------------- gates


def _acc(base, comp):
    return {"baseline": {"accuracy": base}, "compressed": {"accuracy": comp}}


def test_accuracy_gate_pass_and_fail():
    (g,) = rp.evaluate_gates(_acc(93.6, 93.0), max_accuracy_drop=1.0)
    assert g["name"] == "accuracy_drop" and g["passed"] is True
    assert math.isclose(g["value"], 0.6) and g["threshold"] == 1.0
    (g,) = rp.evaluate_gates(_acc(93.6, 92.0), max_accuracy_drop=1.0)
    assert g["passed"] is False and math.isclose(g["value"], 1.6)
    (g,) = rp.evaluate_gates(_acc(90.0, 91.0), max_accuracy_drop=0.0)  # improved
    assert g["passed"] is True
    assert rp.gates_passed([g]) and rp.gates_passed([])


@pytest.mark.parametrize("base, comp", [(None, 93.0), (93.0, None), (None, None)])
def test_accuracy_gate_not_measured(base, comp):
    (g,) = rp.evaluate_gates(_acc(base, comp), max_accuracy_drop=1.0)
    assert g["passed"] is False and g["value"] is None and g["detail"] == "not measured"
    assert not rp.gates_passed([g])


def test_no_gates_without_thresholds():
    assert rp.evaluate_gates(_acc(93.6, 50.0)) == []


def test_target_gate():
    r = {"reduction": {"macs_x": 1.9, "params_x": 3.0}}
    (g,) = rp.evaluate_gates(r, target={"kind": "macs", "asked": 2.0})
    assert g["name"] == "target_macs" and g["passed"] and math.isclose(g["threshold"], 1.9)
    (g,) = rp.evaluate_gates(r, target={"kind": "macs", "asked": 2.1})
    assert not g["passed"]
    (g,) = rp.evaluate_gates(r, target={"kind": "params", "asked": 3.0, "reached": 2.0})
    assert not g["passed"] and g["value"] == 2.0  # explicit reached wins
    (g,) = rp.evaluate_gates({"reduction": {}}, target={"kind": "macs", "asked": 2.0})
    assert not g["passed"] and g["detail"] == "not measured"
    lat = {"latency_ms": {"speedup": {"batch_1": 1.5}}}
    (g,) = rp.evaluate_gates(lat, target={"kind": "latency", "asked": 1.5})
    assert g["passed"]
    # the report's own target is used when none is passed
    r["target"] = rp.target_summary("macs", 2.0, 1.9)
    assert r["target"]["within"] is True
    gates = rp.evaluate_gates({**r, **_acc(90, 89)}, max_accuracy_drop=0.5)
    assert [g["name"] for g in gates] == ["accuracy_drop", "target_macs"]
    assert [g["passed"] for g in gates] == [False, True]


def test_latency_target_line_warns_when_the_machine_changed_speed_during_the_run():
    """The latency model's baseline (timed before training) against the one timed beside the
    compressed model: within 20% nothing is said; twice as slow, report.md says the plan was
    made at another speed (the asked milliseconds meant another cut)."""

    def line(calibrated_ms):
        one = {"kind": "latency", "asked_ms": 2.97, "reached_ms": 1.75, "baseline_ms": 7.42,
               "batch": 1, "met": True, "predicted_ms": 2.44, "model": {"base_ms": calibrated_ms}}
        return "\n".join(rp._target_line({"target": {"kind": "latency", "targets": [one]}}))

    assert "another speed" not in line(7.9) and "ms reached" in line(7.9)
    slow = line(15.99)
    assert "timed the baseline at 15.99 ms, 2.15x the 7.42 ms" in slow
    assert "another speed" in slow and "quieter machine" in slow
    assert "another speed" in line(5.0)  # faster counts too


def test_helpers():
    assert rp.reduction_factors({"macs": 10, "params": None}, {"macs": 4, "params": 2}) == {
        "macs_x": 2.5,
        "params_x": None,
        "size_x": None,
    }
    lat = rp.latency_section({"baseline": {1: 2.0}, "compressed": {1: 0.5}})
    assert lat == {
        "baseline": {"batch_1": 2.0},
        "compressed": {"batch_1": 0.5},
        "speedup": {"batch_1": 4.0},
    }
    assert rp.target_summary("macs", 2.0, None)["within"] is False


# --------------------------------------------------------------------------- issue 18


def test_headline_says_the_exit_code_and_the_accuracy_drop():
    """A collapsed model: the first line says FAIL, the exit code and the drop against the gate."""
    r = synthetic(exit_code=EXIT_GATE_FAILED)
    r["baseline"]["accuracy"], r["compressed"]["accuracy"] = 91.2, 13.5
    r["gates"] = rp.evaluate_gates(r, max_accuracy_drop=5.0)
    head = rp.render_markdown(r).splitlines()[0]
    assert head.startswith("## ❌") and "GATE FAILED (exit 3)" in head
    assert "accuracy 91.2% → 13.5% (-77.7 points, gate 5.0)" in head
    ok = rp.render_markdown(synthetic()).splitlines()[0]
    assert "PASS (exit 0)" in ok and "points" not in ok


def test_a_failed_run_says_fail_and_its_exit_code():
    r = rp.new_report(input={"arch": "lenet5"})
    r["exit_code"] = 1
    r["error"] = "the training loss became nan at epoch 1, step 4"
    md = rp.render_markdown(r)
    assert md.splitlines()[0] == "## ❌ compressor: FAILED (exit 1) — lenet5"
    assert "> **Error:** the training loss became nan" in md


def _capture_figures(monkeypatch) -> list:
    figures = []
    monkeypatch.setattr(rp, "_save_png", lambda fig, path: figures.append(fig))
    return figures


def test_channels_plot_counts_the_units_the_report_counts(monkeypatch):
    """The title's totals are the report's channels kept / total (prunable channel groups),
    not a sum over every layer (norm layers and the classifier counted again)."""
    figures = _capture_figures(monkeypatch)
    r = synthetic()
    r["layers"].insert(1, {"name": "bn1", "type": "BatchNorm2d", "shape_before": [16],
                           "shape_after": [12], "sparsity": 0.0})  # fmt: skip
    r["channel_groups"] = [
        {"root": "conv1", "before": 16, "after": 12},
        {"root": "layer1.0.conv1", "before": 432, "after": 288},
    ]
    assert rp.plot_channels(r, "unused.png")
    (ax,) = figures[0].axes
    kept, total = r["compressed"]["channels_kept"], r["compressed"]["channels_total"]
    assert f"{kept} of {total} kept" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["conv1", "layer1.0.conv1"]


def test_training_plot_shows_the_reduction_against_the_target(monkeypatch):
    figures = _capture_figures(monkeypatch)
    r = synthetic()
    assert rp.plot_training(r, "unused.png")
    axes = figures[0].axes
    texts = " ".join(
        [ax.get_title() for ax in axes]
        + [ax.get_ylabel() for ax in axes]
        + [t.get_text() for ax in axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    ).lower()
    assert "strength" not in texts
    reduction = next(ax for ax in axes if "reduction" in ax.get_title())
    ys = [tuple(line.get_ydata()) for line in reduction.get_lines()]
    assert tuple(e["macs_x"] for e in r["epochs"]) in ys  # the reduction reached per epoch
    assert (2.5, 2.5) in ys  # the asked target, as a horizontal line
    accuracy = next(ax for ax in axes if "accuracy" in ax.get_title())
    gate = r["baseline"]["accuracy"] - 1.0  # synthetic's accuracy gate is 1 point
    assert (gate, gate) in [tuple(line.get_ydata()) for line in accuracy.get_lines()]


def test_epoch_table_drops_the_internal_strength():
    r = synthetic()
    for e in r["epochs"]:
        e["params_x"] = 1.0 + e["epoch"]
    md = rp.render_markdown(r)
    header = next(line for line in md.splitlines() if line.startswith("| Epoch"))
    assert "Strength" not in header
    assert "MACs reduction" in header and "Params reduction" in header


def test_markdown_states_the_input_preprocessing_and_both_sparsities():
    r = synthetic()
    r["compressed"]["weight_sparsity"] = 0.079
    r["compressed"]["sparse_model_weight_sparsity"] = 0.269
    r["preprocessing"] = {
        "scale": 1 / 255, "mean": [0.2860], "std": [0.3530], "input_shape": [1, 28, 28],
    }  # fmt: skip
    md = rp.render_markdown(r)
    line = next(line for line in md.splitlines() if line.startswith("**Input preprocessing**"))
    assert "1×28×28" in line and "pixels × 1/255" in line
    assert "mean [0.286], std [0.353]" in line
    assert "weight sparsity 7.9% (26.9% in the sparse model" in md
    r["preprocessing"] = {"scale": 1.0, "mean": [0.0], "std": [1.0], "input_shape": [1, 8, 8]}
    line = next(
        line
        for line in rp.render_markdown(r).splitlines()
        if line.startswith("**Input preprocessing**")
    )
    assert "used as stored" in line and "mean" not in line


# --------------------------------------------------------------------------- op profile

PROFILE = {
    "baseline": {"3x3 conv (NCHWc)": 8.0, "depthwise conv (NCHWc)": 4.0, "1x1 conv (NCHWc)": 2.0,
                 "layout reorder": 1.0, "MaxPool": 0.5, "Add": 0.4, "Gemm": 0.3, "Relu": 0.2,
                 "Reshape": 0.06, "Flatten": 0.04},
    "compressed": {"3x3 conv (plain NCHW)": 5.0, "depthwise conv (NCHWc)": 1.0,
                   "1x1 conv (NCHWc)": 1.0, "layout reorder": 2.0, "MaxPool": 0.25, "Add": 0.2,
                   "Gemm": 0.1, "Relu": 0.1, "Reshape": 0.05, "Flatten": 0.05},
}  # fmt: skip


def _profile_rows(md: str) -> dict[str, list[str]]:
    """The "where the time went" table of report.md: {op kind: [baseline, compressed, ratio]}."""
    lines = md.splitlines()
    start = lines.index("### Where the time went")
    header = next(i for i in range(start, len(lines)) if lines[i].startswith("| Op kind"))
    rows = {}
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_latency_section_keeps_the_op_profiles():
    lat = rp.latency_section({"baseline": {1: 2.0}, "compressed": {1: 1.0}}, op_profiles=PROFILE)
    assert lat["op_profile_ms"] == PROFILE and lat["speedup"] == {"batch_1": 2.0}
    assert "op_profile_ms" not in rp.latency_section({"baseline": {1: 2.0}})


def test_markdown_shows_where_the_time_went():
    """The top 8 kinds of either model, by baseline time, then "other" and "total"."""
    r = synthetic()
    r["latency_ms"] = rp.latency_section(
        {"baseline": {1: 1.5}, "compressed": {1: 0.75}}, op_profiles=PROFILE
    )
    rows = _profile_rows(rp.render_markdown(r))
    assert list(rows) == [
        "3x3 conv (NCHWc)", "depthwise conv (NCHWc)", "1x1 conv (NCHWc)", "layout reorder",
        "MaxPool", "Add", "Gemm", "3x3 conv (plain NCHW)", "other", "total",
    ]  # fmt: skip
    assert rows["depthwise conv (NCHWc)"] == ["4.00", "1.00", "4.00x"]
    assert rows["layout reorder"] == ["1.00", "2.00", "0.50x"]  # slower after compression
    assert rows["3x3 conv (NCHWc)"][1] == "—"  # not in the compressed model
    assert rows["3x3 conv (plain NCHW)"][0] == "—"
    assert rows["other"] == ["0.300", "0.200", "1.50x"]  # Relu, Reshape, Flatten
    assert rows["total"][:2] == ["16.50", "9.75"]
    r["latency_ms"] = rp.latency_section({"baseline": {1: 1.5}, "compressed": {1: 0.75}})
    assert "Where the time went" not in rp.render_markdown(r)


def test_compress_records_the_op_profile(lenet, tmp_path, monkeypatch, one_thread):
    """A real run: report.json holds both models' profiles, report.md tabulates them, and
    no profile file is left in the output folder or the working directory."""
    import compressor

    checkpoint, data = lenet
    work, out = tmp_path / "cwd", tmp_path / "out"
    work.mkdir()
    monkeypatch.chdir(work)
    compressor.compress(
        str(checkpoint), arch="lenet5", data=str(data), out=out, device="cpu",
        overrides=["train.epochs=1", "train.max_steps_per_epoch=2", "gates.max_accuracy_drop=null",
                   "train.bn_recalibration_batches=2", "export.verify_samples=8"],
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    prof = report["latency_ms"]["op_profile_ms"]
    assert set(prof) == {"baseline", "compressed"}
    for side in prof.values():
        assert any("conv" in k for k in side) and "Gemm" in side, side
        assert all(ms > 0 for ms in side.values())
    rows = _profile_rows((out / "report.md").read_text())
    assert set(rows) - {"other", "total"} <= set(prof["baseline"]) | set(prof["compressed"])
    assert next(iter(prof["baseline"])) in rows  # the slowest kind is shown
    assert list(work.iterdir()) == []
    assert not [p for p in out.rglob("*") if "profile" in p.name or p.suffix == ".json"
                and p.name != "report.json"]  # fmt: skip


def test_training_plot_shows_the_seekers_checks_and_the_activation_switch(monkeypatch):
    """The seeker's stages (accuracy per check, over-budget ones hollow) and the accuracy over
    the activation switch get their own panels, with the recorded numbers."""
    figures = _capture_figures(monkeypatch)
    r = synthetic()
    r["target"] = {"kind": "seek_macs", "asked": None, "stages": [
        {"step": 10, "macs_x": 1.3, "accuracy": 90.5, "within": True},
        {"step": 20, "macs_x": 1.69, "accuracy": 88.0, "within": False},
    ]}  # fmt: skip
    r["activations"] = {"switch": {"trace": [
        {"step": 0, "t": 0.0, "sparse_accuracy": 91.0},
        {"step": 5, "t": 0.5, "sparse_accuracy": 89.0},
        {"step": 10, "t": 1.0, "sparse_accuracy": 88.5},
    ]}}  # fmt: skip
    assert rp.plot_training(r, "unused.png")
    axes = figures[0].axes
    seek = next(ax for ax in axes if "seeker" in ax.get_title())
    points = [(tuple(ln.get_xdata()), tuple(ln.get_ydata()), ln.get_markerfacecolor())
              for ln in seek.get_lines() if ln.get_marker() == "o"]  # fmt: skip
    assert [(p[0], p[1]) for p in points] == [((10,), (90.5,)), ((20,), (88.0,))]
    assert points[0][2] != "white" and points[1][2] == "white"
    assert {t.get_text() for t in seek.texts} == {"1.30x", "1.69x"}
    switch = next(ax for ax in axes if "switch" in ax.get_title())
    (line,) = switch.get_lines()
    assert tuple(line.get_xdata()) == (0.0, 0.5, 1.0)
    assert tuple(line.get_ydata()) == (91.0, 89.0, 88.5)
