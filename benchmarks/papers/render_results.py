"""Render the tables of benchmarks/papers/RESULTS.md from the results JSON.

    .venv/bin/python benchmarks/papers/render_results.py          # print the tables
    .venv/bin/python benchmarks/papers/render_results.py --write  # replace them in RESULTS.md

``--write`` replaces the text between ``<!-- BEGIN <name> -->`` and
``<!-- END <name> -->`` in RESULTS.md (names: the functions in ``TABLES``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _f(v, fmt: str = ".3g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and v == 0:
        return "0"
    return format(v, fmt)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def _med(q, fmt: str = ".3g") -> str:
    return "–" if not q else _f(q["median"], fmt)


def _sup(s: dict) -> str:
    return f"{_f(s['tp_mean'], '.2f')} / {_f(s['fp_mean'], '.2f')} / {_f(s['fn_mean'], '.2f')}"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def ts_setup() -> str:
    d = _load("teacher_student")
    if d is None:
        return "_teacher_student.json not found._"
    c, m, t = d["config"], d["machine"], d["teacher"]
    return "\n".join(
        [
            f"- command: `{d['command']}` ({d['seconds']:.0f} s)",
            f"- machine: {m['cpu_model']}, {m['usable_cores']} usable cores, torch {m['torch']}, "
            f"{c['threads']} thread; load average at start {m['load_average_at_start']}; "
            f"date {m['date']}",
            f"- d = {c['d']}, k = {c['k']} patches, output weights {c['output_weights']}; "
            f"teacher w* ({c['s']} nonzeros at {t['support']}, ||w*|| = {t['norm']}): "
            f"{[v for v in t['w_star'] if v]}",
            f"- {c['runs']} random initialisations ({c['init']}); seed {c['seed']}; float64",
            f"- RVSM: {c['steps']} steps, lr {c['lr']}, beta {c['beta0']} x {c['beta_growth']} "
            f"every {c['beta_every']} steps until step {c['beta_grows_until_step']}, then held "
            f"(final beta {0.5 * 1.25 ** (c['beta_grows_until_step'] // c['beta_every']):.2f}); "
            f"convergence window {c['window']} steps, tol_move {c['tol_move']}, "
            f"tol_limit {c['tol_limit']}, tol_angle {c['tol_angle']}",
        ]
    )


def ts_self_check() -> str:
    d = _load("teacher_student")
    if d is None or not d.get("self_check"):
        return "_no self-check in the results._"
    sc = d["self_check"]
    rows = [
        "| quantity | grad: cosine (min) | grad: error / MC std. error (max) | loss: rel. error (max) |",
        "|---|---|---|---|",
    ]
    for name in ("relu", "binary/clipped_relu", "binary/relu"):
        r = sc[name]
        rows.append(
            f"| {name} | {_f(r['grad_cosine_min'], '.4f')} | "
            f"{_f(r['grad_err_in_standard_errors_max'], '.2f')} | {_f(r['loss_rel_err_max'], '.3f')} |"
        )
    rows.append(f"\n{sc['samples']:,} Monte Carlo inputs per quantity, 4 points `w`.")
    return "\n".join(rows)


def ts_relu() -> str:
    d = _load("teacher_student")
    if d is None:
        return "_teacher_student.json not found._"
    rows = [
        "| setting | lambda | converged | same limit as ref. | spread (max pairwise) "
        "| TP / FP / FN (mean) | exact support | ‖u−w*‖/‖w*‖ (median) "
        "| prox-grad fixed point: ‖x−w*‖/‖w*‖ | ‖u_ref−x‖/‖w*‖ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in d["results"]:
        if s["activation"] != "relu":
            continue
        for r in s["results"]:
            pg = r["reference"].get("prox_gradient_fixed_point", {})
            sp = r["spread_converged"]
            rows.append(
                f"| {s['setting']} | {_f(r['lambda'])} | {_pct(r['converged_fraction'])} "
                f"| {_pct(r['learned_fraction'])} | {_f(sp['max_pairwise'] if sp else None, '.1e')} "
                f"| {_sup(r['support_converged_runs'])} "
                f"| {_pct(r['support_converged_runs']['exact_fraction'])} "
                f"| {_med(r['rel_dist_to_w_star_converged'], '.2e')} "
                f"| {_f(pg.get('rel_dist_to_w_star'), '.2e')} "
                f"| {_f(pg.get('rel_dist_to_rvsm_reference'), '.1e')} |"
            )
    return "\n".join(rows)


def _best_transient(traj: list[dict]) -> str:
    pts = [t for t in traj if t.get("angle_median") is not None and t["zero_fraction"] < 0.5]
    if not pts:
        return "–"
    best = min(pts, key=lambda t: t["angle_median"])
    return (
        f"step {best['step']}: {_f(best['angle_median'], '.2g')} rad, "
        f"exact {_pct(best['support_exact_fraction'])}, |u| {_f(best['u_norm_median'], '.2g')}"
    )


def ts_binary() -> str:
    d = _load("teacher_student")
    if d is None:
        return "_teacher_student.json not found._"
    rows = [
        "| setting | w0 scale | lambda | converged (u, w) | u stationary | u = 0 "
        "| TP / FP / FN (mean, all runs) | exact support | angle(u, w*) median (u ≠ 0) "
        "| ‖u‖ median | same limit as ref. | best checkpoint (median angle, exact support, ‖u‖) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in d["results"]:
        if s["activation"] != "binary":
            continue
        for r in s["results"]:
            rows.append(
                f"| {s['setting']} | {_f(r['init_scale'])} | {_f(r['lambda'])} "
                f"| {_pct(r['converged_fraction'])} | {_pct(r['u_stationary_fraction'])} "
                f"| {_pct(r['zero_limit_fraction'])} | {_sup(r['support_all_runs'])} "
                f"| {_pct(r['support_all_runs']['exact_fraction'])} "
                f"| {_angle_all(r)} | {_med(r['u_norm'], '.2g')} "
                f"| {_pct(r['learned_fraction'])} | {_best_transient(r['trajectory'])} |"
            )
    return "\n".join(rows)


def _angle_all(r: dict) -> str:
    q = r.get("angle_to_w_star_nonzero_converged")
    if q:
        return _f(q["median"], ".2g")
    traj = r["trajectory"][-1]
    return "–" if traj.get("angle_median") is None else f"{_f(traj['angle_median'], '.2g')}*"


def ts_sampled() -> str:
    d = _load("teacher_student")
    if d is None or not d.get("sampled_check"):
        return "_no sampled pass in the results._"
    rows = [
        "| setting | w0 scale | lambda | runs | same support as population run | u = 0 "
        "| TP / FP / FN (mean) | distance to population limit (median) | to w* (median) "
        "| tail std of u (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in d["sampled_check"]:
        if "tail_mean_rel_dist_to_population_limit" in c:
            to_pop = _med(c["tail_mean_rel_dist_to_population_limit"], ".2e") + " (rel., tail mean)"
            to_star = _med(c["rel_dist_to_w_star"], ".2e") + " (rel.)"
        else:
            to_pop = (
                _med(c["direction_dist_to_population_limit_both_nonzero"], ".2g")
                + " (unit directions)"
            )
            to_star = _med(c["angle_to_w_star_nonzero"], ".2g") + " rad"
        rows.append(
            f"| {c['setting']} | {_f(c['init_scale'])} | {_f(c['lambda'])} | {c['runs']} "
            f"| {_pct(c['same_final_support_as_population_fraction'])} "
            f"| {_pct(c['zero_limit_fraction'])} | {_sup(c['support'])} | {to_pop} | {to_star} "
            f"| {_med(c['tail_std_of_u'], '.2g')} |"
        )
    return "\n".join(rows)


def _ste_files() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob("ste_choice*.json"))]


def ste_setup() -> str:
    files = _ste_files()
    if not files:
        return "_ste_choice.json not found._"
    lines = []
    for d in files:
        c, m = d["config"], d["machine"]
        done = "complete" if d.get("complete") else f"INCOMPLETE ({len(d['runs'])} runs so far)"
        lines += [
            f"- command: `{d['command']}` ({d['seconds']:.0f} s, {done}); models "
            f"{c['models']}, seeds {c['seeds']}",
            f"  - machine: {m['cpu_model']}, {m['usable_cores']} usable cores, torch "
            f"{m['torch']}, {c['threads']} thread; load average at start "
            f"{m['load_average_at_start']}; date {m['date']}",
        ]
    c = files[0]["config"]
    lines += [
        f"- Fashion-MNIST: seeded training subsets (seed {c['train_subset_seed']}; the whole "
        f"training set where the budget says 60000), the full {c['test_size']}-image test "
        f"set; normalised with mean {c['normalisation']['mean']}, std "
        f"{c['normalisation']['std']}",
        "- budgets (the `budget` column below): "
        + "; ".join(sorted({f"**{_budget(d['config'])}**" for d in files})),
        f"- batch {c['batch']}, no weight decay; a seed fixes the initial weights and the data "
        f"order, identical across STEs and within a budget; first activation "
        f"{c['first_activation']}; 2-bit step alpha initialised at {c['quantized_alpha_init']} "
        f"and learned",
    ]
    return "\n".join(lines)


def _budget(config: dict) -> str:
    """The training budget a file's runs share: images, epochs and optimiser."""
    optimizer = config["optimizer"].replace(", no weight decay", "")
    return f"{config['train_size']} images x {config['epochs']} epochs, {optimizer}"


