"""Progress of the running stage: a live bar on a terminal, a line now and then in CI, or nothing.

A loop wraps its loader, in the style of torchvision's ``MetricLogger.log_every``::

    batches = progress.log_every(loader, "train epoch 1", total=steps)
    for x, y in batches:
        ...
        batches.update(loss=running_loss)

The wrapper yields every item of the loader unchanged and reports the step,
the values given to ``update`` (the loss), the steps per second and the time
left. How it reports is chosen once, by the command line (:meth:`Progress.for_cli`):

* ``bar``: a live ``rich`` progress bar per stage, for a terminal;
* ``plain``: at most one log line every ``interval`` seconds (30 by default),
  for CI logs (no TTY);
* ``off``: nothing (``--quiet``, the Python API by default, and every DDP rank but 0).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)

MODES = ("bar", "plain", "off")
PLAIN_INTERVAL_S = 30.0


def _is_secondary_rank() -> bool:
    """True in a DDP process other than rank 0 (only rank 0 shows progress)."""
    if os.environ.get("RANK", "0") != "0":
        return True
    dist = sys.modules.get("torch.distributed")  # no torch import just to ask
    return bool(
        dist is not None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0
    )


def format_duration(seconds: float) -> str:
    """``1:05:09``, ``4:09`` or ``0:07`` (hours only when there are some)."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Stage:
    """One pass over an iterable under a :class:`Progress`; iterate it like the iterable itself."""

    def __init__(self, progress: Progress, iterable: Iterable, header: str, total: int | None):
        self.progress = progress
        self.iterable = iterable
        self.header = header
        if total is None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total = total
        self.n = 0  # items completed (the loop body has run for them)
        self.meters: dict[str, float] = {}
        self.started = 0.0  # clock time when iteration began
        self.first_done: float | None = None  # clock time when the first item completed
        self.task: Any = None  # the rich task id in bar mode

    def update(self, **meters: float) -> None:
        """Values to show with the next report, e.g. ``update(loss=0.42)``."""
        self.meters.update(meters)

    def __iter__(self) -> Iterator:
        if self.progress.mode == "off":
            yield from self.iterable
            return
        self.progress._begin(self)
        try:
            for item in self.iterable:
                yield item
                self.n += 1
                self.progress._step(self)
        finally:
            self.progress._end(self)

    def rate(self, now: float) -> float | None:
        """Steps per second; once there are more, without the first (warm-up, compilation)."""
        if self.n >= 2 and self.first_done is not None and now > self.first_done:
            return (self.n - 1) / (now - self.first_done)
        if self.n >= 1 and now > self.started:
            return self.n / (now - self.started)
        return None

    def stats(self, now: float) -> str:
        """``loss 0.4123, 3.90 steps/s, 1:29 left``: what a report shows besides the step."""
        parts = [f"{k} {v:.4f}" for k, v in self.meters.items()]
        rate = self.rate(now)
        if rate is not None:
            parts.append(f"{rate:.2f} steps/s")
            if self.total is not None:
                parts.append(f"{format_duration(max(self.total - self.n, 0) / rate)} left")
        return ", ".join(parts)

    def line(self, now: float) -> str:
        """The plain line: ``train epoch 1: step 120/469, loss 0.4123, 3.90 steps/s, 1:29 left``."""
        step = f"step {self.n}/{self.total}" if self.total is not None else f"step {self.n}"
        stats = self.stats(now)
        return f"{self.header}: {step}, {stats}" if stats else f"{self.header}: {step}"


class Progress:
    """Reports the progress of the stages whose iterables go through :meth:`log_every`.

    ``mode``: ``"bar"``, ``"plain"`` or ``"off"`` (see the module docstring).
    ``console``: the ``rich.console.Console`` the bar draws on (default: one on
    stderr); give the log handler the same one so log lines print above the bar.
    ``interval``: seconds between plain lines, at least. ``clock``: a monotonic
    clock in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        mode: str = "off",
        *,
        console: Any = None,
        interval: float = PLAIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}. Got {mode!r}.")
        self.mode = mode
        self.console = console
        self.interval = float(interval)
        self.clock = clock
        self._last_line: float | None = None  # clock time of the last plain line
        self._bar: Any = None  # rich.progress.Progress, live while a stage runs
        self._active: list[Stage] = []  # stages with a bar showing

    @classmethod
    def for_cli(cls, *, quiet: bool, tty: bool, console: Any = None) -> Progress:
        """The command line's display: off with ``--quiet`` or off rank 0, else a bar on a TTY
        and plain lines elsewhere."""
        if quiet or _is_secondary_rank():
            return cls("off")
        return cls("bar" if tty else "plain", console=console)

    def log_every(self, iterable: Iterable, header: str, *, total: int | None = None) -> Stage:
        """Wrap ``iterable`` (a loader) as the stage ``header``; ``total``: steps it will run.

        ``total`` defaults to ``len(iterable)``; give it when the loop stops
        early (``max_steps_per_epoch``). Every item is yielded unchanged.
        """
        progress = self if self.mode == "off" or not _is_secondary_rank() else SILENT
        return Stage(progress, iterable, header, total)

    # -- what the stages call -------------------------------------------------------

    def _begin(self, stage: Stage) -> None:
        stage.started = self.clock()
        if self._last_line is None:
            self._last_line = stage.started
        if self.mode == "bar":
            bar = self._rich_bar()
            if not self._active:
                bar.start()
            self._active.append(stage)
            stage.task = bar.add_task(stage.header, total=stage.total, stats="")

    def _step(self, stage: Stage) -> None:
        now = self.clock()
        if stage.n == 1:
            stage.first_done = now
        if self.mode == "bar":
            self._bar.update(stage.task, completed=stage.n, stats=stage.stats(now))
        elif self.mode == "plain" and now - self._last_line >= self.interval:
            self._last_line = now
            log.info("%s", stage.line(now))

    def _end(self, stage: Stage) -> None:
        if stage not in self._active:
            return
        self._active.remove(stage)
        self._bar.remove_task(stage.task)
        stage.task = None
        if not self._active:
            self._bar.stop()

    def _rich_bar(self):
        if self._bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                console=self.console if self.console is not None else Console(stderr=True),
                transient=True,  # a finished stage's bar gives way to its summary log line
            )
        return self._bar

    def close(self) -> None:
        """Take down any bar still showing (a loop left early by an error)."""
        for stage in list(self._active):
            self._end(stage)


SILENT = Progress("off")
"""The default everywhere: reports nothing."""
