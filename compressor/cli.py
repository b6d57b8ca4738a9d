"""``compress``: the command line. Parses arguments, calls ``pipeline.compress``, maps outcomes to exit codes.

Exit codes (public API, never renumbered): 0 success; 1 anything else; 2 bad
input or usage; 3 a gate failed (outputs still written); 4 verification failed.
"""

from __future__ import annotations

import argparse
import logging
import sys

from compressor.errors import EXIT_BAD_INPUT, EXIT_OTHER, CompressorError
from compressor.progress import Progress

EPILOG = """\
exit codes:
  0  success
  1  anything else (a bug, an interrupted or diverged run: rerun with --resume)
  2  bad input or usage (the message says what and how to fix it)
  3  a gate failed (accuracy drop or target); outputs are still written
  4  verification failed (the pruned or ONNX model disagrees with the sparse model)

examples:
  compress model.pt --arch resnet18 --recipe tl1-group --data DATA --out compressed/
  compress model.pt --arch resnet20 --data data.npz --target-macs 4 --max-accuracy-drop 1
  compress --list-recipes
"""


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers like 0.5,0.5,0.5, got {text!r}"
        ) from exc


def _workers(text: str) -> str:
    """``--workers``: ``auto`` or an int >= 0, kept as text for ``--set data.workers=...``."""
    value = text.strip().lower()
    if value == "auto" or (value.isdigit() and value.isascii()):
        return value if value == "auto" else str(int(value))
    raise argparse.ArgumentTypeError(
        f"must be 'auto' or a number of worker processes >= 0 (the recipe's data.workers). "
        f"Got {text!r} instead; pass 0 to load data in the training process."
    )


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compress",
        description="Compress a trained PyTorch CNN: RVSM sparse group lasso fine-tuning, exact channel "
        "removal, and a compact ONNX model verified in onnxruntime, with a report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint",
        nargs="?",
        help="state_dict .pt/.pth, .safetensors, or compressor's model.safetensors",
    )
    p.add_argument(
        "--recipe",
        default="tl1-group",
        help="built-in recipe name or a YAML path (default: tl1-group)",
    )
    p.add_argument(
        "--data",
        help="ImageFolder dir (train/, val/), .npz, MNIST idx dir, or CIFAR-10 batches dir",
    )
    p.add_argument(
        "--arch",
        help="torchvision model name, resnet20/lenet5, timm:NAME (a timm model; pip install "
        '"compressor[timm]"), or pkg.module:callable (also the '
        "consent to import the pkg.module:callable a compact model.safetensors names)",
    )
    p.add_argument(
        "--task",
        default="classification",
        metavar="NAME|pkg.module:Class",
        help="what the model does: its loss, metric and data (default: classification, "
        "cross-entropy and top-1 accuracy; detection: torchvision detectors, COCO-format "
        "data, COCO mAP), or your own compressor.tasks.Task subclass "
        "imported from the current folder (see examples/task_plugin)",
    )
    p.add_argument(
        "--num-classes",
        type=int,
        help="classifier outputs (default: read from the checkpoint; --task detection: "
        "the detector's classes, background included, required)",
    )
    p.add_argument("--input-shape", help="C,H,W of one input (default: from the data)")
    p.add_argument(
        "--mean", type=_floats, help="normalisation mean per channel, e.g. 0.485,0.456,0.406"
    )
    p.add_argument("--std", type=_floats, help="normalisation std per channel")
    p.add_argument("--out", default="compressed", help="output directory (default: ./compressed)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set train.epochs=3 (repeatable)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument(
        "--workers",
        type=_workers,
        metavar="N|auto",
        help="data-loader worker processes (sets data.workers; default auto: for an ImageFolder, "
        "decoded image by image, the usable CPUs minus one, at most 8; 0 for .npz, idx and "
        "CIFAR data, held in memory, where workers only add copies; 0 loads in the training "
        "process)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="POINTS",
        help="gate: fail (exit 3) if accuracy falls by more than POINTS percentage points "
        "(default 5, or the recipe's gates.max_accuracy_drop); without a target, also seek "
        "the largest MACs reduction within POINTS",
    )
    p.add_argument("--target-macs", metavar="X", help="reach X times fewer MACs (e.g. 4 or 4x)")
    p.add_argument("--target-params", metavar="X", help="reach X times fewer parameters")
    p.add_argument(
        "--target-size", type=int, metavar="BYTES", help="reach an ONNX file of at most BYTES"
    )
    p.add_argument(
        "--target-latency",
        type=float,
        metavar="MS",
        help="reach an onnxruntime latency of at most MS milliseconds on this machine "
        "(sets target.latency)",
    )
    p.add_argument(
        "--latency-batch",
        type=int,
        metavar="N",
        help="batch size of --target-latency (default 1; sets target.latency_batch)",
    )
    p.add_argument(
        "--int8",
        nargs="?",
        const="static",
        choices=("static", "dynamic", "off"),
        metavar="static|dynamic",
        help="also ship model.int8.onnx, quantized in onnxruntime (alone: static, calibrated "
        "on training images) when it passes the accuracy gate (sets export.int8)",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="run code the checkpoint names, for files you trust: unpickle a pickled "
        "nn.Module, or import the pkg.module:callable a compact model.safetensors names",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--list-recipes", action="store_true", help="list the built-in recipes and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    return p


def _setup_logging(quiet: bool) -> Progress:
    """Send logs to stderr and choose the progress display; returns the display.

    ``--quiet``: errors only, no progress. A terminal: rich log lines above a
    live progress bar per stage (one console for both, so they do not tangle).
    Otherwise (CI): timestamped plain lines, progress at most every ~30 s.
    Ranks other than 0 of a DDP run show no progress.
    """
    level = logging.ERROR if quiet else logging.INFO  # --quiet: "only errors on stderr"
    tty = sys.stderr.isatty()
    console = None
    if tty:
        from rich.console import Console
        from rich.logging import RichHandler

        console = Console(stderr=True)
        handler: logging.Handler = RichHandler(
            console=console, show_path=False, log_time_format="%H:%M:%S"
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("compressor")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return Progress.for_cli(quiet=quiet, tty=tty, console=console)


def _end_process_group() -> None:
    """Under torchrun: tear the process group down before the process exits (the command owns
    the process). A gloo group left to the interpreter's exit can abort a rank while its
    threads are destroyed ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    progress = _setup_logging(args.quiet)
    if args.list_recipes:
        from compressor.recipe import list_recipes

        for name, description in list_recipes():
            print(f"{name:20s} {description}")
        return 0
    if not args.checkpoint:
        parser.print_usage(sys.stderr)
        print("compress: error: CHECKPOINT is required (or --list-recipes)", file=sys.stderr)
        return EXIT_BAD_INPUT
    from compressor.pipeline import compress

    try:
        report = compress(
            args.checkpoint,
            recipe=args.recipe,
            data=args.data,
            arch=args.arch,
            num_classes=args.num_classes,
            input_shape=args.input_shape,
            mean=args.mean,
            std=args.std,
            out=args.out,
            overrides=[
                *args.overrides,
                *([f"export.int8={args.int8}"] if args.int8 else []),
                *([f"data.workers={args.workers}"] if args.workers is not None else []),
            ],
            device=args.device,
            seed=args.seed,
            max_accuracy_drop=args.max_accuracy_drop,
            target_macs=args.target_macs,
            target_params=args.target_params,
            target_size=args.target_size,
            target_latency=args.target_latency,
            latency_batch=args.latency_batch,
            trust_checkpoint=args.trust_checkpoint,
            resume=args.resume,
            command=["compress", *(argv if argv is not None else sys.argv[1:])],
            progress=progress,
            task=args.task,
        )
    except CompressorError as exc:
        print(f"compress: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # exit codes are 0-4 only (README); 1 covers an interrupted run
        print(
            f"compress: interrupted; rerun the same command with --resume to continue from the last "
            f"completed epoch in {args.out}",
            file=sys.stderr,
        )
        return EXIT_OTHER
    except Exception as exc:  # a bug: keep the traceback for the report
        logging.getLogger("compressor").exception("unexpected error")
        print(f"compress: internal error: {exc}", file=sys.stderr)
        return EXIT_OTHER
    finally:
        progress.close()  # a bar left showing by an error
        _end_process_group()
    code = int(report.get("exit_code", 0))
    r = report.get("reduction") or {}
    if not args.quiet and r.get("macs_x") is not None:
        acc_b, acc_c = report["baseline"]["accuracy"], report["compressed"]["accuracy"]
        metric = (report.get("metric") or {}).get("name", "accuracy")
        fmt, unit = (".2f", "%") if metric == "accuracy" else (".4g", "")
        acc = (
            f"{metric} not measured"
            if acc_b is None
            else f"{metric} {acc_b:{fmt}}{unit} -> {acc_c:{fmt}}{unit}"
        )
        print(
            f"compress: {r['macs_x']:.2f}x fewer MACs, {r['params_x']:.2f}x fewer params, {acc}; "
            f"exit {code}; outputs in {args.out}",
            file=sys.stderr,
        )
    if report.get("error"):  # verification failed: no model was written; say why (also with -q)
        print(
            f"compress: error: {report['error']} (exit {code}; report in {args.out})",
            file=sys.stderr,
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
