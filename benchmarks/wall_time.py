"""Wall time of ``compress`` against a plain fine-tune of the same steps and loss, side by side.

One process, the same data, the same number of SGD steps, the same loss
(cross-entropy mixed with distillation from the input model, ``distill.weight``
of the recipe) and the same learning-rate schedule. The plain fine-tune is a
bare loop (forward, teacher forward, backward, SGD step) plus one evaluation of
the result on the validation split; ``compress`` is the whole command with
every fixed cost included (loading, baseline evaluation and export, groups,
RVSM, per-epoch evaluation, pruning, ONNX export and verification, latency,
report). The two alternate ``--repeats`` times (plain first, then compress) and
the ratio of the medians is reported, with ``compress``'s own stage timings.

Writes ``benchmarks/results/wall_time.json``.

    .venv/bin/python benchmarks/wall_time.py --threads 1          # the bundled example
    # one epoch over 55,000 images with a 4.58x MACs target (the benchmarks' ResNet-20,
    # benchmarks/train_baseline.py; data carved by benchmarks/default_command.py):
    .venv/bin/python benchmarks/wall_time.py --threads 1 --repeats 1 \
        --checkpoint benchmarks/.cache/resnet20_fmnist_e8_s0.pt \
        --data benchmarks/.cache/fmnist_default_val5000_trainall_s0.npz \
        --target-macs 4.58 --set train.epochs=1 --out benchmarks/results/wall_time_55k.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import compressor  # noqa: E402
from benchmarks.common import command_line, machine_info, start_benchmark  # noqa: E402
from compressor import recipe as recipe_mod  # noqa: E402
from compressor import train as train_mod  # noqa: E402
from compressor.checkpoint import load_checkpoint  # noqa: E402
from compressor.config import Recipe  # noqa: E402
from compressor.data import load_data, make_loaders  # noqa: E402
from compressor.fileio import atomic_write_text  # noqa: E402

log = logging.getLogger("benchmarks.wall_time")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion-mnist"


def plain_fine_tune(checkpoint: Path, arch: str, data: str, recipe: Recipe, seed: int) -> float:
    """Seconds for the bare fine-tune of the same steps and loss, plus one evaluation."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = load_checkpoint(checkpoint, arch=arch).model
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    splits = load_data(data)
    train_loader, val_loader = make_loaders(splits, batch_size=recipe.train.batch_size, seed=seed)
    steps = train_mod.steps_per_epoch(train_loader, recipe.train.max_steps_per_epoch)
    epochs = train_mod.resolve_epochs(recipe.train.epochs, steps, recipe.train.min_steps)
    optimizer = train_mod.make_optimizer(model, recipe.train)
    scheduler = train_mod.make_scheduler(optimizer, recipe.train.schedule, epochs * steps)
    for epoch in range(epochs):
        train_mod.train_one_epoch(
            model, train_loader, optimizer, scheduler, torch.device("cpu"),
            max_steps=recipe.train.max_steps_per_epoch, epoch=epoch, teacher=teacher,
            distill=recipe.distill,
        )  # fmt: skip
    train_mod.evaluate(model, val_loader, torch.device("cpu"))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(EXAMPLE / "model.pt"))
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--data", default=str(EXAMPLE / "data.npz"))
    p.add_argument("--recipe", default="tl1-group")
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p.add_argument("--target-macs", default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "wall_time.json"))
    args = p.parse_args(argv)
    start_benchmark(args.threads)
    recipe = Recipe.from_dict(recipe_mod.load_recipe(args.recipe, args.overrides))
    plain, full, stages = [], [], []
    for r in range(args.repeats):
        plain.append(plain_fine_tune(Path(args.checkpoint), args.arch, args.data, recipe, r))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report = compressor.compress(
                args.checkpoint, arch=args.arch, data=args.data, recipe=args.recipe,
                overrides=args.overrides, target_macs=args.target_macs, out=tmp, device="cpu",
                seed=r,
            )  # fmt: skip
            full.append(time.perf_counter() - start)
            stages.append(report.get("timings_s"))
        log.info("repeat %d: plain %.1f s, compress %.1f s", r + 1, plain[-1], full[-1])
    ratio = statistics.median(full) / statistics.median(plain)
    payload = {
        "benchmark": "wall_time",
        "command": command_line("benchmarks/wall_time.py", argv),
        "machine": machine_info(),
        "recipe": args.recipe,
        "overrides": args.overrides,
        "target_macs": args.target_macs,
        "plain_s": plain,
        "compress_s": full,
        "compress_stages_s": stages,
        "ratio": ratio,
        "goal": 1.3,
        "met": ratio <= 1.3,
    }
    atomic_write_text(Path(args.out), json.dumps(payload, indent=2) + "\n")
    log.info("compress / plain fine-tune: %.2fx (goal <= 1.3)", ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
