"""Render the tables of RESULTS.md sections 2 (latency) and 3 (tool overhead) from the JSON results.

Only the text between ``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->``
markers is replaced, so the prose around the tables (and the other sections)
stays as written. Missing JSON files leave their block untouched.

    .venv/bin/python benchmarks/render_results.py            # rewrite benchmarks/RESULTS.md
    .venv/bin/python benchmarks/render_results.py --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.fileio import atomic_write_text  # noqa: E402

HERE = Path(__file__).resolve().parent


def _g(x: float) -> str:
    return f"{x / 1e9:.2f}G" if x >= 1e8 else f"{x / 1e6:.1f}M"


def _mb(x: float) -> str:
    return f"{x / 2**20:.1f}"


def _ms(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def machine_line(data: dict) -> str:
    m = data["machine"]
    gpu = f"{m['gpu']} ({m['device']}, CUDA {m.get('cuda')}) with " if m.get("gpu") else ""
    return (
        f"Machine: {gpu}{m['cpu_model']} ({', '.join(m.get('cpu_flags', [])) or 'flags n/a'}), "
        f"{m['usable_cores']} usable cores, load average {m.get('load_average_at_start')} at start "
        f"and {m.get('load_average_at_end')} at end (shared with other jobs); "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}, Python {m['python']}. "
        f"Date: {m['date']}. Wall time: {data.get('seconds', '?')} s."
    )


def render_latency(data: dict) -> str:
    s = data["settings"]
    batches = [str(b) for b in s["batch_sizes"]]
    goal_b = str(max(s["batch_sizes"]))
    lines = [
        f"Command: `{data['command']}`",
        "",
        machine_line(data),
        "",
        f"Settings: input {'x'.join(map(str, s['input_shape']))}, {int(s['zero_fraction'] * 100)}% "
        f"of every group's units zeroed (seed {s['seed']}), onnxruntime CPU with "
        f"{s['onnxruntime_threads']} intra-op thread(s), {s['warmup']} warm-up and "
        f"{s['repeats']} timed runs per model and batch, dense and compact runs interleaved; "
        f"exporter preference {s['exporter_preference']}.",
        "",
    ]
    head = ["model", "round_to", "MACs dense → compact", "MACs ÷", "params ÷", "ONNX MB"]
    for b in batches:
        head += [f"b{b} ms dense / compact", f"b{b} speedup"]
    # per batch, the least speedup / MACs reduction asked (older results: 0.8 at the largest)
    goals = {str(r["batch"]): r.get("goal", 0.8) for r in data.get("summary", {}).get("rows", [])}
    goals = goals or {goal_b: 0.8}
    head += [f"speedup ÷ MACs ÷ (b{b}) ≥ {g}" for b, g in goals.items()]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in data["results"]:
        d = res["dense"]
        for r, c in res["compact"].items():
            row = [
                res["model"],
                r,
                f"{_g(d['macs'])} → {_g(c['macs'])}",
                f"{c['macs_reduction']:.2f}x",
                f"{c['params_reduction']:.2f}x",
                f"{_mb(d['onnx_bytes'])} → {_mb(c['onnx_bytes'])}",
            ]
            for b in batches:
                dl, cl = d["latency_ms"][b], c["latency_ms"][b]
                row += [
                    f"{_ms(dl['median_ms'])} / {_ms(cl['median_ms'])}",
                    f"{c['speedup'][b]:.2f}x",
                ]
            for b, goal in goals.items():
                q = c["speedup_over_macs_reduction"].get(b)
                row.append("–" if q is None else f"{q:.2f} " + ("yes" if q >= goal else "**no**"))
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", *robustness_table(data, goal_b)]
    summary = data.get("summary", {})
    if summary.get("all_met") is not None:
        def name(r: dict) -> str:
            return f"{r['model']} r{r['round_to']}" + (f" b{r['batch']}" if r.get("batch") else "")

        met = [name(r) for r in summary["rows"] if r["met"]]
        missed = [name(r) for r in summary["rows"] if r["met"] is False]
        lines += [
            "",
            f"Goal ({summary['goal']}): met by {', '.join(met) or 'none'}; "
            f"missed by {', '.join(missed) or 'none'}.",
        ]
    profiled = [res for res in data["results"] if "op_profile_ms" in res["dense"]]
    if profiled:
        pb = s.get("op_profile_batch")
        lines += [
            "",
            f"Where the time goes (onnxruntime's per-node profile, batch {pb}, ms per run, "
            "kinds above 2% of the dense time; NCHWc = MLAS blocked-layout kernels):",
            "",
        ]
        for res in profiled:
            dense = res["dense"]["op_profile_ms"]
            total = sum(dense.values())
            cols = ["dense"] + [f"r{r}" for r in res["compact"]]
            profs = [dense] + [c.get("op_profile_ms", {}) for c in res["compact"].values()]
            kinds = [k for k, v in dense.items() if v >= 0.02 * total]
            for p in profs[1:]:
                kinds += [k for k, v in p.items() if v >= 0.02 * sum(p.values()) and k not in kinds]
            lines += [
                f"*{res['model']}*",
                "",
                "| op kind | " + " | ".join(cols) + " |",
                "|---|" + "---|" * len(cols),
            ]
            for k in kinds:
                lines.append(f"| {k} | " + " | ".join(_ms(p.get(k, 0.0)) for p in profs) + " |")
            lines.append("| total | " + " | ".join(_ms(sum(p.values())) for p in profs) + " |")
            lines.append("")
    return "\n".join(lines).rstrip()


def robustness_table(data: dict, goal_b: str) -> list[str]:
    """``speedup / macs_reduction`` at ``goal_b`` by median, p90, fastest run and profile."""
    lines: list[str] = []
    lines += [
        f"How robust the batch-{goal_b} ratio is: `speedup ÷ MACs reduction` with the speedup "
        "taken from the medians, the p90s, the fastest runs, and onnxruntime's own "
        "per-node timings (its profiler, summed over nodes):",
        "",
        "| model | round_to | median | p90 | fastest | profile |",
        "|---|---|---|---|---|---|",
    ]
    for res in data["results"]:
        dense_prof = res["dense"].get("op_profile_ms")
        for r, c in res["compact"].items():
            red = c["macs_reduction"]
            cells = [c["speedup"], c.get("speedup_p90", {}), c.get("speedup_min", {})]
            row = [f"{x[goal_b] / red:.2f}" if goal_b in x else "–" for x in cells]
            prof = c.get("op_profile_ms")
            if dense_prof and prof:
                row.append(f"{sum(dense_prof.values()) / sum(prof.values()) / red:.2f}")
            else:
                row.append("–")
            lines.append(f"| {res['model']} | {r} | " + " | ".join(row) + " |")
    return lines


def render_latency_repeat(data: dict) -> str:
    """A shorter block for a repeat run: command, machine, settings, the robustness table."""
    s = data["settings"]
    goal_b = str(max(s["batch_sizes"]))
    lines = [
        f"Command: `{data['command']}` ({s['repeats']} timed runs per model and batch, "
        f"{s['onnxruntime_threads']} thread(s))",
        "",
        machine_line(data),
        "",
    ]
    lines += robustness_table(data, goal_b)
    lines += [
        "",
        "| model | round_to | MACs ÷ | "
        + " | ".join(f"b{b} speedup" for b in map(str, s["batch_sizes"]))
        + " |",
        "|---|---|---|" + "---|" * len(s["batch_sizes"]),
    ]
    for res in data["results"]:
        for r, c in res["compact"].items():
            lines.append(
                f"| {res['model']} | {r} | {c['macs_reduction']:.2f}x | "
                + " | ".join(f"{c['speedup'][str(b)]:.2f}x" for b in s["batch_sizes"])
                + " |"
            )
    return "\n".join(lines).rstrip()


def _fused(settings: dict) -> str:
    """Which kernels ran: ``splitting.fused`` (runs before it existed were eager)."""
    if settings.get("fused_in_use"):
        return "fused kernels (`torch.compile`)"
    return "eager kernels"


def _penalty_text(settings: dict) -> str:
    """The measured step's penalty: recorded as recipe overrides (now) or as a penalty dict."""
    if "recipe_overrides" in settings:
        return "recipe tl1-group with " + ", ".join(f"`{o}`" for o in settings["recipe_overrides"])
    pen = settings["penalty"]
    return (
        f"TL1 (strength {pen['individual']['strength']}) + group shrink (strength "
        f"{pen['group']['strength']}, weighting {pen['group']['weighting']})"
    )


