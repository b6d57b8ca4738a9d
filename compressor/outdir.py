"""The ``--out`` directory: made ready, the previous run's outputs moved aside, put back.

Every run leaves ``--out`` describing itself: before writing anything it moves
the previous run's outputs (only the files a run writes) into ``--out/previous/``,
and bad input found late puts ``--out`` back as it was. The resume state of an
interrupted run lives in ``--out/.compressor-state/`` and never moves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from compressor import report as report_mod
from compressor.errors import BadInputError, OutputError

log = logging.getLogger(__name__)

STATE_DIR = ".compressor-state"
OUTPUT_FILES = ("model.onnx", "model.safetensors", "report.json", "report.md", "recipe.yaml")
INT8_FILE = "model.int8.onnx"  # only with export.int8, and only when it passes its gate
# The model files: a failed run (exit 1, 4) leaves none of them.
MODEL_FILES = ("model.onnx", "model.safetensors", INT8_FILE)
# Every file a run may write into --out (INT8 model and plots too); a new run moves them into
# ``--out/previous/`` before it writes anything, so --out only ever describes one run.
KNOWN_OUTPUTS = (*OUTPUT_FILES, INT8_FILE, report_mod.CHANNELS_PNG, report_mod.TRAINING_PNG)
PREVIOUS_DIR = "previous"


def prepare_out(out: Path, checkpoint: Path) -> Path | None:
    """Create ``out`` if needed and check it can be written; returns the topmost folder it
    created (None when ``out`` existed), so that a failed run can remove it again."""
    src = checkpoint.resolve()
    for name in KNOWN_OUTPUTS:
        for path in (out / name, out / PREVIOUS_DIR / name):
            if path.resolve() == src:
                raise OutputError(
                    f"The checkpoint {checkpoint} would be overwritten by the output {path} "
                    f"(a run moves the previous run's outputs into {out / PREVIOUS_DIR}). "
                    "Pass a different --out, or copy the checkpoint elsewhere first."
                )
    previous = out / PREVIOUS_DIR
    if previous.exists() and not previous.is_dir():
        raise OutputError(
            f"{previous} is a file, but a run moves the previous run's outputs into that "
            "folder. Move that file away or pass a different --out."
        )
    created = None
    top = out.absolute()
    while not top.exists() and top.parent != top:
        created, top = top, top.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        remove_if_empty(created)
        raise OutputError(
            f"Cannot write to the output directory {out}: {exc.strerror or exc}. "
            "Pass --out with a writable directory."
        ) from exc
    return created


def move_previous_outputs(out: Path) -> list[str]:
    """Move the outputs of an earlier run in ``out`` into ``out/previous/``; returns their names.

    Only the files a run writes (``KNOWN_OUTPUTS``) move; the user's other files stay
    where they are. The copies of the run before that in ``previous/`` are replaced (all of
    them, so ``previous/`` describes exactly one run); anything else there is left alone.
    The resume state (``STATE_DIR``) is not an output and never moves.
    """
    found = [name for name in KNOWN_OUTPUTS if (out / name).is_file()]
    if not found:
        return []
    previous = out / PREVIOUS_DIR
    try:
        previous.mkdir(exist_ok=True)
        for name in KNOWN_OUTPUTS:
            if (previous / name).is_file():
                (previous / name).unlink()
        for name in found:
            os.replace(out / name, previous / name)
    except OSError as exc:
        raise OutputError(
            f"Cannot move the previous run's outputs in {out} into {previous}: "
            f"{exc.strerror or exc}. Check the folder's permissions, or pass another --out."
        ) from exc
    log.info("moved the previous run's outputs (%s) into %s", ", ".join(found), previous)
    return found


def restore_out(
    out: Path, *, moved: list[str], had_state: bool, had_previous: bool, created: Path | None
) -> None:
    """Put --out back as it was before this run (bad input leaves --out as it was): this
    run's outputs and resume state go, the previous run's outputs (``moved``) come back."""
    try:
        for name in KNOWN_OUTPUTS:
            (out / name).unlink(missing_ok=True)  # written by this run: the old ones moved
        for name in moved:
            os.replace(out / PREVIOUS_DIR / name, out / name)
        if not had_state:
            shutil.rmtree(out / STATE_DIR, ignore_errors=True)
        previous = out / PREVIOUS_DIR
        if not had_previous and previous.is_dir() and not any(previous.iterdir()):
            previous.rmdir()
        remove_if_empty(created)
    except OSError:
        log.warning("could not put %s back as it was", out, exc_info=True)


def remove_if_empty(created: Path | None) -> None:
    """Remove a folder this run created when nothing was written into it."""
    if created is None or not created.is_dir():
        return
    if any(not p.is_dir() for p in created.rglob("*")):
        return
    shutil.rmtree(created, ignore_errors=True)


def read_resume_state(state_path: Path, fingerprint: str, out: Path) -> dict:
    """The saved state of an interrupted run in ``out``, checked to belong to this run.

    Read on the CPU (the RNG state must be a CPU tensor; masks are used on the CPU).
    """
    if not state_path.exists():
        raise BadInputError(
            f"--resume: no interrupted run in {out} (no {state_path}). Run without --resume."
        )
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BadInputError(
            f"--resume: cannot read {state_path} ({type(exc).__name__}: {exc}). "
            "Run without --resume to start over."
        ) from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise BadInputError(
            f"--resume: the run in {out} used another checkpoint, recipe, data, seed or task. "
            "Resume with the same arguments, or run without --resume into a new --out."
        )
    return state


def fingerprint(
    checkpoint: Path, recipe: dict, data: str | None, seed: int, task: str = "classification"
) -> str:
    """What a ``--resume`` state must have been made from: the checkpoint (path and size),
    the resolved recipe, the data, the seed and the task (``input.task``; left out of the
    hash for classification, so states written before tasks existed still resume)."""
    st = checkpoint.stat()
    parts = [str(checkpoint.resolve()), st.st_size, recipe, data, seed]
    if task != "classification":
        parts.append(task)
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
