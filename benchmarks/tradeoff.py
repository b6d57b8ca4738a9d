"""Accuracy against MACs reduction: compressor's recipes against Torch-Pruning, same budget.

Every method starts from the same ResNet-20 trained on Fashion-MNIST
(``benchmarks/train_baseline.py``) and gets the same fine-tuning budget: the same
number of SGD steps (lr 0.01, momentum 0.9, cosine, batch 128, no weight decay:
compressor's defaults) on the same fixed subset of the training set (default
3 epochs over 20,000 images). Every model is tested on the full 10,000-image
test set. Methods:

- compressor recipes (``group-lasso``, ``l1-group``, ``l0-group``, ``tl1-group``,
  ``l1l2-group``) through ``compressor.compress(..., target_macs=X)``: RVSM
  fine-tuning with the target controller, exact removal, verified ONNX
  (``--recover-epochs`` of the budget can go to the masked recovery stage);
- ``tp-magnitude``: Torch-Pruning one-shot pruning (``BasePruner``,
  ``GroupMagnitudeImportance(p=2)``, one uniform ratio for every layer, the
  classifier ignored), the ratio bisected so that MACs fall by at least the
  target, then the whole budget of plain fine-tuning;
- ``tp-magnitude-kd``: the same, with the fine-tuning loss that compressor uses
  by default (its recipe's ``distill:`` section: cross-entropy mixed with
  distillation from the unpruned baseline), so that the two differ only in how
  they choose and remove channels;
- ``tp-sparse``: Torch-Pruning's ``GroupNormPruner`` regularised training
  (``regularize(model)`` after each backward, ``--tp-reg``, constant lr) for
  ``--tp-sparse-fraction`` of the budget, then the same one-shot pruning to the
  target, then fine-tuning (cosine) for the rest of the steps;
- ``tl1-group-eq``: the default recipe asked for the MACs reduction that
  ``tp-magnitude`` reached at the same target (same seed, else seed 0), so the
  two are compared at equal MACs: Torch-Pruning's one uniform ratio overshoots
  the target (4.66x for 4x, 8.72x for 8x on this network) while compressor
  lands on the factor it is asked for.

Each run records test accuracy, MACs and params (and their reduction), channels
kept (units of compressor's coupled channel groups, counted on the final model),
exact-zero weight fraction of the final model, ONNX bytes and wall time. Runs are
appended to the results JSON as they finish (atomically) and skipped when the
script is rerun with the same settings; a compressor run interrupted mid-way is
resumed from its last epoch. At the end the table goes into section 1 of
``benchmarks/RESULTS.md`` and the plot into ``benchmarks/tradeoff.png``.

    .venv/bin/python benchmarks/tradeoff.py --quick                 # a few minutes
    .venv/bin/python benchmarks/tradeoff.py --baseline-epochs 8     # the full run (hours on a CPU)
    .venv/bin/python benchmarks/tradeoff.py --render-only           # table and plot from the JSON
    .venv/bin/python benchmarks/tradeoff.py --redo tl1-group        # drop and rerun a method's runs

On a CPU shared with other jobs pass ``--threads 1``: two threads per process on
an oversubscribed 2-core machine ran about 5x slower than one.

``--device cuda`` (or ``auto``) trains and evaluates every model on the GPU: the
baseline, compressor's runs (``compress(..., device=...)``) and Torch-Pruning's
regularisation, pruning and fine-tuning (the data loaders stay on the CPU and
each batch is copied over). MACs, params, channels and ONNX bytes are counted on
a CPU copy; the Torch-Pruning ratio is bisected on a CPU copy too (the MACs of a
uniform ratio do not depend on the device). The results JSON records the device
(and the card's name) in ``machine``, and each run its device.

    .venv/bin/python benchmarks/tradeoff.py --device cuda --results benchmarks/results/tradeoff_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import compressor  # noqa: E402
import compressor.pipeline  # noqa: E402, F401 (import the whole library now: it may change during a long run)
from benchmarks.common import (  # noqa: E402
    EXACT_CHANNELS,
    command_line,
    device_info,
    load_average,
    machine_info,
    resolve_device,
    write_json,
)
from benchmarks.train_baseline import DEFAULT_CACHE, DEFAULT_DATA, load_fmnist, train_baseline  # noqa: E402
from compressor import recipe as recipe_mod  # noqa: E402
from compressor import train as train_mod  # noqa: E402
from compressor.config import Recipe, Train  # noqa: E402
from compressor.data import load_data, make_loaders  # noqa: E402
from compressor.export import export_onnx, onnx_size_bytes  # noqa: E402
from compressor.fileio import atomic_write_text  # noqa: E402
from compressor.groups import build_groups  # noqa: E402
from compressor.metrics import count_macs, count_params, weight_sparsity  # noqa: E402
from compressor.models import resnet20  # noqa: E402

log = logging.getLogger("benchmarks.tradeoff")

SCHEMA_VERSION = 1
ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
SECTION_TITLE = "## 1. Accuracy–compression trade-off"
COMPRESSOR_METHODS = ("group-lasso", "l1-group", "l0-group", "tl1-group", "l1l2-group")
TP_METHODS = ("tp-magnitude", "tp-sparse")  # Torch-Pruning as it ships
TP_KD_METHODS = ("tp-magnitude-kd",)  # with compressor's distillation added
# A compressor recipe asked for the MACs reduction a Torch-Pruning method reached (equal MACs).
EQUAL_MACS_METHODS = {"tl1-group-eq": ("tl1-group", "tp-magnitude")}
# Run order: the main comparison first, so a stopped run still has whole curves for it.
ALL_METHODS = (
    "tp-magnitude",
    "tl1-group",
    "tp-magnitude-kd",
    "group-lasso",
    "tp-sparse",
    "l1-group",
    "l0-group",
    "l1l2-group",
    "tl1-group-eq",
)
EXAMPLE_SHAPE = (1, 1, 28, 28)
# Goals of the issue: compressor's best recipe against the best Torch-Pruning method, in points.
MARGIN_GOALS = {2.0: 0.0, 4.0: 0.5, 8.0: 0.5}


# ----------------------------------------------------------------------------- data


def prepare_data(
    data_dir: str | Path, cache_dir: Path, subset: int, subset_seed: int, test_subset: int | None
) -> Path:
    """The fine-tuning subset and the test set as one npz (uint8 NCHW) that ``compress`` reads."""
    suffix = f"_t{test_subset}" if test_subset else ""
    path = cache_dir / f"fmnist_train{subset}_s{subset_seed}{suffix}.npz"
    if path.exists():
        return path
    (x_train, y_train), (x_test, y_test) = load_fmnist(data_dir)
    gen = torch.Generator().manual_seed(subset_seed)
    idx = torch.randperm(len(x_train), generator=gen)[:subset].sort().values
    if test_subset:
        x_test, y_test = x_test[:test_subset], y_test[:test_subset]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(
        tmp,
        x_train=x_train[idx].numpy(),
        y_train=y_train[idx].numpy(),
        x_val=x_test.numpy(),
        y_val=y_test.numpy(),
    )
    tmp.replace(path)
    return path


def train_config(budget_epochs: int) -> Train:
    """The fine-tuning hyperparameters every method uses (compressor's recipe defaults)."""
    cfg = recipe_mod.load_recipe("tl1-group", [f"train.epochs={budget_epochs}"])
    return Recipe.from_dict(cfg).train


# ----------------------------------------------------------------------------- measures


def load_baseline_model(path: str | Path) -> torch.nn.Module:
    model = resnet20(num_classes=10, in_channels=1)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def describe_model(model: torch.nn.Module, work: Path, name: str) -> dict:
    """MACs, params, channel units kept, exact-zero weights and ONNX bytes of ``model`` (a CPU copy)."""
    model = copy.deepcopy(model).cpu().eval()
    example = torch.randn(*EXAMPLE_SHAPE)
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / f"{name}.onnx"
    export_onnx(model, example, onnx_path)
    return {
        "macs": count_macs(model, example),
        "params": count_params(model),
        "channels_kept": build_groups(copy.deepcopy(model), example).total_channels,
        "weight_sparsity": weight_sparsity(model),
        "onnx_bytes": onnx_size_bytes(onnx_path),
    }


# ----------------------------------------------------------------------------- compressor


def run_compressor(
    recipe: str,
    *,
    baseline_path: str,
    npz: Path,
    target: float,
    seed: int,
    budget_epochs: int,
    recover_epochs: int,
    work: Path,
    device: str | torch.device = "cpu",
) -> dict:
    """One ``compressor.compress`` run; the measures come from its report and compact model."""
    rvsm_epochs = budget_epochs - recover_epochs
    overrides = [
        EXACT_CHANNELS,
        f"train.epochs={rvsm_epochs}",
        f"recover.epochs={recover_epochs}",
        "train.batch_size=128",
        "train.lr=0.01",
        "train.momentum=0.9",
        "train.schedule=cosine",
    ]
    resume = (work / ".compressor-state" / "state.pt").exists()
    report = compressor.compress(
        baseline_path,
        arch="resnet20",
        data=str(npz),
        recipe=recipe,
        target_macs=target,
        out=str(work),
        overrides=overrides,
        device=str(device),
        seed=seed,
        resume=resume,
    )
    if "compressed" not in report:
        raise RuntimeError(
            f"compress failed (exit {report.get('exit_code')}): {report.get('error')}"
        )
    compact = compressor.load(work / "model.safetensors")
    final = describe_model(compact, work, "final")
    comp = report["compressed"]
    return {
        "accuracy": comp["accuracy"],
        "sparse_accuracy": comp["sparse_accuracy"],
        "macs": comp["macs"],
        "params": comp["params"],
        "onnx_bytes": comp["onnx_bytes"],
        "channels_kept": final["channels_kept"],
        "weight_sparsity": final["weight_sparsity"],
        "details": {
            "overrides": overrides,
            "resumed": resume,
            "exit_code": report["exit_code"],
            "target": report.get("target"),
            "report_channels_kept": comp.get("channels_kept"),
            "report_channels_total": comp.get("channels_total"),
            "report_weight_sparsity_before_removal": comp.get("weight_sparsity"),
            "epochs": report.get("epochs"),
            "timings_s": report.get("timings_s"),
            "verification": {
                k: report["verification"].get(k)
                for k in (
                    "sparse_vs_pruned_max_abs",
                    "torch_vs_onnxruntime_max_abs",
                    "top1_agreement",
                )
            },
        },
    }


# ----------------------------------------------------------------------------- Torch-Pruning


def _tp():
    import torch_pruning as tp

    return tp


def _example(model: torch.nn.Module) -> torch.Tensor:
    """A random input of ``EXAMPLE_SHAPE`` on ``model``'s device (for Torch-Pruning's tracing)."""
    return torch.randn(*EXAMPLE_SHAPE, device=next(model.parameters()).device)


def tp_prune_(model: torch.nn.Module, ratio: float) -> torch.nn.Module:
    """Torch-Pruning one-shot group-magnitude (L2) pruning, one uniform ratio, classifier ignored."""
    tp = _tp()
    pruner = tp.pruner.BasePruner(
        model,
        _example(model),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        global_pruning=False,
        ignored_layers=[model.fc],
    )
    pruner.step()
    return model


def tp_ratio_for_target(
    model: torch.nn.Module, target: float, iterations: int = 12
) -> tuple[float, float]:
    """The smallest uniform ratio whose pruning cuts MACs by at least ``target`` (bisection).

    Done on a CPU copy of ``model``: how many channels a ratio removes does not depend on the device.
    """
    model = copy.deepcopy(model).cpu().eval()
    example = torch.randn(*EXAMPLE_SHAPE)
    base = count_macs(model, example)

    def reduction(ratio: float) -> float:
        pruned = tp_prune_(copy.deepcopy(model).eval(), ratio)
        return base / max(count_macs(pruned, example), 1)

    lo, hi = 0.0, 0.8  # past ~0.9 Torch-Pruning skips small groups and the reduction falls again
    hi_x = reduction(hi)
    if hi_x < target:
        log.warning(
            "Torch-Pruning reaches only %.2fx at ratio %.2f (asked %.2fx)", hi_x, hi, target
        )
        return hi, hi_x
    for _ in range(iterations):
        mid = (lo + hi) / 2
        mid_x = reduction(mid)
        if mid_x >= target:
            hi, hi_x = mid, mid_x
        else:
            lo = mid
    return hi, hi_x


def _stream(loader, device: str | torch.device = "cpu"):
    """Batches of ``loader`` on ``device``, epoch after epoch (each epoch a new seeded shuffle)."""
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def sgd_steps(
    model, stream, optimizer, scheduler, steps: int, after_backward=None, teacher=None, distill=None
) -> float:
    """``steps`` plain SGD steps (BatchNorm in train mode); returns the mean loss.

    With ``teacher`` and ``distill`` the loss is compressor's ``train.training_loss``.
    """
    model.train()
    total = 0.0
    for step in range(steps):
        x, y = next(stream)
        loss = train_mod.training_loss(model(x), y, x, teacher, distill)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item()
        if (step + 1) % 50 == 0:
            log.info("step %d/%d loss %.4f", step + 1, steps, total / (step + 1))
    return total / max(steps, 1)


def run_torch_pruning(
    method: str,
    *,
    baseline_path: str,
    npz: Path,
    target: float,
    seed: int,
    budget_epochs: int,
    sparse_fraction: float,
    reg: float,
    work: Path,
    device: str | torch.device = "cpu",
) -> dict:
    """``tp-magnitude`` (prune, fine-tune), ``tp-magnitude-kd`` (the same, distilled) or ``tp-sparse``."""
    tp = _tp()
    torch.manual_seed(seed)
    np.random.seed(seed)
    cfg = train_config(budget_epochs)
    splits = load_data(npz)
    train_loader, val_loader = make_loaders(splits, batch_size=cfg.batch_size, seed=seed)
    total_steps = budget_epochs * len(train_loader)
    stream = _stream(train_loader, device)
    model = load_baseline_model(baseline_path).to(device)
    details: dict = {"total_steps": total_steps}
    teacher = distill = None
    if method == "tp-magnitude-kd":
        teacher = load_baseline_model(baseline_path).to(device).requires_grad_(False)
        distill = Recipe.from_dict(recipe_mod.load_recipe("tl1-group")).distill
        details["distill"] = dataclasses.asdict(distill)
    sparse_steps = 0
    if method == "tp-sparse":
        sparse_steps = int(round(sparse_fraction * total_steps))
        regulariser = tp.pruner.GroupNormPruner(
            model,
            _example(model),
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            reg=reg,
            global_pruning=False,
            ignored_layers=[model.fc],
        )
        optimizer = train_mod.make_optimizer(model, cfg)
        loss = sgd_steps(
            model,
            stream,
            optimizer,
            None,
            sparse_steps,
            after_backward=lambda: regulariser.regularize(model),
        )
        details.update(
            {"sparse_steps": sparse_steps, "reg": reg, "sparse_lr": "constant", "sparse_loss": loss}
        )
        del regulariser
    ratio, planned_x = tp_ratio_for_target(model.eval(), target)
    tp_prune_(model.eval(), ratio)
    details.update({"pruning_ratio": ratio, "planned_macs_x": planned_x})
    pruned_accuracy = train_mod.evaluate(model, val_loader, device)[0]
    finetune_steps = total_steps - sparse_steps
    optimizer = train_mod.make_optimizer(model, cfg)
    scheduler = train_mod.make_scheduler(optimizer, cfg.schedule, finetune_steps)
    details["finetune_loss"] = sgd_steps(
        model, stream, optimizer, scheduler, finetune_steps, teacher=teacher, distill=distill
    )
    details.update({"finetune_steps": finetune_steps, "accuracy_after_pruning": pruned_accuracy})
    accuracy = train_mod.evaluate(model, val_loader, device)[0]
    final = describe_model(model, work, "final")
    return {"accuracy": accuracy, **final, "details": details}


# ----------------------------------------------------------------------------- runs


def compressor_source() -> dict:
    """The git commit and a hash of ``compressor/*.py`` as loaded (the library changes under a long run)."""
    import hashlib
    import subprocess

    pkg = Path(compressor.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(pkg.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "-C", str(pkg), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {"commit": commit or None, "sources_sha256": digest.hexdigest()[:16]}


def reference_macs_x(runs: list[dict], reference: str, target: float, seed: int) -> float:
    """The MACs reduction ``reference`` reached at ``target`` (this seed's run, else seed 0's)."""
    found = {r["seed"]: r for r in runs if r["method"] == reference and r["target"] == target}
    run = found.get(seed) or found.get(0)
    if run is None:
        raise RuntimeError(
            f"no {reference} run at {target:g}x in the results JSON: run "
            f"`--methods {reference} --targets {target:g}` first (its MACs reduction is the ask)"
        )
    return float(run["macs_x"])


def run_key(method: str, target: float, seed: int) -> str:
    return f"{method}@{target:g}x/s{seed}"


def plan_runs(methods, targets, seeds) -> list[tuple[str, float, int]]:
    """Method by method (in ``ALL_METHODS`` order), each at every target and seed."""
    ordered = [m for m in ALL_METHODS if m in methods]
    return [(m, t, s) for m in ordered for t in targets for s in seeds]


def best_recipe(
    runs: list[dict], target: float | None = None, seed: int | None = None
) -> str | None:
    """The compressor recipe with the best mean accuracy (at ``target``, or over all targets)."""
    scores: dict[str, list[float]] = {}
    for r in runs:
        if r["method"] in COMPRESSOR_METHODS and (target is None or r["target"] == target):
            if seed is None or r["seed"] == seed:
                scores.setdefault(r["method"], []).append(r["accuracy"])
    if not scores:
        return None
    return max(scores, key=lambda m: float(np.mean(scores[m])))


def execute(
    method: str, target: float, seed: int, *, args, baseline: dict, npz: Path, work_root: Path
) -> dict:
    work = work_root / re.sub(r"[^A-Za-z0-9_.-]+", "_", run_key(method, target, seed))
    load_start = load_average()
    start = time.perf_counter()
    if method in COMPRESSOR_METHODS or method in EQUAL_MACS_METHODS:
        recipe, asked = method, target
        if method in EQUAL_MACS_METHODS:
            recipe, reference = EQUAL_MACS_METHODS[method]
            asked = reference_macs_x(results_now(args.results), reference, target, seed)
        result = run_compressor(
            recipe,
            baseline_path=baseline["path"],
            npz=npz,
            target=asked,
            seed=seed,
            budget_epochs=args.budget_epochs,
            recover_epochs=args.recover_epochs,
            work=work,
            device=args.device,
        )
        family = "compressor"
    else:
        result = run_torch_pruning(
            method,
            baseline_path=baseline["path"],
            npz=npz,
            target=target,
            seed=seed,
            budget_epochs=args.budget_epochs,
            sparse_fraction=args.tp_sparse_fraction,
            reg=args.tp_reg,
            work=work,
            device=args.device,
        )
        family = "torch-pruning"
    wall = time.perf_counter() - start
    return {
        "key": run_key(method, target, seed),
        "method": method,
        "family": family,
        "target": target,
        "seed": seed,
        "accuracy": result["accuracy"],
        "drop": baseline["accuracy"] - result["accuracy"],
        "macs": result["macs"],
        "macs_x": baseline["macs"] / max(result["macs"], 1),
        "params": result["params"],
        "params_x": baseline["params"] / max(result["params"], 1),
        "channels_kept": result["channels_kept"],
        "channels_total": baseline["channels_kept"],
        "weight_sparsity": result["weight_sparsity"],
        "onnx_bytes": result["onnx_bytes"],
        "wall_s": round(wall, 1),
        "load_average_at_start": load_start,
        "device": str(args.device),
        "compressor_source": SOURCE,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **({"sparse_accuracy": result["sparse_accuracy"]} if "sparse_accuracy" in result else {}),
        **({"asked_macs_x": asked} if method in EQUAL_MACS_METHODS else {}),
        "details": result["details"],
    }


# ----------------------------------------------------------------------------- report


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _fmt_acc(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})"


def _cells(runs: list[dict], method: str, target: float) -> list[dict]:
    return [r for r in runs if r["method"] == method and r["target"] == target]


def margins(runs: list[dict], targets, references=TP_METHODS) -> tuple[str | None, list[dict]]:
    """Per target: the best compressor recipe (over all targets) against the best of ``references``."""
    best = best_recipe(runs)
    rows = []
    for t in targets:
        ours = _cells(runs, best, t) if best else []
        theirs = {m: _cells(runs, m, t) for m in references}
        theirs = {m: rs for m, rs in theirs.items() if rs}
        if not ours or not theirs:
            continue
        ref = max(theirs, key=lambda m: float(np.mean([r["accuracy"] for r in theirs[m]])))
        ours_acc = float(np.mean([r["accuracy"] for r in ours]))
        ref_acc = float(np.mean([r["accuracy"] for r in theirs[ref]]))
        goal = MARGIN_GOALS.get(float(t))
        margin = ours_acc - ref_acc
        rows.append(
            {
                "target": t,
                "recipe": best,
                "accuracy": ours_acc,
                "macs_x": float(np.mean([r["macs_x"] for r in ours])),
                "reference": ref,
                "reference_accuracy": ref_acc,
                "reference_macs_x": float(np.mean([r["macs_x"] for r in theirs[ref]])),
                "margin": margin,
                "goal": goal,
                "met": None if goal is None else margin >= goal,
            }
        )
    return best, rows


def equal_macs_rows(runs: list[dict], targets) -> list[dict]:
    """Per target and equal-MACs method: its accuracy next to Torch-Pruning's (as it ships and with KD).

    ``margin``, ``goal`` and ``met`` judge the issue's goal against the method's
    reference (``tp-magnitude``, Torch-Pruning as it ships).
    """
    rows = []
    for method, (_, reference) in EQUAL_MACS_METHODS.items():
        for t in targets:
            ours = _cells(runs, method, t)
            theirs = {m: _cells(runs, m, t) for m in (reference, *TP_KD_METHODS)}
            theirs = {m: rs for m, rs in theirs.items() if rs}
            if not ours or reference not in theirs:
                continue
            accuracy = float(np.mean([r["accuracy"] for r in ours]))
            margin = accuracy - float(np.mean([r["accuracy"] for r in theirs[reference]]))
            goal = MARGIN_GOALS.get(float(t))
            rows.append(
                {
                    "target": t,
                    "method": method,
                    "accuracy": accuracy,
                    "reference": reference,
                    "margin": margin,
                    "goal": goal,
                    "met": None if goal is None else margin >= goal,
                    "macs_x": float(np.mean([r["macs_x"] for r in ours])),
                    "reference_macs_x": float(np.mean([r["macs_x"] for r in theirs[reference]])),
                    "references": {
                        m: float(np.mean([r["accuracy"] for r in rs])) for m, rs in theirs.items()
                    },
                }
            )
    return rows


def render_section(
    results: dict,
    plan: list[tuple[str, float, int]] | None = None,
    plot_path: Path | None = None,
) -> str:
    """Section 1 of RESULTS.md (or another study's block in it) from the results JSON."""
    runs = results["runs"]
    cfg, base = results["config"], results["baseline"]
    targets = sorted({r["target"] for r in runs} | {float(t) for t in cfg["targets"]})
    methods = [m for m in ALL_METHODS if any(r["method"] == m for r in runs)]
    machine = results.get("machine", {})
    lines = []
    if base["epochs"] is None:
        origin = (
            f"Baseline: the bundled example checkpoint `{base['path']}` (made by "
            "`examples/make_example.py`: 4 epochs on the first 30,000 training images; the issue "
            "suggests ~15 epochs on all 60,000, which the shared 2-core CPU could not fit in a session): "
        )
    else:
        short = (
            " (the issue suggests ~15; on the shared 2-core CPU fewer was the practical choice)"
            if base["epochs"] < 15
            else ""
        )
        origin = (
            f"Baseline trained by `benchmarks/train_baseline.py` for "
            f"**{_n(base['epochs'], 'epoch')}** on {base['train_images']:,} images{short}: "
        )
    lines.append(
        "ResNet-20 (16-32-64) on Fashion-MNIST. "
        + origin
        + f"**{base['accuracy']:.2f}%** top-1 on the {base['test_images']:,}-image test set, "
        f"{base['macs'] / 1e6:.1f} M MACs, {base['params']:,} params."
    )
    lines.append("")
    # The distillation the tp-magnitude-kd runs recorded (compressor's recipe default then).
    kd = next((r["details"]["distill"] for r in runs if "distill" in r.get("details", {})), None)
    kd_setting = (
        f"`distill:` weight {kd['weight']:g}, temperature {kd['temperature']:g}"
        if kd
        else "`distill:`"
    )
    lines.append(
        f"Same budget for every method: {_n(cfg['budget_epochs'], 'epoch')} ({cfg['optimizer_steps']} SGD "
        f"steps, batch 128, lr 0.01 cosine, momentum 0.9) over a fixed {cfg['subset']:,}-image subset of "
        f"the training set; tested on {base['test_images']:,} test images. compressor: `compressor.compress(..., "
        f"target_macs=X)` with {_n(cfg['budget_epochs'] - cfg['recover_epochs'], 'RVSM epoch')} and "
        f"{_n(cfg['recover_epochs'], 'recovery epoch')}. `tp-magnitude`: Torch-Pruning one-shot "
        f"`GroupMagnitudeImportance(p=2)`, one uniform ratio bisected to reach at least the target, "
        f"classifier ignored, then the whole budget of fine-tuning. `tp-magnitude-kd`: the same, "
        f"fine-tuned with compressor's default loss (cross-entropy mixed with distillation from the "
        f"baseline, {kd_setting}), as compressor's recipes are. `tp-sparse`: `GroupNormPruner` "
        f"regularisation (reg {cfg['tp_reg']:g}, constant lr) for {cfg['tp_sparse_fraction']:.0%} of the "
        f"steps, the same pruning, then fine-tuning for the rest."
    )
    lines.append("")
    if plan is not None:
        done = {r["key"] for r in runs}
        missing = [run_key(*p) for p in plan if run_key(*p) not in done]
        if missing:
            lines.append(f"**In progress:** {len(runs)} runs done, {len(missing)} to go.")
            lines.append("")
    lines.append(
        "| method | target | accuracy % | drop (points) | MACs x | params x | channels kept | "
        "zero weights | ONNX KB | wall min |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for t in targets:
        for m in methods:
            cell = _cells(runs, m, t)
            if not cell:
                continue
            accs = [r["accuracy"] for r in cell]
            mean = lambda key, c=cell: float(np.mean([r[key] for r in c]))  # noqa: E731
            lines.append(
                f"| {m} | {t:g}x | {_fmt_acc(accs)} | {base['accuracy'] - np.mean(accs):+.2f} | "
                f"{mean('macs_x'):.2f} | {mean('params_x'):.2f} | "
                f"{mean('channels_kept'):.0f}/{cell[0]['channels_total']} | {mean('weight_sparsity'):.1%} | "
                f"{mean('onnx_bytes') / 1024:.0f} | {mean('wall_s') / 60:.1f} |"
            )
    lines.append("")
    lines.append(
        "Drop = baseline accuracy minus the method's (positive is worse). Where two seeds ran, accuracy is "
        "their mean with each seed's value in brackets. Channels: units of compressor's coupled channel "
        "groups counted on the final model. Zero weights: exact zeros in the final model's conv/linear "
        "weights. "
        + (
            f"Wall time is on one {machine['gpu']} GPU ({machine['device']})."
            if machine.get("gpu")
            else "Wall time is on a shared, loaded CPU: compare it only loosely."
        )
    )
    lines.append("")
    best, rows = margins(runs, targets)
    if rows:
        lines.append(
            f"**compressor's best recipe ({best}, best mean accuracy over the targets) against the best "
            f"Torch-Pruning method at each target:**"
        )
        lines.append("")
        for row in rows:
            verdict = ""
            if row["goal"] is not None:
                want = "no worse" if row["goal"] == 0 else f">= +{row['goal']:.1f} points"
                verdict = (
                    f"goal {want}: **met**"
                    if row["met"]
                    else f"goal {want}: **falls short by {row['goal'] - row['margin']:.2f} points**"
                )
            lines.append(
                f"- {row['target']:g}x: {row['recipe']} {row['accuracy']:.2f}% at {row['macs_x']:.2f}x MACs vs "
                f"{row['reference']} {row['reference_accuracy']:.2f}% at {row['reference_macs_x']:.2f}x: "
                f"margin **{row['margin']:+.2f} points**; {verdict}."
            )
        lines.append("")
    _, kd_rows = margins(runs, targets, references=TP_KD_METHODS)
    if kd_rows:
        lines.append(
            "**The same recipe against Torch-Pruning fine-tuned with compressor's distillation** "
            "(what is left is the difference in choosing and removing channels):"
        )
        lines.append("")
        for row in kd_rows:
            lines.append(
                f"- {row['target']:g}x: {row['accuracy']:.2f}% at {row['macs_x']:.2f}x vs "
                f"{row['reference']} {row['reference_accuracy']:.2f}% at {row['reference_macs_x']:.2f}x: "
                f"margin **{row['margin']:+.2f} points**."
            )
        lines.append("")
    eq_rows = equal_macs_rows(runs, targets)
    if eq_rows:
        lines.append(
            "**At equal MACs** (compressor's default recipe asked for the reduction `tp-magnitude` "
            "reached; mean over the seeds that ran):"
        )
        lines.append("")
        for row in eq_rows:
            refs = "; ".join(
                f"{name} {acc:.2f}% (**{row['accuracy'] - acc:+.2f}**)"
                for name, acc in row["references"].items()
            )
            verdict = ""
            if row["goal"] is not None:
                want = "no worse" if row["goal"] == 0 else f">= +{row['goal']:.1f} points"
                verdict = f"; goal {want} over `{row['reference']}`: " + (
                    "**met**"
                    if row["met"]
                    else f"**falls short by {row['goal'] - row['margin']:.2f}**"
                )
            lines.append(
                f"- {row['target']:g}x: {row['method']} {row['accuracy']:.2f}% at {row['macs_x']:.2f}x "
                f"vs {refs} at {row['reference_macs_x']:.2f}x{verdict}."
            )
        lines.append("")
    gpu = f"{machine['gpu']} (CUDA {machine.get('cuda')}) with " if machine.get("gpu") else ""
    lines.append(
        f"Command: `{results['command']}`. Machine: {gpu}{machine.get('cpu_model', '?')}, "
        f"{machine.get('usable_cores', '?')} usable cores, torch {machine.get('torch', '?')}; "
        f"started {machine.get('date', '?')}. Every run: `{cfg['results']}`; "
        f"plot: `{_relative(Path(plot_path)) if plot_path else 'benchmarks/tradeoff.png'}`."
    )
    lines.append("")
    return "\n".join(lines)


MAIN_BLOCK = "tradeoff"


def markers(name: str = MAIN_BLOCK) -> tuple[str, str]:
    """The ``<!-- BEGIN/END generated: NAME -->`` lines around a rendered block."""
    return f"<!-- BEGIN generated: {name} -->", f"<!-- END generated: {name} -->"


BEGIN_MARK, END_MARK = markers()


def update_results_md(body: str, path: Path = RESULTS_MD, name: str = MAIN_BLOCK) -> None:
    """Put ``body`` into section 1 of RESULTS.md, between the ``name`` markers.

    Prose outside the markers stays. Without markers, the main block replaces
    section 1 (or is created before the first other section); another study's
    block (``name`` other than ``tradeoff``) is added at the end of section 1.
    The file is read right before the atomic write, so other sections written
    meanwhile are kept.
    """
    begin, end = markers(name)
    block = f"{begin}\n{body.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].removeprefix("\n")
        atomic_write_text(path, head + block + tail)
        return
    section = f"{SECTION_TITLE}\n\n{block}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("## 1.")), None)
    if name != MAIN_BLOCK and start is not None:
        end_at = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        atomic_write_text(path, "".join(lines[:end_at]) + block + "\n" + "".join(lines[end_at:]))
        return
    if start is None:
        at = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
        end = at
    else:
        at = start
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
    atomic_write_text(path, "".join(lines[:at]) + section + "".join(lines[end:]))


def plot(results: dict, path: Path) -> None:
    """Accuracy against MACs reduction, one line per method (mean over seeds; seeds hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = dict(zip(ALL_METHODS, "osPv^D<>X", strict=True))
    for m in ALL_METHODS:
        targets = sorted({r["target"] for r in runs if r["method"] == m})
        if not targets:
            continue
        cells = [_cells(runs, m, t) for t in targets]
        xs = [float(np.mean([r["macs_x"] for r in c])) for c in cells]
        ys = [float(np.mean([r["accuracy"] for r in c])) for c in cells]
        style = "--" if m in TP_METHODS + TP_KD_METHODS else "-"
        (line,) = ax.plot(xs, ys, marker=markers[m], linestyle=style, label=m)
        seeds = [r for c in cells if len(c) > 1 for r in c]
        if seeds:
            ax.scatter(
                [r["macs_x"] for r in seeds],
                [r["accuracy"] for r in seeds],
                s=16,
                facecolors="none",
                edgecolors=line.get_color(),
            )
    base = results["baseline"]["accuracy"]
    ax.axhline(base, color="gray", linewidth=0.8, linestyle=":", label="baseline")
    ax.set_xscale("log", base=2)
    ticks = sorted({float(t) for t in results["config"]["targets"]})
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    lo, hi = (
        min([*ticks, *(r["macs_x"] for r in runs)]),
        max([*ticks, *(r["macs_x"] for r in runs)]),
    )
    ax.set_xlim(lo / 1.15, hi * 1.15)
    ax.set_xlabel("MACs reduction (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("ResNet-20 / Fashion-MNIST: accuracy vs MACs reduction, same fine-tuning budget")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")  # processes may plot at once
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# ----------------------------------------------------------------------------- main


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="tl1-group and tp-magnitude at 2x, tiny budget (minutes)",
    )
    p.add_argument("--smoke", action="store_true", help="even smaller than --quick (tests)")
    p.add_argument("--methods", default=None, help=f"comma list of {','.join(ALL_METHODS)}")
    p.add_argument(
        "--targets", default=None, help="comma list of MACs reduction targets (default 2,4,8)"
    )
    p.add_argument("--seeds", default=None, help="seeds of every run (default 0)")
    p.add_argument(
        "--extra-seeds",
        default=None,
        help="more seeds for the best compressor recipe and tp-magnitude at --extra-seed-target (default 1)",
    )
    p.add_argument("--extra-seed-target", type=float, default=4.0)
    p.add_argument("--baseline-epochs", type=int, default=None, help="default 15 (quick: 1)")
    p.add_argument(
        "--baseline-subset", type=int, default=None, help="baseline train images (default all)"
    )
    p.add_argument("--baseline-seed", type=int, default=0)
    p.add_argument(
        "--baseline-checkpoint",
        type=Path,
        default=None,
        help="use this resnet20 state_dict as the baseline instead of training one",
    )
    p.add_argument("--subset", type=int, default=None, help="fine-tuning images (default 20000)")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument(
        "--test-subset",
        type=int,
        default=None,
        help="test on the first N test images (default all)",
    )
    p.add_argument(
        "--budget-epochs",
        type=int,
        default=None,
        help="fine-tuning epochs over --subset (default 3)",
    )
    p.add_argument(
        "--recover-epochs", type=int, default=0, help="of the budget, compressor's recovery epochs"
    )
    p.add_argument("--tp-reg", type=float, default=5e-4, help="GroupNormPruner regularisation")
    p.add_argument(
        "--tp-sparse-fraction",
        type=float,
        default=0.5,
        help="share of the budget spent regularising",
    )
    p.add_argument(
        "--redo",
        default="",
        help="comma list of methods whose recorded runs are dropped and run again (e.g. after a fix)",
    )
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument(
        "--results",
        default=None,
        help="results JSON (default benchmarks/results/tradeoff[_quick].json)",
    )
    p.add_argument("--results-md", default=str(RESULTS_MD))
    p.add_argument(
        "--plot",
        default=None,
        help="plot path (default benchmarks/tradeoff.png; quick: in the cache; with --results: beside that JSON)",
    )
    p.add_argument(
        "--block",
        default=None,
        help="the generated block of RESULTS.md section 1 to render into (default: "
        f"'{MAIN_BLOCK}' for the default --results, else the JSON's name, e.g. tradeoff_budget15)",
    )
    p.add_argument("--no-render", action="store_true", help="do not touch RESULTS.md")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="only render RESULTS.md and the plot from the JSON",
    )
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="only make the baseline, the data and the results JSON (then run methods in parallel processes)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--device",
        default="cpu",
        help="where models train and are evaluated: cpu, cuda, cuda:N or auto (cuda when available)",
    )
    return p


def _relative(path: Path) -> str:
    """``path`` relative to the repository when inside it (the JSON is committed)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _floats(text: str | None, default) -> list[float]:
    return [float(v) for v in text.split(",")] if text else list(default)


def _ints(text: str | None, default) -> list[int]:
    return [int(v) for v in text.split(",")] if text else list(default)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults of the mode (full, --quick, --smoke)."""
    small = args.quick or args.smoke
    defaults = {
        "methods": "tl1-group,tp-magnitude" if small else ",".join(ALL_METHODS),
        "targets": "2" if small else "2,4,8",
        "seeds": "0",
        "extra_seeds": "" if small else "1",
        "baseline_epochs": 1 if small else 15,
        "baseline_subset": 512 if args.smoke else (10000 if args.quick else None),
        "subset": 256 if args.smoke else (2000 if args.quick else 20000),
        "budget_epochs": 1 if small else 3,
        "test_subset": 512 if args.smoke else None,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in ALL_METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(ALL_METHODS)}")
    args.targets = _floats(args.targets, ())
    args.seeds = _ints(args.seeds, ())
    args.extra_seeds = _ints(args.extra_seeds, ())
    if not 0 <= args.recover_epochs < args.budget_epochs:
        raise SystemExit(
            "--recover-epochs must be >= 0 and below --budget-epochs (RVSM needs one epoch)"
        )
    tag = "_smoke" if args.smoke else ("_quick" if args.quick else "")
    default_results = RESULTS_DIR / f"tradeoff{tag}.json"
    args.results = Path(args.results or default_results)
    if args.plot is None:
        if (
            args.results.resolve() != default_results.resolve()
        ):  # another study: keep the committed plot
            args.plot = args.results.with_suffix(".png")
        elif small:
            args.plot = Path(args.cache_dir) / f"tradeoff{tag}.png"
        else:
            args.plot = ROOT / "benchmarks" / "tradeoff.png"
    args.plot = Path(args.plot)
    if args.block is None:  # another study renders into its own block, named after its JSON
        same = args.results.resolve() == default_results.resolve()
        args.block = MAIN_BLOCK if same else args.results.stem
    if small:
        args.no_render = True
    return args


SOURCE: dict = {}


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(get_args_parser().parse_args(argv))
    SOURCE.update(compressor_source())  # at start: what this process has imported
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("torch_pruning", "onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir)
    results_path: Path = args.results

    if args.render_only:
        results = json.loads(results_path.read_text())
        _render(results, args, plan=None)
        return 0
    args.device = resolve_device(args.device)
    log.info("device: %s", device_info(args.device))

    if args.baseline_checkpoint is not None:
        # e.g. the bundled example's ResNet-20 (examples/make_example.py: 4 epochs on 30k images)
        baseline_info = {
            "path": str(args.baseline_checkpoint),
            "epochs": None,
            "train_images": None,
        }
        args.baseline_epochs = f"checkpoint:{args.baseline_checkpoint}"
    else:
        baseline_info = train_baseline(
            data_dir=args.data,
            epochs=args.baseline_epochs,
            seed=args.baseline_seed,
            subset=args.baseline_subset,
            cache_dir=cache,
            test_subset=args.test_subset,
            device=args.device,
        )
    npz = prepare_data(args.data, cache, args.subset, args.subset_seed, args.test_subset)
    n_train = len(np.load(npz)["y_train"])
    steps_per_epoch = n_train // 128 + (1 if n_train % 128 > 1 else 0)
    config = {
        "baseline_epochs": args.baseline_epochs,
        "baseline_subset": args.baseline_subset,
        "baseline_seed": args.baseline_seed,
        "subset": args.subset,
        "subset_seed": args.subset_seed,
        "test_subset": args.test_subset,
        "budget_epochs": args.budget_epochs,
        "optimizer_steps": args.budget_epochs * steps_per_epoch,
        "recover_epochs": args.recover_epochs,
        "tp_reg": args.tp_reg,
        "tp_sparse_fraction": args.tp_sparse_fraction,
        "targets": args.targets,
        "results": _relative(results_path),
    }
    same = (
        "baseline_epochs",
        "baseline_subset",
        "baseline_seed",
        "subset",
        "subset_seed",
        "test_subset",
        "budget_epochs",
        "recover_epochs",
        "tp_reg",
        "tp_sparse_fraction",
    )
    if results_path.exists():
        results = json.loads(results_path.read_text())
        old = results["config"]
        diff = [k for k in same if old.get(k) != config[k]]
        if diff:
            raise SystemExit(
                f"{results_path} holds runs made with other settings ({', '.join(diff)}); "
                "pass --results NEW.json or rerun with the same settings."
            )
        results["config"]["targets"] = sorted(set(old["targets"]) | set(args.targets))
        first = results.get("machine", {}).get("device", "cpu")
        if first != str(args.device):
            log.warning(
                "%s was started on %s; this process runs on %s (each run records its device)",
                results_path,
                first,
                args.device,
            )
        redo = {m.strip() for m in args.redo.split(",") if m.strip()}
        if redo:
            dropped = [r for r in results["runs"] if r["method"] in redo]
            results.setdefault("dropped_runs", []).extend(dropped)
            results["runs"] = [r for r in results["runs"] if r["method"] not in redo]
            log.info("--redo: dropped %d run(s) of %s", len(dropped), ", ".join(sorted(redo)))
            write_json(results_path, results)
    else:
        base_model = load_baseline_model(baseline_info["path"])
        measures = describe_model(base_model, cache / "tradeoff_runs", "baseline")
        splits = load_data(npz)
        _, val_loader = make_loaders(splits, batch_size=256, seed=0)
        test_accuracy = train_mod.evaluate(base_model.to(args.device), val_loader, args.device)[0]
        results = {
            "schema": SCHEMA_VERSION,
            "benchmark": "tradeoff",
            "command": command_line("benchmarks/tradeoff.py", argv),
            "machine": machine_info(args.device),
            "config": config,
            "baseline": {
                "path": baseline_info["path"],
                "accuracy": test_accuracy,
                "epochs": baseline_info["epochs"],
                "train_images": baseline_info["train_images"],
                "test_images": len(splits.val),
                "train_seconds": baseline_info.get("train_seconds"),
                **measures,
            },
            "runs": [],
        }
        write_json(results_path, results)
    baseline = results["baseline"]
    log.info(
        "baseline %.2f%%, %d MACs, %d params",
        baseline["accuracy"],
        baseline["macs"],
        baseline["params"],
    )
    if args.prepare_only:
        return 0

    work_root = cache / ("tradeoff_runs" + results_path.stem.removeprefix("tradeoff"))
    plan = plan_runs(args.methods, args.targets, args.seeds)
    for method, target, seed in _with_extra_seeds(plan, results, args):
        key = run_key(method, target, seed)
        if any(r["key"] == key for r in results["runs"]):
            log.info("skip %s (done)", key)
            continue
        log.info("run %s", key)
        row = execute(
            method, target, seed, args=args, baseline=baseline, npz=npz, work_root=work_root
        )
        with _locked(results_path):  # processes running other methods append to the same file
            results = json.loads(results_path.read_text())
            results["runs"] = [r for r in results["runs"] if r["key"] != key] + [row]
            results["updated"] = row["finished"]
            write_json(results_path, results)
        log.info(
            "%s: %.2f%% (drop %+.2f), %.2fx MACs, %.0f s",
            key,
            row["accuracy"],
            row["drop"],
            row["macs_x"],
            row["wall_s"],
        )
        _render(results, args, plan=plan)
    _render(results, args, plan=None)
    best, rows = margins(results["runs"], args.targets)
    for row in rows:
        log.info(
            "%gx: %s %.2f%% vs %s %.2f%%: margin %+.2f",
            row["target"],
            best,
            row["accuracy"],
            row["reference"],
            row["reference_accuracy"],
            row["margin"],
        )
    return 0


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock (``fcntl.flock`` on ``PATH.lock``) for a read-modify-write of ``path``."""
    import fcntl

    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _with_extra_seeds(plan, results, args):
    """The planned runs, then the extra seeds at --extra-seed-target once the best recipe is known."""
    yield from plan
    if not args.extra_seeds or args.extra_seed_target not in args.targets:
        return
    runs = results_now(args.results)
    best = best_recipe(runs, target=args.extra_seed_target, seed=args.seeds[0])
    extra_methods = [m for m in (best, "tp-magnitude") if m is not None and m in args.methods]
    for seed in args.extra_seeds:
        for method in extra_methods:
            yield method, args.extra_seed_target, seed


def results_now(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text())["runs"]


def _render(results: dict, args, plan) -> None:
    if results["runs"]:
        plot(results, args.plot)
    if not args.no_render:
        update_results_md(
            render_section(results, plan, plot_path=args.plot),
            Path(args.results_md),
            name=args.block,
        )


if __name__ == "__main__":
    sys.exit(main())
