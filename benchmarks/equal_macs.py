"""compressor's default against Torch-Pruning at equal MACs, same loss, three seeds.

Every method starts from the benchmark's ResNet-20 trained on Fashion-MNIST
(``benchmarks/train_baseline.py``, 8 epochs) and gets the same fine-tuning: the
same SGD steps, lr schedule, batch size and augmentation (compressor's recipe
defaults: lr 0.01, momentum 0.9, cosine, batch 128) over the same 10,000
training images (carved from the training set beside a 5,000-image validation
split, ``benchmarks/default_command.py``'s ``carve``). Methods:

* ``tp-quickstart``: Torch-Pruning as its README's quick-start shows it: one-shot
  ``BasePruner`` with ``GroupMagnitudeImportance(p=2)``, one uniform ratio for
  every layer (bisected to reach the target), classifier ignored, then
  fine-tuning with cross-entropy;
* ``tp-reproduce``: Torch-Pruning as its own benchmark scripts run it
  (``benchmarks/main.py``: ``--global-pruning``, ``iterative_steps=400``,
  ``pruning_ratio=1.0``, ``progressive_pruning`` stepping until the MACs
  speed-up is reached, fine-tuning with weight decay 5e-4);
* ``...-kd``: the same, fine-tuned with the loss compressor uses (its recipe's
  ``distill:`` section: cross-entropy mixed with distillation from the unpruned
  baseline), so that they differ from compressor only in how channels are chosen;
* ``compressor``: ``compress --recipe tl1-group --target-macs X`` (RVSM, the
  budget setting the group prox's threshold), asked for the largest MACs
  reduction any Torch-Pruning row reached at that target and seed, so it is
  compared at equal or higher MACs reduction.

Two phases. ``tune`` runs the candidate settings of compressor's group term at
4x, seed 0, scored on the validation split (never on the test images), and
records the chosen one. ``test`` runs every method at 2x, 4x and 8x with seeds
0, 1, 2, scored on the 10,000 test images, compressor with the chosen setting.
Rows are appended to ``benchmarks/results/equal_macs.json`` as each run ends (a
rerun skips what is recorded) and the table goes into ``benchmarks/RESULTS.md``
(block ``equal_macs``).

    .venv/bin/python benchmarks/equal_macs.py --threads 1            # tune, then test (hours)
    .venv/bin/python benchmarks/equal_macs.py --render-only
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import logging
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import compressor  # noqa: E402
from benchmarks.common import (  # noqa: E402
    EXACT_CHANNELS,
    MEASURED_FLOOR,
    load_results,
    record_command,
    start_benchmark,
)
from benchmarks.default_command import carve  # noqa: E402
from benchmarks.render_results import replace_block  # noqa: E402
from benchmarks.tradeoff import (  # noqa: E402
    EXAMPLE_SHAPE,
    _stream,
    describe_model,
    load_baseline_model,
    run_torch_pruning,
    sgd_steps,
    train_config,
)
from benchmarks.train_baseline import DEFAULT_CACHE, DEFAULT_DATA, load_fmnist, train_baseline  # noqa: E402
from compressor import recipe as recipe_mod  # noqa: E402
from compressor import train as train_mod  # noqa: E402
from compressor.config import Recipe  # noqa: E402
from compressor.data import load_data, make_loaders  # noqa: E402
from compressor.fileio import atomic_write_text  # noqa: E402
from compressor.metrics import count_macs  # noqa: E402

log = logging.getLogger("benchmarks.equal_macs")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "equal_macs.json"
TP_METHODS = ("tp-quickstart", "tp-quickstart-kd", "tp-reproduce", "tp-reproduce-kd")
# Candidate settings of compressor's group term, chosen between on the validation split.
CANDIDATES = {
    "group l0 (recipe default)": [],
    "group tl1, a=0.1": ["penalty.group.kind=tl1", "penalty.group.a=0.1"],
    "group tl1, a=0.1, balance 1": [
        "penalty.group.kind=tl1", "penalty.group.a=0.1", "target.balance=1.0",
    ],
    "group l0, balance 1": ["target.balance=1.0"],  # the recipe's default under a target
    "group tl1, a=0.1, sensitivity, balance 0.5": [
        "penalty.group.kind=tl1", "penalty.group.a=0.1", "target.allocation=sensitivity",
        "target.balance=0.5",
    ],
}  # fmt: skip
TUNE_TARGET = 4.0
TP_REPRODUCE = {"iterative_steps": 400, "weight_decay": 5e-4}  # Torch-Pruning's benchmarks/main.py


def test_split_npz(carved: Path) -> Path:
    """The carved training images with the 10,000 test images as the evaluation split."""
    path = carved.with_name(carved.stem + "_test.npz")
    if path.exists():
        return path
    data = np.load(carved)
    _, (x_test, y_test) = load_fmnist(DEFAULT_DATA)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, x_train=data["x_train"], y_train=data["y_train"],
             x_val=x_test.numpy(), y_val=y_test.numpy())  # fmt: skip
    tmp.replace(path)
    return path


def tp_reproduce_prune_(model: torch.nn.Module, speed_up: float) -> float:
    """Torch-Pruning's ``progressive_pruning`` with a global magnitude pruner; the MACs reduction."""
    import torch_pruning as tp

    example = torch.randn(*EXAMPLE_SHAPE, device=next(model.parameters()).device)
    pruner = tp.pruner.MagnitudePruner(
        model.eval(),
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=True,
        pruning_ratio=1.0,
        iterative_steps=TP_REPRODUCE["iterative_steps"],
        ignored_layers=[model.fc],
    )
    base = count_macs(copy.deepcopy(model).cpu(), example.cpu())
    reached = 1.0
    while reached < speed_up:
        pruner.step()
        reached = base / count_macs(copy.deepcopy(model).cpu(), example.cpu())
        if pruner.current_step == pruner.iterative_steps:
            break
    return reached


