"""Ablation of the budget: which group term's threshold it sets, and its options, against Torch-Pruning.

Runs ``compressor.compress`` with ``--target-macs`` on the bundled example
checkpoint (ResNet-20, Fashion-MNIST) with the settings in ``VARIANTS``,
everything else equal (recipe ``tl1-group`` with its distillation, 2 epochs
over a fixed 10,000-image training subset, tested on the 10,000 test images,
seed 0). In every variant the budget only sets the group term's threshold, so
the zero set is the group prox's:

* ``group l1``: the group lasso; its threshold also shrinks every kept unit by
  the same amount (the bias of the L1 norm);
* ``group l0``: the group hard threshold; kept units are not shrunk;
* ``group tl1, a=...``: transformed L1 of the unit norm (norms in units of a
  typical unit of the group): between the two, nearer L0 for small ``a``;
* ``..., balance 0``: no per-group floor; ``..., uniform weighting``: units
  ranked by norm alone instead of norm per MACs they save.

Torch-Pruning's one-shot magnitude pruning (uniform ratio) plus fine-tuning for
the same 2 epochs, without and with the same distillation, runs first at each
target (``benchmarks/tradeoff.py``'s ``tp-magnitude`` and ``tp-magnitude-kd``);
compressor is then asked for the MACs reduction Torch-Pruning reached, so the
rows compare at equal MACs.

Results go to ``benchmarks/results/ablation_targets.json`` (one row per run,
appended as each finishes, so an interrupted run resumes) and to the
``ablation`` block of ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/ablation_targets.py --threads 1
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import load_results, start_benchmark, write_json  # noqa: E402
from benchmarks.equal_macs import run_compressor  # noqa: E402
from benchmarks.render_results import replace_block  # noqa: E402
from benchmarks.tradeoff import (  # noqa: E402
    DEFAULT_CACHE,
    DEFAULT_DATA,
    EXAMPLE_SHAPE,
    load_baseline_model,
    prepare_data,
    run_torch_pruning,
)
from compressor.fileio import atomic_write_text  # noqa: E402
from compressor.metrics import count_macs  # noqa: E402

log = logging.getLogger("benchmarks.ablation_targets")
HERE = Path(__file__).resolve().parent
BASELINE = ROOT / "examples" / "fashion-mnist" / "model.pt"
VARIANTS = {  # the group term whose threshold the budget sets, and the budget's options
    "group l1 (group lasso)": ["penalty.group.kind=l1"],
    "group l0 (hard threshold)": ["penalty.group.kind=l0"],
    "group tl1, a=1": ["penalty.group.kind=tl1", "penalty.group.a=1.0"],
    "group tl1, a=0.1": ["penalty.group.kind=tl1", "penalty.group.a=0.1"],
    "group l0, balance 0": ["penalty.group.kind=l0", "target.balance=0"],
    "group l0, uniform weighting": ["penalty.group.kind=l0", "penalty.group.weighting=uniform"],
}  # fmt: skip
REFERENCES = ("tp-magnitude", "tp-magnitude-kd")


def run_reference(method: str, target: float, *, npz: Path, work: Path, seed: int, epochs: int):
    """Torch-Pruning's one-shot magnitude pruning and fine-tuning (``tradeoff.run_torch_pruning``)."""
    start = time.perf_counter()
    row = run_torch_pruning(
        method,
        baseline_path=str(BASELINE),
        npz=npz,
        target=target,
        seed=seed,
        budget_epochs=epochs,
        sparse_fraction=0.0,
        reg=0.0,
        work=work,
    )
    return {
        "variant": method,
        "target": target,
        "seed": seed,
        "accuracy": row["accuracy"],
        "macs_x": count_macs(load_baseline_model(BASELINE), torch.randn(*EXAMPLE_SHAPE))
        / row["macs"],
        "channels_kept": row["channels_kept"],
        "wall_s": round(time.perf_counter() - start, 1),
    }