def _ste_runs() -> list[dict]:
    return [dict(r, budget=_budget(d["config"])) for d in _ste_files() for r in d["runs"]]


def ste_summary() -> str:
    runs = _ste_runs()
    if not runs:
        return "_ste_choice.json not found._"
    stes = ["clipped_relu", "relu", "identity"]
    groups: dict[tuple, dict[str, list]] = {}
    for r in runs:
        key = (r["budget"], r["model"], r["bits"])
        groups.setdefault(key, {}).setdefault(r["ste"] or "full precision", []).append(r)
    rows = [
        "| budget | model | activation | " + " | ".join(stes) + " | full-precision reference |",
        "|---|---|---|---|---|---|---|",
    ]
    fp = {(u, m): g.get("full precision", []) for (u, m, b), g in groups.items() if b is None}

    def cell(rs: list[dict]) -> str:
        if not rs:
            return "–"
        accs = [100 * r["test_accuracy"] for r in rs]
        loss = [r["train_loss_last_epoch"] for r in rs]
        acc = f"{sum(accs) / len(accs):.1f}%"
        if len(rs) > 1:
            acc += f" ({min(accs):.1f}–{max(accs):.1f}, n={len(rs)})"
        return f"{acc}; loss {sum(loss) / len(loss):.3f}"

    for (budget, model, bits), g in groups.items():
        if bits is None:
            continue
        rows.append(
            f"| {budget} | {model} | {bits}-bit | "
            + " | ".join(cell(g.get(s, [])) for s in stes)
            + f" | {cell(fp.get((budget, model), []))} |"
        )
    rows.append(
        "\nCells: mean test accuracy over seeds (range, number of seeds), and the mean "
        "training loss over the last epoch."
    )
    return "\n".join(rows)