def run_tp_reproduce(*, baseline: str, npz: Path, target: float, seed: int, epochs: int,
                     distilled: bool, work: Path) -> dict:  # fmt: skip
    torch.manual_seed(seed)
    np.random.seed(seed)
    cfg = dataclasses.replace(train_config(epochs), weight_decay=TP_REPRODUCE["weight_decay"])
    train_loader, val_loader = make_loaders(load_data(npz), batch_size=cfg.batch_size, seed=seed)
    steps = epochs * len(train_loader)
    model = load_baseline_model(baseline)
    teacher = distill = None
    if distilled:
        teacher = load_baseline_model(baseline).requires_grad_(False)
        distill = Recipe.from_dict(recipe_mod.load_recipe("tl1-group")).distill
    reached = tp_reproduce_prune_(model, target)
    pruned_accuracy = train_mod.evaluate(model, val_loader, "cpu")[0]
    optimizer = train_mod.make_optimizer(model, cfg)
    scheduler = train_mod.make_scheduler(optimizer, cfg.schedule, steps)
    loss = sgd_steps(model, _stream(train_loader), optimizer, scheduler, steps,
                     teacher=teacher, distill=distill)  # fmt: skip
    accuracy = train_mod.evaluate(model, val_loader, "cpu")[0]
    final = describe_model(model, work, "final")
    details = {"planned_macs_x": reached, "accuracy_after_pruning": pruned_accuracy,
               "finetune_steps": steps, "finetune_loss": loss, **TP_REPRODUCE}  # fmt: skip
    return {"accuracy": accuracy, **final, "details": details}


def run_tp(method: str, *, baseline: str, npz: Path, target: float, seed: int, epochs: int,
           work: Path) -> dict:  # fmt: skip
    distilled = method.endswith("-kd")
    if method.startswith("tp-reproduce"):
        return run_tp_reproduce(baseline=baseline, npz=npz, target=target, seed=seed,
                                epochs=epochs, distilled=distilled, work=work)  # fmt: skip
    return run_torch_pruning("tp-magnitude-kd" if distilled else "tp-magnitude",
                             baseline_path=baseline, npz=npz, target=target, seed=seed,
                             budget_epochs=epochs, sparse_fraction=0.0, reg=0.0, work=work)  # fmt: skip


def compress_overrides(epochs: int) -> list[str]:
    return [f"train.epochs={epochs}", "recover.epochs=0", "train.batch_size=128", "train.lr=0.01",
            EXACT_CHANNELS, MEASURED_FLOOR]  # fmt: skip


def run_compressor(overrides: list[str], *, baseline: str, npz: Path, asked: float, seed: int,
                   epochs: int, work: Path) -> dict:  # fmt: skip
    report = compressor.compress(
        baseline, arch="resnet20", data=str(npz), recipe="tl1-group", target_macs=asked,
        out=str(work), overrides=compress_overrides(epochs) + overrides, device="cpu", seed=seed,
    )  # fmt: skip
    if "compressed" not in report:
        raise RuntimeError(
            f"compress failed (exit {report.get('exit_code')}): {report.get('error')}"
        )
    comp = report["compressed"]
    return {"accuracy": comp["accuracy"], "macs": comp["macs"], "params": comp["params"],
            "channels_kept": comp["channels_kept"], "exit_code": report["exit_code"],
            "baseline_accuracy": report["baseline"]["accuracy"],
            "baseline_macs": report["baseline"]["macs"],
            "details": {"asked_macs_x": asked, "overrides": compress_overrides(epochs) + overrides,
                        "timings_s": report.get("timings_s")}}  # fmt: skip


