"""Train the "pretrained" ResNet-20 on Fashion-MNIST that the trade-off benchmark compresses.

CIFAR-style ResNet-20 (``compressor.models.resnet20``, 1 input channel), SGD with
Nesterov momentum 0.9, one-cycle learning rate peaking at ``--lr`` (0.1), weight
decay 5e-4, batch 128, random crop (pad 2) and horizontal flip, a fixed seed.
Pixels are scaled to [0, 1] and not normalised further (what ``compress`` does
with no ``--mean/--std``).

The state_dict is cached in ``benchmarks/.cache/resnet20_fmnist_e{E}_s{S}.pt``
(``..._n{N}.pt`` when trained on an N-image subset), with its test accuracy in a
``.json`` next to it; a cached baseline is not trained again. Training is
resumable: a checkpoint (model, optimizer, scheduler, epoch) is written after
every epoch and picked up by the next run with the same arguments.

``--device cuda`` trains and evaluates on the GPU (the images stay on the CPU,
where the seeded crops and flips are drawn, and each batch is copied over); the
cache file is the same whatever the device, and its ``.json`` records the device.

    .venv/bin/python benchmarks/train_baseline.py --epochs 8          # the trade-off baseline
    .venv/bin/python benchmarks/train_baseline.py --epochs 1 --subset 10000   # quick one
    .venv/bin/python benchmarks/train_baseline.py --epochs 15 --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import device_info, resolve_device  # noqa: E402
from compressor.data import load_data  # noqa: E402
from compressor.fileio import atomic_output, atomic_write_text  # noqa: E402
from compressor.models import resnet20  # noqa: E402

log = logging.getLogger("benchmarks.train_baseline")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = next(
    (
        p
        for p in (
            Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist",
            Path(__file__).resolve().parents[3] / "shared" / "data" / "fashion-mnist",
        )
        if p.is_dir()
    ),
    Path("/work/shared/data/fashion-mnist"),
)
DEFAULT_CACHE = ROOT / "benchmarks" / ".cache"


def cache_path(
    cache_dir: str | Path, epochs: int, seed: int, subset: int | None = None, holdout: int = 0
) -> Path:
    """Where the baseline state_dict of these settings lives."""
    suffix = (f"_n{subset}" if subset else "") + (f"_h{holdout}" if holdout else "")
    return Path(cache_dir) / f"resnet20_fmnist_e{epochs}_s{seed}{suffix}.pt"


def validation_split(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (validation, rest) of ``n`` training images: the validation split the
    benchmarks carve (``size`` images, seeded) and what is left to train on."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:size], order[size:]


def load_fmnist(
    data_dir: str | Path,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(x_train, y_train), (x_test, y_test): uint8 (N, 1, 28, 28) images and int64 labels."""
    splits = load_data(data_dir)
    return (splits.train.x, splits.train.y), (splits.val.x, splits.val.y)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of a float batch (N, C, H, W)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (
        (dy.view(n, 1) + torch.arange(h).view(1, h))
        .view(n, 1, h, 1)
        .expand(n, x.shape[1], h, w + 2 * pad)
    )
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500
) -> float:
    """Top-1 accuracy (percent) of ``model`` on uint8 images ``x`` (batches go to the model's device)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device, non_blocking=True)
        out = model(xb.float() / 255.0)
        correct += int((out.argmax(1) == y[i : i + batch_size].to(device)).sum())
    return 100.0 * correct / max(len(x), 1)


def train_baseline(
    *,
    data_dir: str | Path = DEFAULT_DATA,
    epochs: int = 15,
    seed: int = 0,
    subset: int | None = None,
    holdout: int = 0,
    cache_dir: str | Path = DEFAULT_CACHE,
    lr: float = 0.1,
    batch_size: int = 128,
    weight_decay: float = 5e-4,
    log_every: int = 100,
    test_subset: int | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Train (or resume, or find cached) the baseline; returns ``{"path", "accuracy", ...}``.

    While another live process trains the same baseline (its pid in the ``.lock``
    file next to the cache), this waits for it instead of training a second copy.
    """
    path = cache_path(cache_dir, epochs, seed, subset, holdout)
    info_path = path.with_suffix(".json")
    lock = path.with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        if path.exists() and info_path.exists():
            info = json.loads(info_path.read_text())
            log.info("baseline cached: %s (test accuracy %.2f%%)", path, info["accuracy"])
            return {**info, "path": str(path), "cached": True}
        owner = _lock_owner(lock)
        if owner is None:
            break
        if not waited:
            log.info("waiting for pid %d, which is training %s", owner, path)
            waited = True
        time.sleep(30)
    atomic_write_text(lock, f"{os.getpid()}\n")
    try:
        return _train_and_save(
            path,
            info_path,
            data_dir=data_dir,
            epochs=epochs,
            seed=seed,
            subset=subset,
            holdout=holdout,
            lr=lr,
            batch_size=batch_size,
            weight_decay=weight_decay,
            log_every=log_every,
            test_subset=test_subset,
            device=torch.device(device),
        )
    finally:
        if _lock_owner(lock) == os.getpid():
            lock.unlink(missing_ok=True)


