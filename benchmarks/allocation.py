"""Which allocation across layers the budget should use, chosen on the validation split.

The equal-MACs comparison (``benchmarks/equal_macs.py``) fine-tunes for 2 epochs
over 10,000 training images; this runs compressor with that same fine-tuning at
the three MACs reductions Torch-Pruning's uniform ratio reaches there (2.08x,
4.66x, 8.72x), from the benchmarks' ResNet-20 that never saw the 5,000-image
validation split (``benchmarks/default_command.py``'s baseline and carve), and
scores every candidate on that validation split only. Candidates: the uniform
floor equal_macs chose (``target.balance=1``) and the sensitivity allocation
(``target.allocation=sensitivity``) at several floors, with the group term
equal_macs chose (tl1, a = 0.1), and the uniform floor with the recipe's own
group term (l0). The candidate with the
best mean validation accuracy over the three reductions is the one
``equal_macs.py --candidates`` then runs on the test images.

Rows go to ``benchmarks/results/allocation.json`` as each run ends (a rerun skips
what is recorded); the table goes into ``benchmarks/RESULTS.md`` (block
``allocation``).

    .venv/bin/python benchmarks/allocation.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import compressor  # noqa: E402
from benchmarks.common import load_results, record_command, start_benchmark  # noqa: E402
from benchmarks.default_command import VAL_IMAGES, carve  # noqa: E402
from benchmarks.equal_macs import compress_overrides  # noqa: E402
from benchmarks.render_results import replace_block  # noqa: E402
from benchmarks.train_baseline import DEFAULT_CACHE, DEFAULT_DATA, train_baseline  # noqa: E402
from compressor.fileio import atomic_write_text  # noqa: E402

log = logging.getLogger("benchmarks.allocation")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "allocation.json"
FACTORS = (2.08, 4.657, 8.72)  # Torch-Pruning's uniform-ratio reach (equal_macs.json)
GROUP_TERM = ["penalty.group.kind=tl1", "penalty.group.a=0.1"]  # equal_macs' chosen term
CANDIDATES = {
    "uniform, balance 1": GROUP_TERM + ["target.balance=1.0"],
    "sensitivity, balance 0.75": GROUP_TERM + ["target.allocation=sensitivity"],
    "sensitivity, balance 0.5": GROUP_TERM + [
        "target.allocation=sensitivity", "target.balance=0.5",
    ],
    "sensitivity, balance 0.25": GROUP_TERM + [
        "target.allocation=sensitivity", "target.balance=0.25",
    ],
    # the recipe's own group term (l0), with the uniform floor and with the seeker's floor
    "group l0, uniform, balance 1": ["target.balance=1.0"],
    "group l0, uniform, balance 0.75": ["target.balance=0.75"],
}  # fmt: skip


def run(name: str, factor: float, seed: int, *, baseline: str, npz: Path, work: Path) -> dict:
    start = time.perf_counter()
    report = compressor.compress(
        baseline, arch="resnet20", data=str(npz), recipe="tl1-group", target_macs=factor,
        out=str(work), overrides=compress_overrides(2) + CANDIDATES[name],
        device="cpu", seed=seed,
    )  # fmt: skip
    return {
        "name": name, "asked": factor, "seed": seed,
        "val_before": report["baseline"]["accuracy"], "val_after": report["compressed"]["accuracy"],
        "macs_x": report["reduction"]["macs_x"], "params_x": report["reduction"]["params_x"],
        "kept": report["compressed"]["channels_kept"], "exit": report["exit_code"],
        "wall_s": round(time.perf_counter() - start, 1),
    }  # fmt: skip


def render(data: dict) -> str:
    rows = data["runs"]
    lines = [
        "Validation accuracy (5,000 images carved from the training set, never trained on by "
        "the baseline or the fine-tuning), ResNet-20 at "
        f"{rows[0]['val_before'] if rows else '?'}% before; 2 epochs over 10,000 training images, "
        "seed 0, the group term equal_macs chose (tl1, a = 0.1) unless the row names l0 (the "
        "recipe's). "
        "Commands: " + ", ".join(f"`{c}`" for c in data.get("commands", [data["command"]])) + ".",
        "",
        "| allocation | "
        + " | ".join(f"{f:g}x: val % | params x" for f in FACTORS)
        + " | mean val % |",
        "|---|" + "---|---|" * len(FACTORS) + "---|",
    ]
    means = {}
    for name in CANDIDATES:
        cells, accs = [], []
        for f in FACTORS:
            row = next((r for r in rows if (r["name"], r["asked"]) == (name, f)), None)
            if row is None:
                cells += ["not run", ""]
                continue
            accs.append(row["val_after"])
            cells += [f"{row['val_after']:.2f}", f"{row['params_x']:.2f}"]
        if len(accs) == len(FACTORS):
            means[name] = statistics.mean(accs)
        mean = f"{means[name]:.2f}" if name in means else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    if means:
        lines += ["", f"Chosen (best mean): **{max(means, key=means.get)}**."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", default=None, help="';'-separated names (default: all)")
    p.add_argument("--factors", default=",".join(f"{f:g}" for f in FACTORS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    start_benchmark(args.threads)
    data = load_results(args.results, "allocation", argv)
    names = args.candidates.split(";") if args.candidates else list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        p.error(f"unknown candidates {unknown}; known: {list(CANDIDATES)}")
    if not args.render_only:
        record_command(data, "allocation", argv)
        cache = Path(args.cache_dir)
        baseline = train_baseline(
            data_dir=args.data, epochs=8, holdout=VAL_IMAGES, cache_dir=cache
        )["path"]
        npz = carve(Path(args.data), cache, 10000)
        for factor in [float(f) for f in args.factors.split(",")]:
            for name in names:
                if any((r["name"], r["asked"], r["seed"]) == (name, factor, args.seed)
                       for r in data["runs"]):  # fmt: skip
                    continue
                work = cache / "allocation" / f"{name.replace(' ', '_')}_{factor:g}x_s{args.seed}"
                row = run(name, factor, args.seed, baseline=baseline, npz=npz, work=work)
                log.info("%s", row)
                data["runs"].append(row)
                args.results.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(args.results, json.dumps(data, indent=2) + "\n")
    text = args.results_md.read_text()
    atomic_write_text(args.results_md, replace_block(text, "allocation", render(data)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
