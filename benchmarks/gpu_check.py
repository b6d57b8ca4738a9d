"""GPU check: training images/s of a plain fine-tune against ``compress`` on a synthetic
ImageFolder, and a ``torchrun`` DDP run on every GPU found, in one command.

Makes a synthetic ImageFolder (``--images`` JPEGs of 3x``--side``x``--side``, ``--classes``
classes; :func:`benchmarks.data_throughput.make_folder`) and a randomly initialised
torchvision ``--arch`` checkpoint (resnet50, ``--classes`` outputs) in a temporary
directory, then on the device (CUDA when there is one):

* ``loader``: the training loader alone, built as ``compress`` builds it (``load_data`` +
  ``make_loaders``: standard augmentation, workers ``auto``), no model: the most images/s
  it can feed;
* ``plain``: a plain fine-tune through compressor's own loop (``train.train_one_epoch``:
  cross-entropy, the recipe's SGD, ``train.amp`` and ``train.channels_last`` resolved as
  ``compress`` resolves them) over the same loader, ``--epochs`` x ``--steps`` steps; on
  CUDA also ``plain_fp32`` (amp off, channels-last off: what the two buy) and
  ``plain_channels_last_weights`` (the parameters converted to channels-last too, which
  ``compress`` does not do);
* ``compress``: ``compressor.compress(..., target_macs=2, overrides=[train.epochs=...,
  train.max_steps_per_epoch=..., ...])`` with the same steps: the RVSM method, the
  distillation teacher (``distill.weight``) and everything else of the default recipe;
* ``ddp``: with more than one GPU (or ``--ddp-procs N``), ``python -m torch.distributed.run
  --nproc_per_node=N -m compressor ...`` (what ``torchrun`` runs), checked to exit 0.

Images/s are counted per step as ``compress`` runs them: each training step's batch is
stamped when the loop takes it (every step ends in ``loss.item()``, so the stamps follow
the device); ``images_per_s`` leaves out the first ``--warmup`` steps of every epoch
(compilation, cuDNN autotuning, loader start-up), ``images_per_s_all_steps`` keeps them,
and ``compress`` also gives the rate from its report's ``timings_s.train``.

Writes ``DIR/gpu_check.json`` (the GPUs' names and count, the resolved precision, images/s
and their ratios) and the runs' ``report.json`` files; exit status 0 when ``compress`` and
the DDP run (if any) exited 0.

    python benchmarks/gpu_check.py --out DIR          # resnet50, 2000 images of 224x224
    python benchmarks/gpu_check.py --out DIR --quick  # resnet18, 32x32, a few steps (CPU: ~15 s)
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torchvision  # noqa: E402

import compressor  # noqa: E402
from benchmarks.common import command_line, machine_info, synchronize, write_json  # noqa: E402
from benchmarks.data_throughput import make_folder  # noqa: E402
from compressor import train  # noqa: E402
from compressor.config import Recipe  # noqa: E402
from compressor.data import load_data, make_loaders  # noqa: E402
from compressor.progress import Progress  # noqa: E402
from compressor.recipe import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "tl1-group"
TARGET_MACS = 2.0


class StepClock(Progress):
    """A silent :class:`Progress` that stamps each step: ``stamps[header]`` holds, per epoch
    (``"train epoch 1"`` ...), ``(time, images)`` when the loop takes each batch, and last
    the time it asks for the batch after its last step (the end of that step)."""

    def __init__(self):
        super().__init__("off")
        self.stamps: dict[str, list[tuple[float, int]]] = {}

    def log_every(self, iterable, header, *, total=None):
        stamps = self.stamps.setdefault(header, [])
        return super().log_every(_Stamped(iterable, stamps), header, total=total)

    def rates(self, warmup: int, prefix: str = "train epoch") -> dict:
        """Images/s over the training epochs: without the first ``warmup`` steps of each
        (``images_per_s``) and with them (``images_per_s_all_steps``)."""
        steady, every, steps = [0, 0.0], [0, 0.0], 0
        for header, stamps in self.stamps.items():
            if not header.startswith(prefix) or len(stamps) < 2:
                continue
            times, sizes = [t for t, _ in stamps], [n for _, n in stamps[:-1]]
            steps += len(sizes)
            every[0] += sum(sizes)
            every[1] += times[-1] - times[0]
            if len(sizes) > warmup:
                steady[0] += sum(sizes[warmup:])
                steady[1] += times[-1] - times[warmup]
        return {
            "steps": steps,
            "images": every[0],
            "images_per_s": round(steady[0] / steady[1], 1) if steady[1] > 0 else None,
            "images_per_s_all_steps": round(every[0] / every[1], 1) if every[1] > 0 else None,
        }


class _Stamped:
    """``loader``, stamping each batch it hands out into ``stamps`` (see :class:`StepClock`)."""

    def __init__(self, loader, stamps: list):
        self.loader, self.stamps = loader, stamps

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            self.stamps.append((time.perf_counter(), len(y)))
            yield x, y
        self.stamps.append((time.perf_counter(), 0))


def recipe_overrides(args) -> list[str]:
    """The ``--set`` list of every run: the same steps, batch size and learning rate."""
    sets = [
        f"train.epochs={args.epochs}",
        f"train.max_steps_per_epoch={args.steps}",
        f"train.batch_size={args.batch_size}",
        "gates.max_accuracy_drop=null",  # random weights on random images: chance accuracy
    ]
    if args.quick:  # a smoke test: no torch.compile of the fused kernels (seconds on a CPU)
        sets += ["train.bn_recalibration_batches=2", "export.verify_samples=8"]
        sets += ["splitting.fused='off'"]  # quoted: YAML reads a bare off as false
    return [*sets, *args.set]


def fresh_model(args, checkpoint: Path, device: torch.device) -> torch.nn.Module:
    model = torchvision.models.get_model(args.arch, num_classes=args.classes)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    return model.to(device)


def time_loader(loader, args) -> dict:
    """The loader alone, ``--epochs`` passes of ``--steps`` batches, stamped like a training
    loop (see :class:`StepClock`)."""
    clock = StepClock()
    for epoch in range(args.epochs):
        for step, _ in enumerate(clock.log_every(loader, f"train epoch {epoch + 1}")):
            if step >= args.steps:
                break
    return clock.rates(args.warmup)


def time_plain(args, checkpoint, loader, device, cfg, *, precision=None, cl_weights=False):
    """A plain fine-tune (cross-entropy, the recipe's optimizer and schedule) through
    ``train.train_one_epoch``; ``precision`` defaults to what ``compress`` resolves."""
    model = fresh_model(args, checkpoint, device)
    if cl_weights:
        model = model.to(memory_format=torch.channels_last)
    precision = precision or train.resolve_precision(cfg.train, device, model)
    optimizer = train.make_optimizer(model, cfg.train)
    scheduler = train.make_scheduler(optimizer, cfg.train.schedule, args.epochs * args.steps)
    clock = StepClock()
    synchronize(device)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        train.train_one_epoch(
            model, loader, optimizer, scheduler, device, max_steps=args.steps, epoch=epoch,
            progress=clock, precision=precision, log_every=0,
        )  # fmt: skip
    synchronize(device)
    return {
        **precision.summary(),
        "channels_last_weights": cl_weights,
        **clock.rates(args.warmup),
        "train_s": round(time.perf_counter() - start, 3),
    }


def run_compress(args, checkpoint, folder, device, work: Path, out: Path) -> dict:
    clock = StepClock()
    start = time.perf_counter()
    report = compressor.compress(
        str(checkpoint), arch=args.arch, data=str(folder), out=work / "compress",
        device=str(device), target_macs=TARGET_MACS, overrides=recipe_overrides(args),
        progress=clock,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    shutil.copy(work / "compress" / "report.json", out / "compress_report.json")
    timings = report.get("timings_s", {})
    rates = clock.rates(args.warmup)
    train_s = timings.get("train")
    return {
        "exit_code": report["exit_code"],
        **rates,
        "images_per_s_report_timings": round(rates["images"] / train_s, 1) if train_s else None,
        "amp": report["input"].get("amp"),
        "channels_last": report["input"].get("channels_last"),
        "workers": report["input"].get("workers"),
        "timings_s": timings,
        "total_s": round(seconds, 1),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(args, checkpoint, folder, device, procs: int, work: Path, out: Path) -> dict:
    """``torchrun --nproc_per_node=procs -m compressor ...`` (through ``python -m
    torch.distributed.run``, the same launcher); ok when it exits 0 with a report."""
    sets = [a for s in recipe_overrides(args) for a in ("--set", s)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
        f"--master_port={free_port()}", "-m", "compressor", str(checkpoint),
        "--arch", args.arch, "--data", str(folder), "--out", str(work / "ddp"),
        "--target-macs", str(TARGET_MACS), "--device", device.type, "-q", *sets,
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.ddp_timeout, check=False
    )
    result = {
        "nproc_per_node": procs,
        "command": " ".join(cmd[1:]),
        "returncode": done.returncode,
        "seconds": round(time.perf_counter() - start, 1),
    }
    report_path = work / "ddp" / "report.json"
    if report_path.is_file():
        shutil.copy(report_path, out / "ddp_report.json")
        report = json.loads(report_path.read_text())
        train_s = report.get("timings_s", {}).get("train")
        images = procs * args.epochs * args.steps * args.batch_size  # per-rank batches
        result.update(
            exit_code=report["exit_code"],
            images_per_s_report_timings=round(images / train_s, 1) if train_s else None,
        )
    if done.returncode != 0:
        result["stderr_tail"] = done.stderr[-4000:]
    return result


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check"))
    p.add_argument("--arch", default="resnet50", help="torchvision model (default resnet50)")
    p.add_argument("--images", type=int, default=2000, help="training JPEGs (default 2000)")
    p.add_argument("--side", type=int, default=224)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="training steps per epoch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps at each epoch's start")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument(
        "--ddp-procs",
        type=int,
        default=None,
        help="processes of the torchrun check (default: the GPU count when above 1, else none)",
    )
    p.add_argument("--ddp-timeout", type=float, default=1200.0, help="seconds")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--quick", action="store_true", help="resnet18, 64 images of 32x32, 3 steps, 1 epoch"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.arch, args.images, args.side = "resnet18", min(args.images, 64), min(args.side, 32)
        args.batch_size, args.steps, args.epochs, args.warmup = 8, 3, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    procs = args.ddp_procs if args.ddp_procs is not None else (gpus if gpus > 1 else 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = Recipe.from_dict(load_recipe(RECIPE, recipe_overrides(args)))
    data = {
        "benchmark": "gpu_check",
        "command": command_line("benchmarks/gpu_check.py", argv),
        "machine": machine_info(device),
        "gpus": {
            "count": gpus,
            "names": [torch.cuda.get_device_name(i) for i in range(gpus)],
        },
        "setup": {
            "arch": args.arch,
            "images": args.images,
            "side": args.side,
            "classes": args.classes,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "steps_per_epoch": args.steps,
            "warmup_steps_per_epoch": args.warmup,
            "recipe": RECIPE,
            "target_macs": TARGET_MACS,
            "overrides": recipe_overrides(args),
            "distill_weight": cfg.distill.weight,
        },
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        folder = make_folder(work / "images", args.images, args.side, args.classes)
        data["setup"]["made_folder_s"] = round(time.perf_counter() - start, 1)
        torch.manual_seed(0)
        checkpoint = work / f"{args.arch}.pt"
        model = torchvision.models.get_model(args.arch, num_classes=args.classes)
        torch.save(model.state_dict(), checkpoint)
        splits = load_data(folder, augment=cfg.data.augment)
        loader, _ = make_loaders(
            splits, batch_size=args.batch_size, seed=0, num_workers=cfg.data.workers,
            pin_memory=device.type == "cuda",
        )  # fmt: skip
        data["loader"] = {"workers": loader.num_workers, **time_loader(loader, args)}
        log(f"loader alone: {data['loader']['images_per_s']} images/s")
        data["plain"] = time_plain(args, checkpoint, loader, device, cfg)
        log(f"plain fine-tune: {data['plain']}")
        if device.type == "cuda":
            fp32 = train.Precision(device)
            data["plain_fp32"] = time_plain(args, checkpoint, loader, device, cfg, precision=fp32)
            data["plain_channels_last_weights"] = time_plain(
                args, checkpoint, loader, device, cfg, cl_weights=True
            )
        data["compress"] = run_compress(args, checkpoint, folder, device, work, out)
        log(f"compress: {data['compress']}")
        data["ddp"] = (
            run_ddp(args, checkpoint, folder, device, procs, work, out) if procs > 1 else None
        )
        if data["ddp"]:
            log(f"ddp: {data['ddp']}")
    runs = ("loader", "plain", "plain_fp32", "plain_channels_last_weights", "compress")
    rate = {k: data[k]["images_per_s"] if k in data else None for k in runs}
    data["ratios"] = {
        "compress_vs_plain": ratio(rate["compress"], rate["plain"]),
        "plain_vs_loader": ratio(rate["plain"], rate["loader"]),
        "plain_vs_fp32": ratio(rate["plain"], rate["plain_fp32"]),
        "channels_last_weights_vs_plain": ratio(rate["plain_channels_last_weights"], rate["plain"]),
    }
    ddp_ok = data["ddp"] is None or (
        data["ddp"]["returncode"] == 0 and data["ddp"].get("exit_code") == 0
    )
    data["ok"] = data["compress"]["exit_code"] == 0 and ddp_ok
    write_json(out / "gpu_check.json", data)
    log(f"ratios: {data['ratios']}; ok: {data['ok']}; wrote {out / 'gpu_check.json'}")
    return 0 if data["ok"] else 1


def log(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