def ste_table() -> str:
    runs = _ste_runs()
    if not runs:
        return "_ste_choice.json not found._"
    rows = [
        "| budget | model | activation | STE | seed | test accuracy | train loss (last epoch) "
        "| train loss (last 50 steps) | diverged | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        act = "full precision" if r["bits"] is None else f"{r['bits']}-bit"
        rows.append(
            f"| {r['budget']} | {r['model']} | {act} | {r['ste'] or '–'} | {r['seed']} "
            f"| {100 * r['test_accuracy']:.2f}% | {_f(r['train_loss_last_epoch'], '.4f')} "
            f"| {_f(r['train_loss_last_50_steps'], '.4f')} | {'yes' if r['diverged'] else 'no'} "
            f"| {r['seconds']:.0f} |"
        )
    return "\n".join(rows)


TABLES = {
    "ts_setup": ts_setup,
    "ts_self_check": ts_self_check,
    "ts_relu": ts_relu,
    "ts_binary": ts_binary,
    "ts_sampled": ts_sampled,
    "ste_setup": ste_setup,
    "ste_summary": ste_summary,
    "ste_table": ste_table,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="replace the tables in RESULTS.md")
    args = p.parse_args(argv)
    if not args.write:
        for name, fn in TABLES.items():
            print(f"<!-- {name} -->\n{fn()}\n")
        return
    path = HERE / "RESULTS.md"
    text = path.read_text()
    for name, fn in TABLES.items():
        pattern = re.compile(
            rf"(<!-- BEGIN {name} -->\n)(?:.*?\n)?(<!-- END {name} -->)", flags=re.DOTALL
        )
        text, n = pattern.subn(lambda m, fn=fn: m.group(1) + fn() + "\n" + m.group(2), text)
        if n != 1:
            raise SystemExit(f"RESULTS.md: expected one block {name}, found {n}")
    path.write_text(text)


if __name__ == "__main__":
    main()
