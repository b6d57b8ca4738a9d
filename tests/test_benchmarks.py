"""Smoke tests of the benchmark scripts: their quick modes run and write sane JSON."""

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def latency_json(tmp_path_factory):
    from benchmarks import latency

    out = tmp_path_factory.mktemp("latency") / "latency.json"
    latency.main(["--quick", "--models", "resnet18", "--repeats", "3", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def overhead_json(tmp_path_factory):
    from benchmarks import rvsm_overhead

    out = tmp_path_factory.mktemp("overhead") / "overhead.json"
    argv = ["--quick", "--batch", "4", "--resolution", "32", "--reps", "2"]
    rvsm_overhead.main([*argv, "--component-reps", "1", "--out", str(out)])
    return out


def test_latency_quick(latency_json):
    data = json.loads(latency_json.read_text())
    assert data["benchmark"] == "latency_vs_macs"
    assert data["command"].endswith(f"--out {latency_json}")
    for key in ("cpu_model", "usable_cores", "torch", "onnxruntime", "date"):
        assert data["machine"][key]
    (res,) = data["results"]
    assert res["model"] == "resnet18"
    dense = res["dense"]
    assert dense["macs"] > 0 and dense["params"] > 0 and dense["onnx_bytes"] > 0
    c = res["compact"]["1"]
    assert c["macs_reduction"] > 1.5
    assert c["params_reduction"] > 1.5
    assert c["onnx_bytes"] < dense["onnx_bytes"]
    assert c["prune_max_abs_diff"] < 1e-4
    for b in ("1", "4"):
        assert dense["latency_ms"][b]["median_ms"] > 0
        assert c["latency_ms"][b]["n"] == 3
        assert c["latency_ms"][b]["p90_ms"] >= c["latency_ms"][b]["median_ms"] > 0
        assert c["speedup"][b] > 0
        assert c["speedup_over_macs_reduction"][b] == pytest.approx(
            c["speedup"][b] / c["macs_reduction"]
        )
    # batch 16 was not timed: only batch 1's goal is judged
    (row,) = data["summary"]["rows"]
    assert row["batch"] == 1 and row["goal"] == 0.8
    assert row["met"] == (c["speedup_over_macs_reduction"]["1"] >= 0.8)


def test_rvsm_overhead_quick(overhead_json):
    data = json.loads(overhead_json.read_text())
    assert data["benchmark"] == "rvsm_step_overhead"
    assert data["settings"]["batch"] == 4
    assert data["plain_step_ms"] > 0 and data["rvsm_step_ms"] > 0
    assert data["overhead"] == pytest.approx(
        (data["rvsm_step_ms"] - data["plain_step_ms"]) / data["plain_step_ms"]
    )
    assert data["goal_met"] == (data["overhead"] <= 0.10)
    rvsm = data["steps"]["rvsm"]
    for phase in ("forward_backward", "coupling", "optimizer", "prox", "total"):
        assert rvsm[phase]["n"] == 2 and rvsm[phase]["median_ms"] >= 0
    comp = data["components"]
    one_pass = data["settings"]["fused_in_use"]  # resnet18: the fused one-pass prox
    last = "prox.sparse_group_pass" if one_pass else "prox.scale_"
    for piece in ("add_coupling_grad", "prox", "prox.group_factors", last):
        assert comp[piece]["median_ms"] > 0
    assert comp["penalised_elements"] <= comp["model_elements"]
    assert 0 < data["sparsity_after_run"]["u_zero_fraction"] < 1  # the prox sparsified u


def test_render_results(tmp_path, latency_json, overhead_json):
    from benchmarks import render_results

    md = tmp_path / "RESULTS.md"
    md.write_text(
        "## 1\nhand-written\n"
        "## 2\n<!-- BEGIN generated: latency -->\nSTALE-TABLE\n<!-- END generated: latency -->\n"
        "## 3\n<!-- BEGIN generated: overhead -->\n<!-- END generated: overhead -->\n"
    )
    argv = ["--results-md", str(md), "--latency", str(latency_json)]
    argv += ["--overhead", str(overhead_json), "--overhead-variants", str(tmp_path / "none.json")]
    assert render_results.main(argv) == 0
    text = md.read_text()
    assert "hand-written" in text and "STALE-TABLE" not in text
    assert "| resnet18 | 1 |" in text and "Overhead (rvsm − plain) / plain" in text
    assert render_results.main([*argv, "--check"]) == 0


def test_tradeoff_margins_against_each_reference_set():
    from benchmarks import tradeoff

    def run(method, target, accuracy, macs_x):
        return {"method": method, "target": target, "accuracy": accuracy, "macs_x": macs_x}

    runs = [
        run("tl1-group", 4.0, 92.4, 4.0),
        run("l1-group", 4.0, 92.0, 4.0),
        run("tp-magnitude", 4.0, 92.2, 4.7),
        run("tp-sparse", 4.0, 91.2, 4.7),
        run("tp-magnitude-kd", 4.0, 92.6, 4.7),
    ]
    best, rows = tradeoff.margins(runs, [4.0])
    assert best == "tl1-group"
    assert rows[0]["reference"] == "tp-magnitude"  # the better one as Torch-Pruning ships
    assert rows[0]["margin"] == pytest.approx(0.2) and rows[0]["met"] is False
    _, kd = tradeoff.margins(runs, [4.0], references=tradeoff.TP_KD_METHODS)
    assert kd[0]["reference"] == "tp-magnitude-kd" and kd[0]["margin"] == pytest.approx(-0.2)
    _, none = tradeoff.margins(runs[:2], [4.0])
    assert none == []


def test_equal_macs_run_asks_for_the_reduction_torch_pruning_reached():
    from benchmarks import tradeoff

    def run(method, target, accuracy, macs_x, seed=0):
        return {
            "method": method,
            "target": target,
            "accuracy": accuracy,
            "macs_x": macs_x,
            "seed": seed,
        }

    runs = [
        run("tp-magnitude", 4.0, 92.2, 4.66),
        run("tp-magnitude", 4.0, 92.0, 4.70, seed=1),
        run("tp-magnitude-kd", 4.0, 92.5, 4.66),
        run("tl1-group-eq", 4.0, 92.3, 4.67),
    ]
    assert tradeoff.reference_macs_x(runs, "tp-magnitude", 4.0, seed=1) == 4.70
    assert tradeoff.reference_macs_x(runs, "tp-magnitude", 4.0, seed=2) == 4.66  # seed 0's
    with pytest.raises(RuntimeError, match="--methods tp-magnitude --targets 8"):
        tradeoff.reference_macs_x(runs, "tp-magnitude", 8.0, seed=0)
    (row,) = tradeoff.equal_macs_rows(runs, [4.0, 8.0])
    assert row["method"] == "tl1-group-eq" and row["reference_macs_x"] == pytest.approx(4.68)
    assert row["references"] == {"tp-magnitude": pytest.approx(92.1), "tp-magnitude-kd": 92.5}
    assert row["margin"] == pytest.approx(0.2) and row["goal"] == 0.5 and row["met"] is False
    (met,) = tradeoff.equal_macs_rows([*runs[:3], run("tl1-group-eq", 4.0, 92.7, 4.67)], [4.0])
    assert met["margin"] == pytest.approx(0.6) and met["met"] is True
    assert tradeoff.best_recipe(runs) is None  # the equal-MACs runs are not a recipe of their own


def test_tradeoff_plot_follows_a_results_json_other_than_the_committed_one(tmp_path, monkeypatch):
    from benchmarks import tradeoff

    def resolved(*argv):
        return tradeoff.resolve_args(tradeoff.get_args_parser().parse_args(list(argv)))

    assert resolved().plot == tradeoff.ROOT / "benchmarks" / "tradeoff.png"
    study = tmp_path / "tradeoff_budget15.json"
    assert resolved("--results", str(study)).plot == tmp_path / "tradeoff_budget15.png"
    mine = tmp_path / "mine.png"
    assert resolved("--results", str(study), "--plot", str(mine)).plot == mine
    monkeypatch.chdir(tradeoff.ROOT)  # the committed JSON named by a relative path is still it
    committed = resolved("--results", "benchmarks/results/tradeoff.json")
    assert committed.plot == tradeoff.ROOT / "benchmarks" / "tradeoff.png"


def test_another_study_renders_into_its_own_block_of_section_1(tmp_path):
    from benchmarks import tradeoff

    args = tradeoff.resolve_args(
        tradeoff.get_args_parser().parse_args(
            ["--results", str(tmp_path / "tradeoff_budget15.json")]
        )
    )
    assert args.block == "tradeoff_budget15"
    assert tradeoff.resolve_args(tradeoff.get_args_parser().parse_args([])).block == "tradeoff"
    named = ["--results", str(tmp_path / "x.json"), "--block", "tradeoff"]
    assert tradeoff.resolve_args(tradeoff.get_args_parser().parse_args(named)).block == "tradeoff"

    md = tmp_path / "RESULTS.md"
    md.write_text(
        "# Benchmark results\n\n## 1. Accuracy–compression trade-off\n\n"
        "<!-- BEGIN generated: tradeoff -->\nmain table\n<!-- END generated: tradeoff -->\n\n"
        "Prose about the main table.\n\n## 2. Latency against MACs\n\nlatency\n"
    )
    tradeoff.update_results_md("study table v1", md, name="tradeoff_budget15")
    text = md.read_text()
    begin, end = tradeoff.markers("tradeoff_budget15")
    # Added at the end of section 1, after its prose; the main block and section 2 are kept.
    assert text.index("Prose about the main table.") < text.index(begin) < text.index("## 2.")
    assert "main table" in text and "latency" in text
    tradeoff.update_results_md("study table v2", md, name="tradeoff_budget15")
    text = md.read_text()
    assert text.count(begin) == 1 and text.count(end) == 1
    assert "study table v2" in text and "study table v1" not in text
    tradeoff.update_results_md("main table v2", md)  # the main block is still its own
    text = md.read_text()
    assert "main table v2" in text and "study table v2" in text and "\nmain table\n" not in text


def test_allocation_study_chooses_the_best_mean_validation_accuracy_over_every_factor():
    from benchmarks import allocation

    def row(name, factor, acc):
        return {"name": name, "asked": factor, "seed": 0, "val_before": 93.6, "val_after": acc,
                "params_x": 4.0, "macs_x": factor}  # fmt: skip

    uniform, sens = "uniform, balance 1", "sensitivity, balance 0.5"
    runs = [row(uniform, f, a) for f, a in zip(allocation.FACTORS, (92.3, 90.7, 87.4), strict=True)]
    runs += [row(sens, f, a) for f, a in zip(allocation.FACTORS, (92.8, 90.7, 88.3), strict=True)]
    runs += [row("sensitivity, balance 0.25", allocation.FACTORS[0], 99.0)]  # one factor only
    text = allocation.render({"command": "x", "runs": runs})
    assert f"Chosen (best mean): **{sens}**." in text
    assert "| sensitivity, balance 0.25 | 99.00 | 4.00 | not run |" in text
