"""Ablation of the target controller's schedule: what holding the zero set and reaching it early buy.

Runs ``compressor.compress`` with ``--target-macs`` on the bundled example
checkpoint (ResNet-20, Fashion-MNIST) with three settings of the ``target``
recipe keys, everything else equal (recipe ``tl1-group``, 2 epochs over a fixed
10,000-image training subset, tested on the 10,000 test images, seed 0):

* ``coupled, reach 0.6``: the zero set is reached at 60% of training and the
  frozen channels are only pulled toward zero by the RVSM coupling (the
  defaults before 2026-11-28);
* ``masked, reach 0.6``: the frozen channels are held at exactly zero in ``w``;
* ``masked, reach 0.3``: the same, reached at 30% (the defaults now).

Results go to ``benchmarks/results/ablation_targets.json`` (one row per run,
appended as each finishes, so an interrupted run resumes) and to the
``ablation`` block of ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/ablation_targets.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import compressor  # noqa: E402
from benchmarks.common import command_line, machine_info, write_json  # noqa: E402
from benchmarks.render_results import replace_block  # noqa: E402
from benchmarks.tradeoff import DEFAULT_CACHE, DEFAULT_DATA, prepare_data  # noqa: E402
from compressor.fileio import atomic_write_text  # noqa: E402

log = logging.getLogger("benchmarks.ablation_targets")
HERE = Path(__file__).resolve().parent
BASELINE = ROOT / "examples" / "fashion-mnist" / "model.pt"
VARIANTS = {
    "coupled, reach 0.6": ["target.hold=coupled", "target.reach_fraction=0.6"],
    "masked, reach 0.6": ["target.hold=masked", "target.reach_fraction=0.6"],
    "masked, reach 0.3": ["target.hold=masked", "target.reach_fraction=0.3"],
}


def train_overrides(epochs: int) -> list[str]:
    """The schedule's effect alone: distillation off (as when the recorded runs were made)."""
    return [
        f"train.epochs={epochs}",
        "recover.epochs=0",
        "train.batch_size=128",
        "train.lr=0.01",
        "distill.weight=0",
    ]


def run(variant: str, target: float, *, npz: Path, work: Path, seed: int, epochs: int) -> dict:
    """One compress run; accuracy and MACs reduction from its report."""
    start = time.perf_counter()
    report = compressor.compress(
        str(BASELINE),
        arch="resnet20",
        data=str(npz),
        recipe="tl1-group",
        target_macs=target,
        out=str(work),
        overrides=train_overrides(epochs) + VARIANTS[variant],
        device="cpu",
        seed=seed,
    )
    if "compressed" not in report:
        raise RuntimeError(
            f"compress failed (exit {report.get('exit_code')}): {report.get('error')}"
        )
    comp = report["compressed"]
    return {
        "variant": variant,
        "target": target,
        "seed": seed,
        "accuracy": comp["accuracy"],
        "macs_x": report["baseline"]["macs"] / comp["macs"],
        "channels_kept": comp["channels_kept"],
        "overrides": train_overrides(epochs) + VARIANTS[variant],
        "wall_s": round(time.perf_counter() - start, 1),
    }


def render(results: dict) -> str:
    targets = sorted({r["target"] for r in results["runs"]})
    lines = [
        "Baseline: the bundled example checkpoint (91.46% on the 10,000 test images); recipe "
        f"`tl1-group`, {results['epochs']} epochs over a fixed {results['subset']:,}-image training "
        f"subset, seed {results['seed']}. Command: `{results['command']}`.",
        "",
        "| target keys | " + " | ".join(f"{t:g}x: accuracy % (MACs x)" for t in targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for variant in VARIANTS:
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir)
    npz = prepare_data(args.data, cache, args.subset, 0, None)
    results = (
        json.loads(args.results.read_text())
        if args.results.exists()
        else {
            "benchmark": "ablation_targets",
            "command": command_line("benchmarks/ablation_targets.py", argv),
            "machine": machine_info(),
            "seed": args.seed,
            "subset": args.subset,
            "epochs": args.epochs,
            "runs": [],
        }
    )
    for target in (float(t) for t in args.targets.split(",")):
        for variant in VARIANTS:
            if any(r["variant"] == variant and r["target"] == target for r in results["runs"]):
                continue
            work = (
                cache
                / "ablation_runs"
                / f"{variant.replace(', ', '_').replace(' ', '')}_{target:g}x"
            )
            row = run(variant, target, npz=npz, work=work, seed=args.seed, epochs=args.epochs)
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
