"""What a failed run leaves in ``--out``: a report that says FAIL, its exit code and why.

:func:`reports_failure` wraps ``compress``: once the run has moved the previous
outputs aside (``RunRecord.opened``), any exception (divergence, Ctrl-C, a bug)
writes ``report.json``, ``report.md`` and ``recipe.yaml`` saying FAIL and the
error, and removes this run's model files; bad input found that late (exit 2)
puts ``--out`` back as it was instead. The exception goes on to the caller.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from compressor import outdir
from compressor import recipe as recipe_mod
from compressor import report as report_mod
from compressor.errors import EXIT_BAD_INPUT, EXIT_OTHER, CompressorError
from compressor.fileio import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class RunRecord:
    """What a failure report needs of a run, filled in as the run goes."""

    out: Path | None = None
    opened: bool = False  # the previous outputs were moved aside: --out is this run's
    is_main: bool = True
    resolved: dict | None = None
    command: list[str] | None = None
    input: dict = field(default_factory=dict)
    timer: object = None
    preprocessing: dict | None = None
    baseline: dict | None = None
    verification: dict | None = None
    history: list = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    had_state: bool = False
    had_previous: bool = False
    created: Path | None = None


_RECORD: contextvars.ContextVar[RunRecord | None] = contextvars.ContextVar(
    "compressor_run", default=None
)


def current_record() -> RunRecord:
    """The record of the running ``compress`` call (a fresh one outside of it)."""
    record = _RECORD.get()
    return record if record is not None else RunRecord()


def reports_failure(fn):
    """Decorator for ``compress``: a failure after --out was opened leaves its own report."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        record = RunRecord()
        token = _RECORD.set(record)
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            if record.opened and record.is_main:
                report_exception(record, exc)
            raise
        finally:
            _RECORD.reset(token)

    return wrapper


def report_exception(record: RunRecord, exc: BaseException) -> None:
    history = record.history or []
    if isinstance(exc, KeyboardInterrupt):
        code = EXIT_OTHER
        error = (
            f"interrupted after {len(history)} completed epoch(s); rerun the same command with "
            "--resume to continue from there"
            if history
            else "interrupted before the first epoch completed; rerun the same command"
        )
    elif isinstance(exc, CompressorError):
        code, error = exc.exit_code, str(exc)
    else:
        code, error = EXIT_OTHER, f"internal error: {type(exc).__name__}: {exc}"
    if code == EXIT_BAD_INPUT:  # found late (e.g. an unreachable target): as if found early
        outdir.restore_out(
            record.out,
            moved=record.moved,
            had_state=record.had_state,
            had_previous=record.had_previous,
            created=record.created,
        )
        return
    try:
        for name in outdir.MODEL_FILES:  # this run's, of a failed run: not to be shipped
            (record.out / name).unlink(missing_ok=True)
        write_failed_report(record, error=error, exit_code=code)
    except Exception:  # the original error matters more than its report
        log.warning("could not write the failure report into %s", record.out, exc_info=True)


def write_failed_report(record: RunRecord, *, error: str, exit_code: int) -> dict:
    """The report of a run that failed (exit 1, 2 found late, or 4): FAIL, the exit code and
    the error, what was measured so far, and ``recipe.yaml``; no model files. Written into
    ``record.out`` on the main process only."""
    report = report_mod.new_report(
        command=record.command, recipe=record.resolved, input=record.input
    )
    report["baseline"].update(record.baseline or {})
    report["verification"].update(record.verification or {})
    report["epochs"] = list(record.history or [])
    report["preprocessing"] = record.preprocessing
    report["error"] = error
    report["exit_code"] = exit_code
    report["timings_s"] = {k: round(v, 3) for k, v in record.timer.seconds.items()}
    if record.is_main and record.out is not None:
        atomic_write_text(record.out / "recipe.yaml", recipe_mod.dump_recipe(record.resolved))
        report["outputs"] = ["recipe.yaml"]
        report_mod.write_report(report, record.out)
    return report