def _lock_owner(lock: Path) -> int | None:
    """The pid in ``lock`` if that process is alive (this one included), else None."""
    try:
        pid = int(lock.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def _train_and_save(
    path,
    info_path,
    *,
    data_dir,
    epochs,
    seed,
    subset,
    holdout,
    lr,
    batch_size,
    weight_decay,
    log_every,
    test_subset,
    device,
):
    (x_train, y_train), (x_test, y_test) = load_fmnist(data_dir)
    if test_subset:  # smoke runs: test on the first images only
        x_test, y_test = x_test[:test_subset], y_test[:test_subset]
    if holdout:
        _, rest = validation_split(len(x_train), holdout)
        x_train, y_train = x_train[rest.sort().values], y_train[rest.sort().values]
    if subset:
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:subset]
        x_train, y_train = x_train[order], y_train[order]

    torch.manual_seed(seed)
    model = resnet20(num_classes=10, in_channels=1).to(device)
    if path.exists():  # a finished state_dict without its .json: only evaluate it
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        trained_epochs, seconds = epochs, None
    else:
        trained_epochs, seconds = _train(
            model,
            x_train,
            y_train,
            x_test,
            y_test,
            path=path,
            epochs=epochs,
            seed=seed,
            lr=lr,
            batch_size=batch_size,
            weight_decay=weight_decay,
            log_every=log_every,
        )
    accuracy = evaluate(model, x_test, y_test)
    info = {
        "accuracy": accuracy,
        "epochs": trained_epochs,
        "seed": seed,
        "train_images": len(x_train),
        "held_out_images": holdout,
        "test_images": len(x_test),
        "lr": lr,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "optimizer": "sgd nesterov momentum 0.9, one-cycle lr",
        "augmentation": "random crop (pad 2), horizontal flip",
        "train_seconds": seconds,
        **device_info(device),
    }
    atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
    log.info("baseline: %s, test accuracy %.2f%%", path, accuracy)
    return {**info, "path": str(path), "cached": False}


def _train(
    model,
    x_train,
    y_train,
    x_test,
    y_test,
    *,
    path,
    epochs,
    seed,
    lr,
    batch_size,
    weight_decay,
    log_every,
):
    device = next(model.parameters()).device
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch), pct_start=0.15
    )
    resume_path = path.with_name(path.stem + ".resume.pt")
    start_epoch, seconds = 0, 0.0
    if resume_path.exists():
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, seconds = int(state["epoch"]), float(state["seconds"])
        log.info("resumed %s after epoch %d", resume_path, start_epoch)
    for epoch in range(start_epoch, epochs):
        start = time.perf_counter()
        # seeded per epoch: the same order and crops whether the run was resumed or not
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(x_train), generator=generator)
        model.train()
        loss_sum, seen = 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on one sample
                continue
            x = augment(x_train[idx].float() / 255.0, generator).to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y_train[idx].to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
            if log_every and (step + 1) % log_every == 0:
                rate = seen / (time.perf_counter() - start)
                log.info(
                    "epoch %d/%d step %d/%d loss %.4f (%.0f img/s)",
                    epoch + 1,
                    epochs,
                    step + 1,
                    steps_per_epoch,
                    loss_sum / seen,
                    rate,
                )
        seconds += time.perf_counter() - start
        accuracy = evaluate(model, x_test, y_test)
        log.info(
            "epoch %d/%d: loss %.4f, test accuracy %.2f%% (%.0f s so far)",
            epoch + 1,
            epochs,
            loss_sum / max(seen, 1),
            accuracy,
            seconds,
        )
        state = {
            "epoch": epoch + 1,
            "seconds": seconds,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        with atomic_output(resume_path) as tmp:
            torch.save(state, tmp)
    with atomic_output(path) as tmp:  # CPU tensors: loadable without a GPU
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    resume_path.unlink(missing_ok=True)
    return epochs, seconds


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Fashion-MNIST idx directory")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--subset", type=int, default=None, help="train on this many images (default: all 60k)"
    )
    p.add_argument(
        "--holdout", type=int, default=0, help="never train on the benchmarks' validation split"
    )
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument(
        "--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule"
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument(
        "--test-subset", type=int, default=None, help="test on the first N images (smoke)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda when available)"
    )
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    info = train_baseline(
        data_dir=args.data,
        epochs=args.epochs,
        seed=args.seed,
        subset=args.subset,
        holdout=args.holdout,
        cache_dir=args.cache_dir,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        test_subset=args.test_subset,
        device=resolve_device(args.device),
    )
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