class Results:
    """The JSON of runs, appended atomically; a run already recorded is not rerun."""

    def __init__(self, path: Path, argv):
        self.path = path
        self.data = load_results(path, "equal_macs", argv, chosen=None)

    def find(self, phase: str, method: str, target: float, seed: int) -> dict | None:
        return next((r for r in self.data["runs"] if (r["phase"], r["method"], r["target"], r["seed"])
                     == (phase, method, target, seed)), None)  # fmt: skip

    def add(self, row: dict) -> None:
        self.data["runs"].append(row)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def measure(results: Results, phase: str, method: str, target: float, seed: int, fn) -> dict:
    row = results.find(phase, method, target, seed)
    if row is not None:
        return row
    log.info("%s: %s at %gx, seed %d", phase, method, target, seed)
    start = time.perf_counter()
    out = fn()
    row = {"phase": phase, "method": method, "target": target, "seed": seed,
           "accuracy": out["accuracy"], "macs_x": results.data["baseline_macs"] / out["macs"],
           "channels_kept": out["channels_kept"], "wall_s": round(time.perf_counter() - start, 1),
           "details": out.get("details")}  # fmt: skip
    log.info("-> %.2f%% at %.2fx", row["accuracy"], row["macs_x"])
    results.add(row)
    return row


def methods_for(seed: int, reproduce_seeds) -> tuple[str, ...]:
    """The Torch-Pruning rows of a seed (its reproduce-script rows only for ``reproduce_seeds``)."""
    if reproduce_seeds is None or seed in reproduce_seeds:
        return TP_METHODS
    return tuple(m for m in TP_METHODS if not m.startswith("tp-reproduce"))