def run(
    variant: str, target: float, asked: float, *, npz: Path, work: Path, seed: int, epochs: int
) -> dict:
    """One compress run asking for ``asked`` x fewer MACs (``equal_macs.run_compressor``)."""
    start = time.perf_counter()
    row = run_compressor(
        VARIANTS[variant], baseline=str(BASELINE), npz=npz, asked=asked, seed=seed,
        epochs=epochs, work=work,
    )  # fmt: skip
    return {
        "variant": variant,
        "target": target,
        "asked": asked,
        "seed": seed,
        "baseline_accuracy": row["baseline_accuracy"],
        "accuracy": row["accuracy"],
        "macs_x": row["baseline_macs"] / row["macs"],
        "channels_kept": row["channels_kept"],
        "overrides": row["details"]["overrides"],
        "wall_s": round(time.perf_counter() - start, 1),
    }


def render(results: dict) -> str:
    targets = sorted({r["target"] for r in results["runs"]})
    base = next((r["baseline_accuracy"] for r in results["runs"] if "baseline_accuracy" in r), None)
    lines = [
        f"Baseline: the bundled example checkpoint ({base}% on the 10,000 test images); "
        f"{results['epochs']} epochs over a fixed {results['subset']:,}-image training subset, "
        f"seed {results['seed']}, distillation on (weight 0.7, T 4) except in `tp-magnitude`. "
        "compressor (recipe `tl1-group`) is asked for the MACs reduction `tp-magnitude` "
        f"reached at each target. Command: `{results['command']}`.",
        "",
        "| method / target keys | "
        + " | ".join(f"{t:g}x: accuracy % (MACs x)" for t in targets)
        + " |",
        "|---|" + "---|" * len(targets),
    ]
    for variant in (*REFERENCES, *VARIANTS):
        cells = []
        for t in targets:
            row = next(
                (r for r in results["runs"] if r["variant"] == variant and r["target"] == t), None
            )
            cells.append(f"{row['accuracy']:.2f} ({row['macs_x']:.2f})" if row else "not run")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="4,8", help="comma list of MACs reduction factors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", type=int, default=10000, help="training images")
    p.add_argument("--epochs", type=int, default=2, help="training epochs")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--results", type=Path, default=HERE / "results" / "ablation_targets.json")
    p.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    start_benchmark(args.threads)
    cache = Path(args.cache_dir)
    npz = prepare_data(args.data, cache, args.subset, 0, None)
    results = load_results(
        args.results, "ablation_targets", argv,
        seed=args.seed, subset=args.subset, epochs=args.epochs,
    )  # fmt: skip

    def recorded(variant, target):
        rows = [r for r in results["runs"] if r["variant"] == variant and r["target"] == target]
        return rows[0] if rows else None

    def work_dir(variant, target):
        name = f"{variant.replace(', ', '_').replace(' ', '')}_{target:g}x"
        return cache / "ablation_runs" / name

    for target in (float(t) for t in args.targets.split(",")):
        kw = {"npz": npz, "seed": args.seed, "epochs": args.epochs}
        for method in REFERENCES:
            if recorded(method, target) is None:
                row = run_reference(method, target, work=work_dir(method, target), **kw)
                log.info("%s at %gx: %.2f%% (%.2fx MACs)", method, target, row["accuracy"],
                         row["macs_x"])  # fmt: skip
                results["runs"].append(row)
                write_json(args.results, results)
        asked = round(recorded(REFERENCES[0], target)["macs_x"], 3)
        for variant in VARIANTS:
            if recorded(variant, target) is not None:
                continue
            row = run(variant, target, asked, work=work_dir(variant, target), **kw)
            log.info(
                "%s at %gx: %.2f%% (%.2fx MACs)", variant, target, row["accuracy"], row["macs_x"]
            )
            results["runs"].append(row)
            write_json(args.results, results)
    text = args.results_md.read_text()
    atomic_write_text(args.results_md, replace_block(text, "ablation", render(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
