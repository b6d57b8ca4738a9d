"""Latency against MACs: does removing channels buy the speed its MACs promise?

For each torchvision model (random weights, ``num_classes=10``) this script:

1. builds the coupled channel groups and zeroes 50% of every group's units
   (seeded), the way the RVSM prox leaves a model;
2. removes the zero units with ``prune_zero_channels`` at ``round_to=1`` and,
   each from a fresh copy, at ``round_to=8`` and ``16`` (each checked for
   output parity; 16 is onnxruntime's NCHWc block size on AVX-512 machines)
   where the rounding keeps some zero channels, and at ``auto``: zeroed from
   the start in onnxruntime's channel block on this machine, as the budget
   does with ``prune.round_to: auto`` (no kept zero channel);
3. exports the dense and the compact models to ONNX (checked against PyTorch
   in onnxruntime) and times them in onnxruntime CPU, dense and compact runs
   interleaved in one process (``measure_latency_stats``), so machine noise
   hits them alike.

It records MACs, params and ONNX bytes (dense, compact, reduction), latency
medians and p90 per batch size, the speedup (dense / compact median) and
``speedup / macs_reduction``: 1.0 means the compact model is as much faster
as it has fewer MACs. The goal is >= 0.8 at batch 16.

    .venv/bin/python benchmarks/latency.py                 # full run (minutes)
    .venv/bin/python benchmarks/latency.py --quick         # smoke run (seconds)
    .venv/bin/python benchmarks/latency.py --models resnet18 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torchvision  # noqa: E402

from benchmarks.common import command_line, load_average, machine_info, write_json  # noqa: E402
from compressor.export import (  # noqa: E402
    export_onnx,
    measure_latency_stats,
    onnx_size_bytes,
    op_profile,
    verify_or_raise,
)
from compressor.groups import build_groups  # noqa: E402
from compressor.metrics import count_macs, count_params  # noqa: E402
from compressor.prune import prune_zero_channels  # noqa: E402
from compressor.runtime import channel_block, kept_in_blocks, resolve_round_to  # noqa: E402

log = logging.getLogger("benchmarks.latency")

SCHEMA_VERSION = 1
DEFAULT_MODELS = ("resnet18", "mobilenet_v2", "vgg11_bn", "efficientnet_b0")
GOALS = {16: 0.9, 1: 0.8}  # batch -> least speedup / MACs reduction
GOAL_BATCH = 16


def zero_units_(model: torch.nn.Module, groups, fraction: float, seed: int, block: int = 1) -> int:
    """Zero ``floor(fraction * size)`` random units of every group, in place; returns how many.
    With ``block`` > 1, fewer where needed so that the kept units are a multiple of ``block``
    (what the budget does with ``prune.round_to``: no kept zero channel)."""
    gen = torch.Generator().manual_seed(seed)
    factors = []
    zeroed = 0
    for g, unit_block in zip(groups, groups.unit_blocks(block), strict=True):
        f = torch.ones(g.size)
        n = g.size - kept_in_blocks(g.size - int(fraction * g.size), g.size, unit_block)
        f[torch.randperm(g.size, generator=gen)[:n]] = 0
        zeroed += n
        factors.append(f)
    groups.scale_(dict(model.named_parameters()), factors)
    return zeroed


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def bench_model(
    name: str,
    *,
    resolution: int,
    round_tos: list[int],
    batch_sizes: list[int],
    fraction: float,
    seed: int,
    warmup: int,
    repeats: int,
    threads: int | None,
    exporters: tuple[str, ...],
    workdir: Path,
    profile_batch: int | None = None,
    profile_runs: int = 3,
) -> dict:
    """Every number of one model: dense, and one compact model per ``round_to``."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    shape = (3, resolution, resolution)
    x1 = torch.randn(1, *shape)
    samples = torch.randn(4, *shape)

    t0 = time.perf_counter()
    groups = build_groups(model, x1)
    build_s = time.perf_counter() - t0
    dense_macs, dense_params = count_macs(model, x1), count_params(model)
    dense_path = workdir / f"{name}_dense.onnx"
    exporter = export_onnx(model, x1, dense_path, exporters=exporters)
    verify_or_raise(model, dense_path, samples)

    sparse = copy.deepcopy(model)
    zeroed = zero_units_(sparse, groups, fraction, seed)
    est_macs, est_params = groups.estimate_cost(groups.zero_masks(dict(sparse.named_parameters())))

    compact: dict[str, dict] = {}
    paths = {"dense": dense_path}
    for r in round_tos:
        if r == "auto":  # zeroed in onnxruntime's channel blocks from the start, as the budget does
            pruned = copy.deepcopy(model)
            zero_units_(pruned, groups, fraction, seed, block=channel_block())
        else:
            pruned = copy.deepcopy(sparse)
        t0 = time.perf_counter()
        result = prune_zero_channels(pruned, groups, samples, round_to=resolve_round_to(r))
        prune_s = time.perf_counter() - t0
        path = workdir / f"{name}_compact_r{r}.onnx"
        compact_exporter = export_onnx(pruned, x1, path, exporters=exporters)
        parity = verify_or_raise(pruned, path, samples)
        macs, params = count_macs(pruned, x1), count_params(pruned)
        compact[str(r)] = {
            "round_to": r,
            "channels_removed": result.channels_removed,
            "prune_max_abs_diff": result.max_abs_diff,
            "exporter": compact_exporter,
            "onnx_relative_max_abs": parity["relative_max_abs"],
            "prune_seconds": round(prune_s, 2),
            "macs": macs,
            "params": params,
            "onnx_bytes": onnx_size_bytes(path),
            "macs_reduction": ratio(dense_macs, macs),
            "params_reduction": ratio(dense_params, params),
        }
        paths[f"r{r}"] = path
        del pruned

    latency: dict[str, dict[str, dict]] = {k: {} for k in paths}
    for b in batch_sizes:
        # One call per batch size: all models interleaved (A B C, C B A, ...).
        stats = measure_latency_stats(
            paths,
            shape,
            batch_sizes=(b,),
            warmup=warmup,
            repeats=repeats,
            threads=threads,
            seed=seed,
        )
        for k in paths:
            latency[k][str(b)] = {m: round(v, 4) for m, v in stats[k][b].items()}

    if profile_batch:
        for k, path in paths.items():
            prof = op_profile(
                path, shape, batch=profile_batch, runs=profile_runs, threads=threads, seed=seed
            )
            if k == "dense":
                dense_profile = prof
            else:
                compact[k[1:]]["op_profile_ms"] = prof

    dense_bytes = onnx_size_bytes(dense_path)
    for r in round_tos:
        c = compact[str(r)]
        c["bytes_reduction"] = ratio(dense_bytes, c["onnx_bytes"])
        c["latency_ms"] = latency[f"r{r}"]
        c["speedup"] = {
            b: ratio(latency["dense"][b]["median_ms"], latency[f"r{r}"][b]["median_ms"])
            for b in latency["dense"]
        }
        c["speedup_min"] = {
            b: ratio(latency["dense"][b]["min_ms"], latency[f"r{r}"][b]["min_ms"])
            for b in latency["dense"]
        }
        c["speedup_p90"] = {
            b: ratio(latency["dense"][b]["p90_ms"], latency[f"r{r}"][b]["p90_ms"])
            for b in latency["dense"]
        }
        c["speedup_over_macs_reduction"] = {
            b: s / c["macs_reduction"] for b, s in c["speedup"].items()
        }
    return {
        "model": name,
        "input_shape": list(shape),
        "zero_fraction": fraction,
        "groups": len(groups),
        "groups_excluded": len(groups.excluded),
        "units": groups.total_channels,
        "units_zeroed": zeroed,
        "build_groups_seconds": round(build_s, 2),
        "exporter": exporter,
        "dense": {
            "macs": dense_macs,
            "params": dense_params,
            "onnx_bytes": dense_bytes,
            "latency_ms": latency["dense"],
            **({"op_profile_ms": dense_profile} if profile_batch else {}),
        },
        "macs_estimate_round_to_1": {
            "macs": est_macs,
            "params": est_params,
            "macs_reduction": ratio(dense_macs, est_macs),
        },
        "compact": compact,
    }