def run_phase(results: Results, phase: str, npz: Path, *, baseline: str, targets, seeds,
              candidates: dict, epochs: int, cache: Path, reproduce_seeds=None) -> None:  # fmt: skip
    for target in targets:
        for seed in seeds:
            reached = []
            for method in methods_for(seed, reproduce_seeds):
                work = cache / "equal_macs" / f"{phase}_{method}_{target:g}x_s{seed}"
                run = functools.partial(run_tp, method, baseline=baseline, npz=npz, target=target,
                                        seed=seed, epochs=epochs, work=work)  # fmt: skip
                reached.append(measure(results, phase, method, target, seed, run)["macs_x"])
            asked = round(max(reached), 3)
            for name, overrides in candidates.items():
                work = (
                    cache / "equal_macs" / f"{phase}_{name.replace(' ', '_')}_{target:g}x_s{seed}"
                )
                run = functools.partial(run_compressor, overrides, baseline=baseline, npz=npz,
                                        asked=asked, seed=seed, epochs=epochs, work=work)  # fmt: skip
                measure(results, phase, name, target, seed, run)


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def render(data: dict) -> str:
    runs = [r for r in data["runs"] if r["phase"] == "test"]
    chosen = data.get("chosen")
    targets = sorted({r["target"] for r in runs})
    tune = [r for r in data["runs"] if r["phase"] == "tune" and r["method"] in CANDIDATES]
    seed = f" (training seed {data['baseline_seed']})" if data.get("baseline_seed") else ""
    lines = [
        f"Baseline: ResNet-20, {data.get('baseline_accuracy')}% on the 10,000 test images{seed}. "
        f"{data.get('epochs')} epochs over {data.get('subset', 10000):,} training images for every "
        "method (same steps, schedule, augmentation); mean ± "
        "standard deviation over seeds (n per cell); accuracy on the test images. "
        "Commands (in the order they ran): "
        + "; ".join(f"`{c}`" for c in data.get("commands", [data["command"]]))
        + ".",
        "",
        (
            "Chosen on the validation split (4x, seed 0): "
            + ", ".join(f"{r['method']} {r['accuracy']:.2f}%" for r in tune)
            + (f" -> **{chosen}**." if chosen else ".")
            if tune
            else "compressor's setting was chosen on the validation split by "
            "`benchmarks/allocation.py` (the table above)."
        ),
        "",
        "| method | " + " | ".join(f"{t:g}x: accuracy % | MACs x" for t in targets) + " |",
        "|---|" + "---|---|" * len(targets),
    ]
    measured = [c for c in CANDIDATES if any(r["method"] == c for r in runs)]
    for method in [*TP_METHODS, *measured]:
        cells = []
        for t in targets:
            rows = [r for r in runs if r["method"] == method and r["target"] == t]
            if not rows:
                cells += ["not run", ""]
                continue
            cells += [f"{_spread([r['accuracy'] for r in rows])} (n={len(rows)})",
                      _spread([r["macs_x"] for r in rows])]  # fmt: skip
        name = method
        if method in CANDIDATES:
            name = f"compressor: {method}" + (" (chosen)" if method == chosen else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for method in measured:
        lines += ["", f"compressor ({method}) minus the best Torch-Pruning row (by mean) at each "
                  "target, paired by seed: " + "; ".join(_margin(runs, method, t) for t in targets)
                  + "."]  # fmt: skip
    return "\n".join(lines)


def _margin(runs: list[dict], chosen: str, target: float) -> str:
    def acc(method, seed):
        row = next(
            (r for r in runs if (r["method"], r["target"], r["seed"]) == (method, target, seed)),
            None,
        )
        return row and row["accuracy"]

    means = {m: statistics.mean(v) for m in TP_METHODS
             if (v := [r["accuracy"] for r in runs if r["method"] == m and r["target"] == target])}  # fmt: skip
    if not means:
        return f"{target:g}x: no Torch-Pruning row"
    best = max(means, key=means.get)
    diffs = [acc(chosen, s) - acc(best, s) for s in sorted({r["seed"] for r in runs})
             if acc(chosen, s) is not None and acc(best, s) is not None]  # fmt: skip
    if not diffs:
        return f"{target:g}x: not run"
    return f"{target:g}x against {best}: {_spread(diffs)} points (n={len(diffs)})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="4,8,2", help="in the order they run")
    p.add_argument(
        "--reproduce-seeds", default=None, help="seeds of the tp-reproduce rows (default: all)"
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--subset", type=int, default=10000)
    p.add_argument("--phases", default="tune,test")
    p.add_argument(
        "--candidates",
        default=None,
        help="';'-separated compressor settings the test phase runs (default: the tuned choice; "
        "benchmarks/allocation.py chooses the allocation on the validation split)",
    )
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--block", default="equal_macs", help="the RESULTS.md block the table goes in")
    p.add_argument(
        "--baseline-holdout",
        type=int,
        default=0,
        help="images of the validation split the baseline never trains on (5000: the baseline "
        "of default_command.py and allocation.py, which never saw the split the tune phase reads)",
    )
    p.add_argument(
        "--baseline-seed", type=int, default=0, help="the baseline's training seed (a second "
        "baseline, to see how much the margin moves with it)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    start_benchmark(args.threads)
    results = Results(args.results, argv)
    if not args.render_only:
        record_command(results.data, "equal_macs", argv)
        cache = Path(args.cache_dir)
        baseline = train_baseline(
            data_dir=args.data, epochs=8, seed=args.baseline_seed, holdout=args.baseline_holdout,
            cache_dir=cache,
        )  # fmt: skip
        carved = carve(Path(args.data), cache, args.subset)
        model = load_baseline_model(baseline["path"])
        results.data.update(baseline_accuracy=baseline["accuracy"], baseline_seed=args.baseline_seed,
                            epochs=args.epochs, subset=args.subset,
                            baseline_macs=count_macs(model, torch.randn(*EXAMPLE_SHAPE)))  # fmt: skip
        common = {"baseline": baseline["path"], "epochs": args.epochs, "cache": cache}
        if "tune" in args.phases:
            run_phase(results, "tune", carved, targets=[TUNE_TARGET], seeds=[0],
                      candidates=CANDIDATES, **common)  # fmt: skip
            tune = {r["method"]: r["accuracy"] for r in results.data["runs"]
                    if r["phase"] == "tune" and r["method"] in CANDIDATES}  # fmt: skip
            results.data["chosen"] = max(tune, key=tune.get)
            results.save()
        if "test" in args.phases:
            names = args.candidates.split(";") if args.candidates else [results.data["chosen"]]
            unknown = [n for n in names if n not in CANDIDATES]
            if unknown:
                p.error(f"unknown candidates {unknown}; known: {list(CANDIDATES)}")
            run_phase(results, "test", test_split_npz(carved),
                      targets=[float(t) for t in args.targets.split(",")],
                      seeds=[int(s) for s in args.seeds.split(",")],
                      candidates={n: CANDIDATES[n] for n in names}, **common,
                      reproduce_seeds=args.reproduce_seeds and
                      [int(s) for s in args.reproduce_seeds.split(",")])  # fmt: skip
    text = args.results_md.read_text()
    atomic_write_text(args.results_md, replace_block(text, args.block, render(results.data)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
