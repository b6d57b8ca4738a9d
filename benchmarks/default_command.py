"""The user's own command, ``compress model.pt --recipe tl1-group --data D``, with no other flag.

On the benchmarks' ResNet-20 trained on Fashion-MNIST
(``benchmarks/train_baseline.py``, 8 epochs, never on the validation split below), for each training-set size (the full 55,000
images left after carving the validation split, and a 10,000-image subset of
them): the data handed to ``compress`` is that training set plus a validation
split of 5,000 images carved from the training images (seed 0, never trained
on), so everything the run decides (the accuracy seeker's checks, the report's
accuracy) uses training data only; the compact model it ships is then scored
here on the 10,000 test images, which nothing in the run saw.

Writes ``benchmarks/results/default_command.json`` (one row per training-set
size, appended as each finishes) with the MACs and params reduction, the test
accuracy before and after, the wall time and the exit code.

    .venv/bin/python benchmarks/default_command.py --threads 1
    .venv/bin/python benchmarks/default_command.py --sizes 10000 --threads 1   # one size
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import compressor  # noqa: E402
from benchmarks.common import command_line, machine_info, start_benchmark  # noqa: E402
from benchmarks.train_baseline import (  # noqa: E402
    DEFAULT_CACHE,
    DEFAULT_DATA,
    load_fmnist,
    train_baseline,
    validation_split,
)
from compressor import export  # noqa: E402
from compressor.fileio import atomic_write_text  # noqa: E402

log = logging.getLogger("benchmarks.default_command")
ROOT = Path(__file__).resolve().parents[1]
VAL_IMAGES = 5000


def carve(data_dir: Path, cache: Path, size: int | None, seed: int = 0) -> Path:
    """An npz of ``size`` training images (all but the validation split when None) and the
    validation split carved from the training images; cached."""
    path = cache / f"fmnist_default_val{VAL_IMAGES}_train{size or 'all'}_s{seed}.npz"
    if path.exists():
        return path
    (x, y), _ = load_fmnist(data_dir)
    val, rest = validation_split(len(x), VAL_IMAGES, seed)
    train = rest if size is None else rest[:size]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, x_train=x[train].numpy(), y_train=y[train].numpy(),
             x_val=x[val].numpy(), y_val=y[val].numpy())  # fmt: skip
    tmp.replace(path)
    return path


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 (%) on uint8 images scaled to [0, 1] (what ``compress`` does with no --mean/--std)."""
    model.eval()
    correct = 0
    for i in range(0, len(x), 1000):
        logits = model(x[i : i + 1000].float() / 255)
        correct += int((logits.argmax(1) == y[i : i + 1000]).sum())
    return 100.0 * correct / len(x)


def int8_row(int8: dict, work: Path, x_test: torch.Tensor, y_test: torch.Tensor) -> dict:
    """The report's INT8 section, plus both ONNX models' test accuracy in onnxruntime."""
    row = {k: int8.get(k) for k in ("mode", "file", "size_x", "weights_size_x", "onnx_bytes",
                                    "float_onnx_bytes", "accuracy", "float_accuracy",
                                    "top1_agreement", "latency_ms", "onnx_checker")}  # fmt: skip
    if int8.get("file"):
        images = (x_test.float() / 255, y_test)  # as test_accuracy feeds them
        test = export.compare_onnx(work / "model.onnx", work / int8["file"], [images])
        row["test_accuracy_float_onnx"] = test["reference_accuracy"]
        row["test_accuracy_int8"] = test["accuracy"]
        row["test_top1_agreement"] = test["top1_agreement"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--baseline-epochs", type=int, default=8)
    p.add_argument("--sizes", default="all,10000", help="training-set sizes, 'all' = every image")
    p.add_argument("--recipe", default="tl1-group")
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="the fine-tune's seed (shuffle, init)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "default_command.json"))
    args = p.parse_args(argv)
    start_benchmark(args.threads)
    cache = Path(args.cache_dir)
    baseline = train_baseline(
        data_dir=args.data, epochs=args.baseline_epochs, holdout=VAL_IMAGES, cache_dir=cache
    )
    _, (x_test, y_test) = load_fmnist(args.data)
    out = Path(args.out)
    rows = json.loads(out.read_text())["runs"] if out.exists() else []
    for size_text in args.sizes.split(","):
        size = None if size_text == "all" else int(size_text)
        npz = carve(Path(args.data), cache, size)
        work = cache / f"default_command_{size_text}_s{args.seed}"
        start = time.perf_counter()
        report = compressor.compress(
            baseline["path"], arch="resnet20", data=str(npz), recipe=args.recipe,
            out=work, device="cpu", overrides=args.overrides, seed=args.seed,
        )  # fmt: skip
        wall = time.perf_counter() - start
        from compressor.models import resnet20

        before = resnet20(num_classes=10, in_channels=1)
        before.load_state_dict(torch.load(baseline["path"], map_location="cpu", weights_only=True))
        after = compressor.load(work / "model.safetensors")
        row = {
            "train_images": size or len(np.load(npz)["y_train"]),
            "recipe": args.recipe,
            "overrides": args.overrides,
            "seed": args.seed,
            "exit_code": report["exit_code"],
            "epochs": report["input"].get("epochs"),  # train.epochs as resolved
            "macs_x": report["reduction"]["macs_x"],
            "params_x": report["reduction"]["params_x"],
            "val_accuracy_before": report["baseline"]["accuracy"],
            "val_accuracy_after": report["compressed"]["accuracy"],
            "test_accuracy_before": test_accuracy(before, x_test, y_test),
            "test_accuracy_after": test_accuracy(after, x_test, y_test),
            "seek_stages": (report.get("target") or {}).get("stages"),
            "onnx_top1_agreement": report["verification"].get("top1_agreement"),
            "binarized": (report.get("activations") or {}).get("swapped"),
            "wall_s": round(wall, 1),
            "timings_s": report.get("timings_s"),
        }
        row["test_drop"] = row["test_accuracy_before"] - row["test_accuracy_after"]
        if report.get("int8"):
            row["int8"] = int8_row(report["int8"], work, x_test, y_test)
        log.info("%s", {k: v for k, v in row.items() if k not in ("seek_stages", "timings_s")})
        rows.append(row)
        payload = {
            "benchmark": "default_command",
            "command": command_line("benchmarks/default_command.py", argv),
            "machine": machine_info(),
            "baseline": {k: v for k, v in baseline.items() if k != "path"},
            "runs": rows,
        }
        atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