def summarize(results: list[dict]) -> dict:
    """Whether ``speedup / macs_reduction`` meets ``GOALS`` (per batch size), per model and
    ``round_to``."""
    rows = []
    for res in results:
        for c in res["compact"].values():
            for batch, goal in GOALS.items():
                value = c["speedup_over_macs_reduction"].get(str(batch))
                if value is None:
                    continue
                rows.append(
                    {
                        "model": res["model"],
                        "round_to": c["round_to"],
                        "batch": batch,
                        "speedup_over_macs_reduction": value,
                        "goal": goal,
                        "met": bool(value >= goal),
                    }
                )
    checked = [row["met"] for row in rows]
    return {
        "goal": "speedup / macs_reduction >= "
        + ", ".join(f"{g} at batch {b}" for b, g in GOALS.items()),
        "rows": rows,
        "all_met": all(checked) if checked else None,
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_MODELS)}")
    p.add_argument("--resolution", type=int, default=None, help="input H=W (default 224)")
    p.add_argument(
        "--round-to",
        type=lambda v: v if v == "auto" else int(v),
        nargs="+",
        default=None,
        help="default: 1 8 16 auto (auto: zeroed in onnxruntime's channel block, as "
        "prune.round_to: auto makes the budget do)",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 16")
    p.add_argument("--fraction", type=float, default=0.5, help="share of each group's units zeroed")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per model and batch")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per model and batch")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="onnxruntime intra-op threads (default 1: stable ratios on a shared machine; "
        "0 = onnxruntime's default, one per physical core)",
    )
    p.add_argument(
        "--exporter",
        choices=("dynamo", "torchscript"),
        default=None,
        help="preferred ONNX exporter (the other is the fallback); default dynamo, "
        "torchscript with --quick (faster to export)",
    )
    p.add_argument(
        "--profile-batch",
        type=int,
        default=None,
        help="batch of the per-op onnxruntime profile (default 16; 0 = no profile; off with --quick)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="resnet18 at 64x64, round_to 1, batch 1 4")
    p.add_argument(
        "--keep-onnx", type=Path, default=None, help="keep the ONNX files in this folder"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default benchmarks/results/latency.json, latency_quick.json with --quick)",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.out is None:
        args.out = Path(f"benchmarks/results/latency{'_quick' if args.quick else ''}.json")
    quick = args.quick
    models = args.models or (["resnet18"] if quick else list(DEFAULT_MODELS))
    resolution = args.resolution or (64 if quick else 224)
    round_tos = args.round_to or ([1] if quick else [1, 8, 16, "auto"])
    batch_sizes = args.batch_sizes or ([1, 4] if quick else [1, GOAL_BATCH])
    warmup = args.warmup if args.warmup is not None else (2 if quick else 5)
    repeats = args.repeats if args.repeats is not None else (7 if quick else 30)
    exporter = args.exporter or ("torchscript" if quick else "dynamo")
    exporters = (exporter, "torchscript" if exporter == "dynamo" else "dynamo")
    threads = None if args.threads == 0 else args.threads
    if args.profile_batch is not None:
        profile_batch = args.profile_batch or None
    else:
        profile_batch = None if quick else GOAL_BATCH
    unknown = [m for m in models if not hasattr(torchvision.models, m)]
    if unknown:
        raise SystemExit(f"--models: unknown torchvision model(s) {unknown}")

    info = machine_info()
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        workdir = args.keep_onnx or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in models:
            t0 = time.perf_counter()
            log.info("%s: building, pruning, exporting, timing ...", name)
            res = bench_model(
                name,
                resolution=resolution,
                round_tos=round_tos,
                batch_sizes=batch_sizes,
                fraction=args.fraction,
                seed=args.seed,
                warmup=warmup,
                repeats=repeats,
                threads=threads,
                exporters=exporters,
                workdir=workdir,
                profile_batch=profile_batch,
            )
            res["seconds"] = round(time.perf_counter() - t0, 1)
            results.append(res)
            for r, c in res["compact"].items():
                log.info(
                    "%s round_to=%s: %.2fx fewer MACs; speedup %s",
                    name,
                    r,
                    c["macs_reduction"],
                    ", ".join(f"b{b} {s:.2f}x" for b, s in c["speedup"].items()),
                )
    info["load_average_at_end"] = load_average()
    out = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "latency_vs_macs",
        "command": command_line("benchmarks/latency.py", argv),
        "machine": info,
        "settings": {
            "quick": quick,
            "models": models,
            "input_shape": [3, resolution, resolution],
            "round_to": round_tos,
            "batch_sizes": batch_sizes,
            "zero_fraction": args.fraction,
            "warmup": warmup,
            "repeats": repeats,
            "onnxruntime_threads": threads if threads is not None else "default",
            "exporter_preference": list(exporters),
            "seed": args.seed,
            "op_profile_batch": profile_batch,
            "timing": "onnxruntime CPUExecutionProvider, sequential execution, all graph "
            "optimizations; dense and compact sessions created up front, runs interleaved "
            "in alternating order; medians and p90 over `repeats` runs",
        },
        "results": results,
        "summary": summarize(results),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(args.out, out)
    log.info("wrote %s", args.out)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    main()