def render_overhead(data: dict, variants: list[dict] = ()) -> str:
    s = data["settings"]
    steps = data["steps"]
    plain, rvsm = steps["plain"], steps["rvsm"]
    lines = [
        f"Command: `{data['command']}`",
        "",
        machine_line(data),
        "",
        f"Settings: {s['arch']} ({s['num_classes']} classes), batch {s['batch']} of "
        f"{'x'.join(map(str, s['input_shape']))}, {s['optimizer']}, torch {s['torch_threads']} "
        f"thread(s), {_penalty_text(s)}, prox every {s['prox_every']} step, "
        f"{_fused(s)}; "
        f"{s['reps']} interleaved step pairs after {s['warmup']} warm-up pairs.",
        "",
        "| step | forward+backward | coupling | optimizer | prox | total (median) |",
        "|---|---|---|---|---|---|",
        f"| plain | {_ms(plain['forward_backward']['median_ms'])} | – | "
        f"{_ms(plain['optimizer']['median_ms'])} | – | {_ms(plain['total']['median_ms'])} ms |",
        f"| RVSM | {_ms(rvsm['forward_backward']['median_ms'])} | "
        f"{_ms(rvsm['coupling']['median_ms'])} | {_ms(rvsm['optimizer']['median_ms'])} | "
        f"{_ms(rvsm['prox']['median_ms'])} | {_ms(rvsm['total']['median_ms'])} ms |",
        "",
        f"**Overhead (rvsm − plain) / plain = {100 * data['overhead']:.0f}%** "
        f"(goal ≤ {100 * data['goal_overhead']:.0f}%: {'met' if data['goal_met'] else '**not met**'}); "
        f"median of the per-pair ratios: {steps['paired_ratio_median']:.2f}x.",
    ]
    if variants:
        lines += ["", "Variants (same script, other settings; same machine):", ""]
        for v in variants:
            vs = v["settings"]
            every = vs.get("prox_every", 1)
            lines.append(
                f"- batch {vs['batch']} of {'x'.join(map(str, vs['input_shape']))}, "
                f"{vs['torch_threads']} torch thread(s), prox every "
                f"{'step' if every == 1 else f'{every} steps'}, {_fused(vs)}, {vs['reps']} pairs: plain "
                f"{_ms(v['plain_step_ms'])} ms, RVSM {_ms(v['rvsm_step_ms'])} ms, "
                f"**overhead {100 * v['overhead']:.0f}%** (prox alone "
                f"{_ms(v['components']['prox']['median_ms'])} ms); `{v['command']}` "
                f"({v['machine']['date']})"
            )
    comp = data["components"]
    share = data["components_share_of_plain_step"]
    lines += [
        "",
        f"Pieces alone ({s['component_reps']} runs each, median ms, and share of the plain step):",
        "",
        "| piece | ms | % of plain step |",
        "|---|---|---|",
    ]
    for k, v in comp.items():
        if isinstance(v, dict):
            lines.append(f"| `{k}` | {_ms(v['median_ms'])} | {100 * share[k]:.1f}% |")
    ctl = data.get("target_controller_update")
    if ctl:
        lines.append(
            f"| budget threshold choice (only with a target) | {_ms(ctl['median_ms'])} | "
            f"{100 * ctl['median_ms'] / data['plain_step_ms']:.1f}% |"
        )
    lines += [
        "",
        f"{comp['penalised_tensors']} penalised tensors, {comp['penalised_elements']:,} of the "
        f"model's {comp['model_elements']:,} weights; {comp['groups']} groups with "
        f"{comp['group_members']} member slices.",
    ]
    prof = data.get("profile_rvsm_step_top_ops")
    if prof:
        lines += [
            "",
            "torch.profiler, RVSM step, top ops by self CPU time (ms per step):",
            "",
            "| op | calls/step | ms/step |",
            "|---|---|---|",
        ]
        for row in prof[:12]:
            lines.append(f"| `{row['op']}` | {row['calls_per_step']} | {row['self_ms_per_step']} |")
    return "\n".join(lines).rstrip()


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(
        rf"(<!-- BEGIN generated: {re.escape(name)} -->).*?(<!-- END generated: {re.escape(name)} -->)",
        re.S,
    )
    if not pattern.search(text):
        raise SystemExit(f"RESULTS.md has no `generated: {name}` block")
    return pattern.sub(lambda m: m.group(1) + "\n" + body + "\n" + m.group(2), text)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def render(
    results_md: Path,
    latency: Path,
    overhead: Path,
    variants: list[Path],
    repeat: Path,
    avx512: Path | None = None,
) -> str:
    text = results_md.read_text()
    lat = _load(latency)
    if lat is not None:
        text = replace_block(text, "latency", render_latency(lat))
    other = _load(avx512) if avx512 is not None else None
    if other is not None and "<!-- BEGIN generated: latency-avx512 -->" in text:
        text = replace_block(text, "latency-avx512", render_latency(other))
    rep = _load(repeat)
    if rep is not None and "<!-- BEGIN generated: latency-repeat -->" in text:
        text = replace_block(text, "latency-repeat", render_latency_repeat(rep))
    ovh = _load(overhead)
    if ovh is not None:
        loaded = [v for v in map(_load, variants) if v is not None]
        text = replace_block(text, "overhead", render_overhead(ovh, loaded))
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--latency", type=Path, default=HERE / "results" / "latency.json")
    p.add_argument(
        "--latency-repeat",
        type=Path,
        default=HERE / "results" / "latency_depthwise_repeat.json",
        help="a repeat latency run rendered into the `latency-repeat` block, if both exist",
    )
    p.add_argument(
        "--latency-avx512",
        type=Path,
        default=HERE / "results" / "latency_avx512.json",
        help="the latency run on an AVX-512 CPU, rendered into the `latency-avx512` block",
    )
    p.add_argument("--overhead", type=Path, default=HERE / "results" / "rvsm_overhead.json")
    p.add_argument(
        "--overhead-variants",
        type=Path,
        nargs="*",
        default=[
            HERE / "results" / "rvsm_overhead_eager.json",
            HERE / "results" / "rvsm_overhead_prox4.json",
            HERE / "results" / "rvsm_overhead_threads0.json",
            HERE / "results" / "rvsm_overhead_224.json",
        ],
        help="more overhead runs with other settings, one line each (missing files are skipped)",
    )
    p.add_argument("--check", action="store_true", help="exit 1 if RESULTS.md is out of date")
    args = p.parse_args(argv)
    new = render(
        args.results_md, args.latency, args.overhead, args.overhead_variants,
        args.latency_repeat, args.latency_avx512,
    )  # fmt: skip
    if args.check:
        return 0 if new == args.results_md.read_text() else 1
    atomic_write_text(args.results_md, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
