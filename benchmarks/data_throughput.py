"""Data-loader throughput: images/s of the training loader on a folder of JPEGs, workers
``auto`` against 0, with and without the ``standard`` augmentation.

Makes a synthetic ImageFolder (``--images`` JPEGs of 3x``--side``x``--side``, smooth
random colour fields plus noise, ``--classes`` classes; a few validation images) in a
temporary directory, then times full passes over the training loader exactly as
``compress`` builds it (``compressor.data.load_data`` + ``make_loaders``: shuffled,
batch ``--batch-size``, workers started per pass). Only the loader is timed, no model:
the rate is the most images per second the loader can feed a training loop
(``--compute-ms`` adds a stand-in training step per batch, which workers overlap). The
configurations alternate pass by pass (after ``--warmup`` untimed passes each), so a
change in the machine's load hits all of them; the median pass is reported.

Writes ``benchmarks/results/data_throughput.json`` with the machine (CPU count, usable
cores), the resolved number of workers and the command.

    .venv/bin/python benchmarks/data_throughput.py            # ~2 min on 2 cores
    .venv/bin/python benchmarks/data_throughput.py --quick    # 200 images, 1 pass (~15 s)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import command_line, machine_info, write_json  # noqa: E402
from compressor.data import load_data, make_loaders, resolve_workers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "data_throughput.json"


def make_folder(root: Path, images: int, side: int, classes: int, seed: int = 0) -> Path:
    """``images`` training JPEGs (and one validation JPEG per class) under ``root``:
    an upsampled 8x8 random colour field plus pixel noise, quality 90, so that they
    decode like photographs rather than like pure noise."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            folder = root / split / f"class{i % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            smooth = np.asarray(coarse.resize((side, side), Image.BICUBIC), dtype=np.int16)
            noisy = smooth + rng.integers(-12, 13, smooth.shape, dtype=np.int16)
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(
                folder / f"{i:05d}.jpg", quality=90
            )
    return root


def busy(ms: float) -> None:
    """Keep this process's core busy for ``ms`` milliseconds (a stand-in training step)."""
    end = time.perf_counter() + ms / 1000
    a = torch.ones(64, 64)
    while time.perf_counter() < end:
        a = a @ a / 64


def one_pass(loader, compute_ms: float = 0.0) -> tuple[float, int]:
    """Seconds for one full pass over ``loader`` (with ``compute_ms`` of work per batch in
    this process) and the images it gave."""
    start = time.perf_counter()
    seen = 0
    for x, _ in loader:
        seen += x.shape[0]
        if compute_ms:
            busy(compute_ms)
    return time.perf_counter() - start, seen


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="training JPEGs (default 2000)")
    p.add_argument("--side", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--workers",
        nargs="+",
        default=["0", "auto"],
        help="loader workers to compare, each an int or auto (default: 0 auto)",
    )
    p.add_argument("--passes", type=int, default=3, help="timed passes per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per configuration")
    p.add_argument(
        "--compute-ms",
        type=float,
        default=0.0,
        help="CPU work per batch in the training process, a stand-in for the training step "
        "that workers overlap with (default 0: the loader alone)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="200 images, 1 timed pass")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.images, args.passes = min(args.images, 200), 1
        if args.out == str(DEFAULT_OUT):
            args.out = str(DEFAULT_OUT.with_name("data_throughput_quick.json"))
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    workers_list = [w if w == "auto" else int(w) for w in args.workers]
    configs = [(w, a) for a in ("none", "standard") for w in workers_list]
    seconds: dict[tuple, list[float]] = {c: [] for c in configs}
    resolved: dict[tuple, int] = {}
    with tempfile.TemporaryDirectory(prefix="data_throughput_") as tmp:
        start = time.perf_counter()
        root = make_folder(Path(tmp), args.images, args.side, args.classes)
        made_s = time.perf_counter() - start
        jpeg_bytes = sum(p.stat().st_size for p in (root / "train").rglob("*.jpg"))
        loaders = {}
        for workers, augment in configs:
            splits = load_data(root, augment=augment)
            loaders[workers, augment] = make_loaders(
                splits, batch_size=args.batch_size, seed=0, num_workers=workers
            )[0]
            resolved[workers, augment] = resolve_workers(workers, splits)
        for rep in range(args.warmup + args.passes):
            order = configs if rep % 2 == 0 else configs[::-1]  # A B C D, D C B A, ...
            for config in order:
                took, seen = one_pass(loaders[config], args.compute_ms)
                if rep >= args.warmup:
                    seconds[config].append(took)
                print(f"pass {rep} {config}: {seen / took:.0f} images/s", file=sys.stderr)
        images = seen

    results = []
    for workers, augment in configs:
        times = seconds[workers, augment]
        median = statistics.median(times)
        results.append(
            {
                "workers": str(workers),
                "workers_resolved": resolved[workers, augment],
                "augment": augment,
                "images_per_s": round(images / median, 1),
                "pass_s": [round(t, 3) for t in times],
            }
        )
    by = {(r["workers"], r["augment"]): r["images_per_s"] for r in results}
    speedup = {
        f"{w}_vs_0": {a: round(by[str(w), a] / by["0", a], 3) for a in ("none", "standard")}
        for w in workers_list
        if str(w) != "0" and "0" in args.workers
    }
    data = {
        "benchmark": "data_throughput",
        "command": command_line("benchmarks/data_throughput.py", argv),
        "machine": machine,
        "setup": {
            "images": args.images,
            "side": args.side,
            "classes": args.classes,
            "jpeg_mean_bytes": round(jpeg_bytes / args.images),
            "batch_size": args.batch_size,
            "passes": args.passes,
            "warmup_passes": args.warmup,
            "made_folder_s": round(made_s, 1),
            "compute_ms_per_batch": args.compute_ms,
            "timed": "full passes over the training loader (decode, augmentation, to tensor, "
            "collation; workers started per pass as in compress), no model"
            + (
                f"; {args.compute_ms:g} ms of CPU work per batch in the training process"
                if args.compute_ms
                else ""
            ),
        },
        "results": results,
        "speedup": speedup,
    }
    write_json(args.out, data)
    for r in results:
        print(
            f"workers {r['workers']:>4} (= {r['workers_resolved']}), augment {r['augment']:8s}: "
            f"{r['images_per_s']:7.1f} images/s",
            file=sys.stderr,
        )
    print(f"speedup (images/s against 0 workers): {speedup}; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
