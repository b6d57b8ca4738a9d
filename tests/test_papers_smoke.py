"""Smoke tests of the paper checks in benchmarks/papers (tiny runs; the real ones are in RESULTS.md)."""

import json
import math

import pytest
import torch

from benchmarks.papers import teacher_student as ts


def test_closed_forms_match_monte_carlo():
    """The population gradient (ReLU) and expected coarse gradients (binary) vs sampling."""
    torch.manual_seed(0)
    k, d = 4, 12
    w_star = ts.make_teacher(d, 3, seed=0)
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(3, d, generator=gen, dtype=ts.DTYPE) * torch.tensor(
        [[0.4], [1.0], [2.0]], dtype=ts.DTYPE
    )
    cases = [
        ("relu", None, lambda W: ts.relu_population_grad(W, w_star, k)),
        ("binary", "clipped_relu", lambda W: ts.binary_expected_coarse_grad(W, w_star, k)),
        ("binary", "relu", lambda W: ts.binary_expected_coarse_grad(W, w_star, k, "relu")),
    ]
    for activation, ste, closed in cases:
        g_mc, _ = ts.sampled_grad(W, w_star, k, 200_000, gen, activation, ste)
        cos = torch.cosine_similarity(g_mc, closed(W), dim=1)
        assert cos.min() > 0.97, (activation, ste, cos)
    # ReLU STE closed form: (w^ - w*^) / (k sqrt(2 pi)); zero at w = c w* and at w = 0.
    g = ts.binary_expected_coarse_grad(torch.stack([2.5 * w_star, 0 * w_star]), w_star, k)
    assert torch.equal(g[1], torch.zeros(d, dtype=ts.DTYPE))
    assert g[0].abs().max() < 1e-12
    # The binary loss depends on the direction only.
    l1 = ts.binary_population_loss(W, w_star, k)
    l2 = ts.binary_population_loss(7.0 * W, w_star, k)
    assert torch.allclose(l1, l2)


@pytest.mark.slow
def test_teacher_student_tiny_run(tmp_path):
    out = tmp_path / "ts.json"
    argv = [
        "--quick",
        "--runs",
        "3",
        "--steps",
        "200",
        "--window",
        "20",
        "--lambdas",
        "0.01",
        "--settings",
        "relu-l1",
        "binary-tl1",
        "--init-scales",
        "1",
        "--sampled-runs",
        "2",
        "--batch",
        "64",
        "--self-check-samples",
        "2000",
        "--out",
        str(out),
    ]
    result = ts.main(argv)
    data = json.loads(out.read_text())
    assert data["benchmark"] == "teacher_student_rvsm"
    assert data["schema_version"] == ts.SCHEMA_VERSION
    assert data["config"]["runs"] == 3 and data["config"]["steps"] == 200
    assert len(data["teacher"]["support"]) == data["config"]["s"]
    assert set(data["self_check"]) >= {"relu", "binary/clipped_relu", "binary/relu"}
    settings = {s["setting"]: s for s in data["results"]}
    assert set(settings) == {"relu-l1", "binary-tl1"}
    for s in data["results"]:
        (row,) = s["results"]
        assert row["lambda"] == 0.01 and row["runs"] == 3
        for key in ("converged_fraction", "learned_fraction", "zero_limit_fraction"):
            assert 0.0 <= row[key] <= 1.0
        sup = row["support_all_runs"]
        assert sup["tp_mean"] + sup["fn_mean"] == pytest.approx(data["config"]["s"])
        assert row["trajectory"][-1]["step"] == 200
        assert "reference" in row
    relu_row = settings["relu-l1"]["results"][0]
    assert "prox_gradient_fixed_point" in relu_row["reference"]
    assert "angle_to_w_star_nonzero_converged" in settings["binary-tl1"]["results"][0]
    assert [c["setting"] for c in data["sampled_check"]] == ["relu-l1", "binary-tl1"]
    assert all(math.isfinite(c["seconds"]) for c in data["sampled_check"])
    assert result["results"][0]["setting"] == "relu-l1"
