"""Shared helpers of the benchmark scripts: machine description, device and atomic JSON output."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from compressor.fileio import atomic_write_text

# The accuracy benchmarks keep single channels (the default, named so that a recipe or a
# future default cannot change them): their results were measured so, and every CPU runs
# the same (prune.round_to auto rounds kept channels to onnxruntime's block of this CPU:
# 8 with AVX2, 16 with AVX-512).
EXACT_CHANNELS = "prune.round_to=1"

# The per-group floor the equal-MACs, ablation and allocation rows were measured with before
# ``target.balance: auto`` (1 under a target) became the default; a candidate that names its
# own floor overrides it (later overrides win).
MEASURED_FLOOR = "target.balance=0.75"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The vector extensions the kernels can use (AVX2, AVX-512 ...), from /proc/cpuinfo."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "fma")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def resolve_device(name: str):
    """``--device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available) as a torch.device."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu, cuda, cuda:N or auto, not {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def device_info(device) -> dict:
    """The device a benchmark ran on; for CUDA also the card's name and memory and CUDA's version."""
    import torch

    device = torch.device(device)
    info = {"device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            {
                "gpu": torch.cuda.get_device_name(device),
                "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
            }
        )
    return info


def synchronize(device) -> None:
    """Wait for the queued kernels of ``device`` (CUDA); a no-op on the CPU. Call it around timings."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device=None) -> dict:
    """Where and with what a benchmark ran (stored next to its numbers); ``device``: see :func:`device_info`."""
    import numpy
    import onnxruntime
    import torch
    import torchvision

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average_at_start": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torchvision": torchvision.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device is not None:
        info.update(device_info(device))
    return info


def command_line(script: str, argv: list[str] | None) -> str:
    """The shell command that reproduces this run: ``script`` with ``argv`` (or ``sys.argv[1:]``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", script, *args])


def start_benchmark(threads: int | None) -> None:
    """What every benchmark does first: log progress to stderr, and use ``threads`` torch
    threads (``--threads``; None keeps torch's default)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if threads:
        import torch

        torch.set_num_threads(threads)


def load_results(path: Path, benchmark: str, argv: list[str] | None, **fields) -> dict:
    """The results JSON at ``path`` to append to, or a new one: the benchmark's name, the
    command that reproduces it (``benchmarks/<benchmark>.py`` with ``argv``), this machine,
    ``fields`` and no runs yet."""
    if path.exists():
        return json.loads(path.read_text())
    return {
        "benchmark": benchmark,
        "command": command_line(f"benchmarks/{benchmark}.py", argv),
        "machine": machine_info(),
        **fields,
        "runs": [],
    }


def record_command(data: dict, benchmark: str, argv: list[str] | None) -> None:
    """Add this run's command to ``data["commands"]``, the commands whose rows the results
    file holds (the first one is ``data["command"]``)."""
    commands = data.setdefault("commands", [data["command"]])
    this = command_line(f"benchmarks/{benchmark}.py", argv)
    if this not in commands:
        commands.append(this)


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def timed_ms(fn, reps: int, warmup: int = 1, sync=None) -> list[float]:
    """Milliseconds of ``reps`` calls of ``fn`` after ``warmup`` untimed ones.

    ``sync`` (CUDA: ``torch.cuda.synchronize``) waits for queued kernels before
    each timer reading.
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        ms.append((time.perf_counter() - start) * 1e3)
    return ms
