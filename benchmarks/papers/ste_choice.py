"""Which straight-through estimator trains activation-quantised nets best (Yin et al., ICLR 2019).

Yin, Lyu, Zhang, Osher, Qi, Xin, "Understanding straight-through estimator in
training activation quantized neural nets", ICLR 2019, Table 1: the clipped
ReLU STE trained best and the identity STE worst. This script repeats the
comparison on Fashion-MNIST with the project's activations:

- models: ``compressor.models.lenet5(in_channels=1)`` and
  ``compressor.models.resnet20(in_channels=1, width=8)``;
- activations: binary (``bits=1``, ``1{x > 0}``) and 2-bit (learned step ``alpha``),
  swapped in by ``compressor.activations.swap_activations``; the **first
  activation stays real-valued** (ReLU) unless ``--quantize-first``;
- STEs: ``clipped_relu``, ``relu``, ``identity``; plus the full-precision ReLU
  model as a reference;
- the same budget for every run: ``--epochs`` passes over a seeded
  ``--train-size`` subset, Adam, the same lr, batch and data order, the same
  initial weights (built from ``--seed`` before the swap);
- reported: test accuracy on the full 10k test set, the training loss (mean
  over the last epoch and over the last 50 steps), and whether a run diverged.

Outputs ``benchmarks/papers/results/ste_choice.json``; see RESULTS.md.

    .venv/bin/python benchmarks/papers/ste_choice.py           # full run (CPU: about an hour)
    .venv/bin/python benchmarks/papers/ste_choice.py --quick   # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `compressor` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import command_line, load_average, machine_info, write_json  # noqa: E402
from compressor.activations import STE_CHOICES, swap_activations  # noqa: E402
from compressor.data import load_data  # noqa: E402
from compressor.models import lenet5, resnet20  # noqa: E402

log = logging.getLogger("benchmarks.papers.ste_choice")

SCHEMA_VERSION = 1
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
MEAN, STD = (0.2860,), (0.3530,)
MODELS = {
    "lenet5": lambda: lenet5(num_classes=10, in_channels=1),
    "resnet20_w8": lambda: resnet20(num_classes=10, in_channels=1, width=8),
}
# The first activation of each model (kept real-valued unless --quantize-first):
# LeNet-5 calls F.relu, which swap_activations names act_fx_<i> after tracing.
FIRST_ACTIVATION = {"lenet5": "act_fx_0", "resnet20_w8": "relu"}


def load_arrays(path: Path, train_size: int, seed: int, test_size: int | None = None):
    """Normalised float tensors: a seeded ``train_size`` subset of train, and the test split."""
    splits = load_data(path, mean=MEAN, std=STD)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(splits.train), generator=gen)[:train_size]
    x_train, y_train = splits.train[idx]
    test_idx = torch.arange(len(splits.val))[:test_size]
    x_test, y_test = splits.val[test_idx]
    return (x_train, y_train), (x_test, y_test)


def build(model_name: str, bits: int | None, ste: str | None, seed: int, quantize_first: bool):
    """The model with the same initial weights for every STE; ``bits=None`` = full precision."""
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    if bits is None:
        return model, None
    skip = [] if quantize_first else [FIRST_ACTIVATION[model_name]]
    report = swap_activations(model, bits=bits, ste=ste, skip=skip)
    if report.unmatched_skip:
        raise RuntimeError(f"skip pattern matched nothing: {report.unmatched_skip}")
    return report.model, report.to_dict()


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000):
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, x.shape[0], batch):
        out = model(x[i : i + batch])
        loss += float(F.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch]).sum())
    return correct / x.shape[0], loss / x.shape[0]


def train_one(
    model: torch.nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    schedule: str = "constant",
) -> dict:
    """Adam on cross-entropy; the data order depends on ``seed`` only (same for every run).
    ``schedule``: ``constant`` lr, or ``cosine`` (decayed to 0 over every step of the run,
    one step per batch)."""
    x, y = train
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = epochs * (x.shape[0] // batch)
    decay = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        if schedule == "cosine"
        else None
    )
    gen = torch.Generator().manual_seed(seed + 1)
    losses, epoch_means = [], []
    diverged = False
    for _ in range(epochs):
        model.train()
        order = torch.randperm(x.shape[0], generator=gen)
        epoch_losses = []
        for i in range(0, x.shape[0] - batch + 1, batch):  # full batches only
            idx = order[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if not torch.isfinite(loss):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if decay is not None:
                decay.step()
            epoch_losses.append(loss.item())
        losses.extend(epoch_losses)
        epoch_means.append(sum(epoch_losses) / max(1, len(epoch_losses)))
        if diverged:
            break
    tail = losses[-50:]
    return {
        "steps": len(losses),
        "train_loss_last_epoch": round(epoch_means[-1], 5) if epoch_means else None,
        "train_loss_last_50_steps": round(sum(tail) / len(tail), 5) if tail else None,
        "train_loss_per_epoch": [round(v, 5) for v in epoch_means],
        "train_loss_curve": [round(v, 4) for v in _every(losses, 25)],
        "diverged": diverged,
    }


def _every(values: list[float], n: int) -> list[float]:
    """Means of consecutive chunks of ``n`` values."""
    return [sum(values[i : i + n]) / len(values[i : i + n]) for i in range(0, len(values), n)]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Fashion-MNIST idx folder")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    p.add_argument("--bits", type=int, nargs="+", default=None, help="default: 1 2")
    p.add_argument("--stes", nargs="+", choices=STE_CHOICES, default=None)
    p.add_argument("--no-baseline", action="store_true", help="skip the full-precision runs")
    p.add_argument("--train-size", type=int, default=None, help="default 20000")
    p.add_argument("--test-size", type=int, default=None, help="default: all 10000")
    p.add_argument("--epochs", type=int, default=None, help="default 2")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (every run)")
    p.add_argument(
        "--schedule", choices=("constant", "cosine"), default="constant",
        help="learning rate over the run: constant, or cosine decay to 0 (every run)",
    )  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--quantize-first", action="store_true", help="also quantise the first activation"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: shared machine)"
    )
    p.add_argument("--quick", action="store_true", help="tiny subset, 1 epoch, LeNet only")
    p.add_argument("--out", type=Path, default=Path("benchmarks/papers/results/ste_choice.json"))
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    models = args.models or (["lenet5"] if quick else list(MODELS))
    bits_list = args.bits or [1, 2]
    stes = args.stes or list(STE_CHOICES)
    train_size = args.train_size or (512 if quick else 20000)
    test_size = args.test_size or (1000 if quick else None)
    epochs = args.epochs or (1 if quick else 2)

    info = machine_info()
    started = time.perf_counter()
    data_seed = 12345  # the subset is fixed; --seeds vary the initial weights and data order
    train, test = load_arrays(args.data, train_size, data_seed, test_size)
    log.info("data: %d train, %d test", train[0].shape[0], test[0].shape[0])

    config = {
        "quick": quick,
        "data": str(args.data),
        "normalisation": {"mean": MEAN, "std": STD},
        "train_size": train[0].shape[0],
        "train_subset_seed": data_seed,
        "test_size": test[0].shape[0],
        "epochs": epochs,
        "batch": args.batch,
        "optimizer": f"Adam(lr={args.lr}), {args.schedule} lr, no weight decay",
        "models": models,
        "bits": bits_list,
        "stes": stes,
        "seeds": args.seeds,
        "first_activation": "quantised" if args.quantize_first else "kept real-valued (ReLU)",
        "quantized_alpha_init": 1.0,
        "threads": args.threads,
    }
    configs = [(None, None)] if not args.no_baseline else []
    configs += [(b, s) for b in bits_list for s in stes]
    runs = []
    for model_name in models:
        for seed in args.seeds:
            for bits, ste in configs:
                t0 = time.perf_counter()
                model, swap = build(model_name, bits, ste, seed, args.quantize_first)
                res = train_one(
                    model, train, epochs=epochs, batch=args.batch, lr=args.lr, seed=seed,
                    schedule=args.schedule,
                )  # fmt: skip
                acc, test_loss = evaluate(model, *test)
                alphas = {
                    n: round(p.item(), 4)
                    for n, p in model.named_parameters()
                    if n.endswith("alpha")
                }
                row = {
                    "model": model_name,
                    "bits": bits,
                    "activation": "full precision ReLU"
                    if bits is None
                    else swap["activation"]["type"],
                    "ste": ste,
                    "seed": seed,
                    "test_accuracy": round(acc, 4),
                    "test_loss": round(test_loss, 4) if math.isfinite(test_loss) else None,
                    **res,
                    "swapped": None if swap is None else swap["swapped"],
                    "kept_real_valued": None if swap is None else swap["skipped"],
                    "learned_alpha": alphas or None,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                runs.append(row)
                log.info(
                    "%s bits=%s ste=%s seed=%d: test acc %.4f, train loss (last epoch) %s, %.0fs",
                    model_name,
                    bits,
                    ste,
                    seed,
                    acc,
                    row["train_loss_last_epoch"],
                    row["seconds"],
                )
                write_json(args.out, _output(config, argv, info, runs, started))
    out = _output(config, argv, info, runs, started)
    out["complete"] = True
    write_json(args.out, out)
    log.info("wrote %s", args.out)
    return out


def _output(config: dict, argv, info: dict, runs: list, started: float) -> dict:
    """The JSON document (written after every run, so a long job can be read while it runs)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "ste_choice",
        "command": command_line("benchmarks/papers/ste_choice.py", argv),
        "machine": dict(info, load_average_now=load_average()),
        "config": config,
        "runs": runs,
        "complete": False,
        "seconds": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    main()
