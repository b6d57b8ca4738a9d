"""Progress display: a plain line at most once per interval, nothing when quiet, batches as is."""

from __future__ import annotations

import io
import logging
import re

import pytest
import torch
from torch import nn

from compressor import cli, train
from compressor.progress import SILENT, Progress, format_duration

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _messages(records) -> list[str]:
    return [r.getMessage() for r in records]


@pytest.fixture
def clock_records():
    """Records of ``compressor.progress`` (at INFO), captured whatever the CLI configured."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("compressor.progress")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def _run(
    progress: Progress, clock: FakeClock, items, seconds_per_step: float, header="train", records=()
):
    """Iterate like a training loop: each step takes ``seconds_per_step`` and reports a loss.

    Returns the items seen and the clock time of each record added to ``records`` meanwhile.
    """
    seen, emitted_at, count = [], [], len(records)
    stage = progress.log_every(items, header)
    for i, item in enumerate(stage):
        emitted_at += [clock.now] * (len(records) - count)  # what the last step reported
        count = len(records)
        seen.append(item)
        clock.now += seconds_per_step
        stage.update(loss=1.0 / (i + 1))
    emitted_at += [clock.now] * (len(records) - count)
    return seen, emitted_at


def test_plain_prints_at_most_one_line_per_interval_with_step_loss_and_time_left(clock_records):
    clock = FakeClock()
    progress = Progress("plain", interval=30.0, clock=clock)
    _, times = _run(progress, clock, range(100), 1.0, "train epoch 1", clock_records)
    messages = _messages(clock_records)
    assert len(messages) == 3  # 100 steps of 1 s: at 30, 60 and 90 s
    assert all(b - a >= 30.0 for a, b in zip(times, times[1:], strict=False))
    first = messages[0]
    assert first.startswith("train epoch 1: step 30/100, loss 0.0333")
    assert "1.00 steps/s" in first
    assert first.endswith("1:10 left")  # 70 steps at 1 step/s
    for m in messages:
        assert re.search(r"step \d+/100, loss [\d.]+, [\d.]+ steps/s, \d+:\d\d left$", m), m


def test_plain_interval_holds_across_stages(clock_records):
    """Short stages (an evaluation after each epoch) do not add lines inside the interval."""
    clock = FakeClock()
    progress = Progress("plain", interval=30.0, clock=clock)
    times = []
    for epoch in range(6):
        for header, steps in ((f"train epoch {epoch + 1}", 20), ("evaluate", 5)):
            times += _run(progress, clock, range(steps), 1.0, header, clock_records)[1]
    assert 3 <= len(clock_records) <= 5  # 150 s of steps
    assert all(b - a >= 30.0 for a, b in zip(times, times[1:], strict=False))


def test_rate_leaves_out_a_slow_first_step(clock_records):
    clock = FakeClock()
    progress = Progress("plain", interval=30.0, clock=clock)
    stage = progress.log_every(range(40), "train")
    for i, _ in enumerate(stage):
        clock.now += 25.0 if i == 0 else 2.0  # compilation on the first step
        stage.update(loss=0.5)
    lines = _messages(clock_records)
    assert lines[0].startswith("train: step 4/40")
    assert "0.50 steps/s" in lines[0] and lines[0].endswith("1:12 left")


@pytest.mark.parametrize("tty", [True, False])
def test_quiet_prints_nothing(tty, clock_records, capsys):
    clock = FakeClock()
    progress = Progress.for_cli(quiet=True, tty=tty)
    assert progress.mode == "off"
    progress.clock = clock
    seen, _ = _run(progress, clock, range(200), 5.0)
    assert seen == list(range(200))
    assert clock_records == []
    assert capsys.readouterr() == ("", "")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cli_quiet_sets_no_progress_and_a_terminal_gets_a_bar(monkeypatch):
    root = logging.getLogger("compressor")
    saved = root.handlers[:], root.level, root.propagate
    try:
        assert cli._setup_logging(quiet=True).mode == "off"
        assert cli._setup_logging(quiet=False).mode == "plain"  # pytest's stderr is no TTY
        monkeypatch.setattr("sys.stderr", Terminal())
        bar = cli._setup_logging(quiet=False)
        assert bar.mode == "bar"
        assert bar.console is root.handlers[0].console  # log lines print above the bar
        monkeypatch.setenv("RANK", "1")
        assert cli._setup_logging(quiet=False).mode == "off"  # only rank 0 shows progress
    finally:
        root.handlers[:], root.level, root.propagate = saved


def _bar(clock=None) -> tuple[Progress, io.StringIO]:
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    return Progress("bar", console=console, clock=clock or FakeClock()), out


@pytest.mark.parametrize("mode", ["off", "plain", "bar"])
def test_wrapper_yields_every_batch_unchanged(mode, clock_records):
    batches = [(torch.randn(4, 3), torch.tensor([i] * 4)) for i in range(7)]
    progress = _bar()[0] if mode == "bar" else Progress(mode, interval=0.0, clock=FakeClock())
    got = list(progress.log_every(batches, "train"))
    assert len(got) == len(batches)
    assert all(a is b for a, b in zip(got, batches, strict=True))
    assert progress.log_every(iter(batches), "no length").total is None
    assert list(progress.log_every(iter(batches), "no length")) == batches


def test_bar_shows_the_stage_then_goes_away():
    clock = FakeClock()
    progress, out = _bar(clock)
    stage = progress.log_every(range(10), "train epoch 2")
    for i, _ in enumerate(stage):
        clock.now += 0.5
        stage.update(loss=0.25)
        if i == 5:
            progress._bar.refresh()
            assert progress._bar.live.is_started
    shown = out.getvalue()
    assert "train epoch 2" in shown and "loss 0.2500" in shown and "steps/s" in shown
    assert "left" in shown
    assert progress._active == [] and not progress._bar.live.is_started


def test_a_loop_left_early_takes_its_bar_down():
    progress, _ = _bar()
    for i in progress.log_every(range(10), "train"):
        if i == 3:
            break
    progress.close()
    assert progress._active == [] and not progress._bar.live.is_started


def test_only_rank_0_reports(monkeypatch, clock_records):
    monkeypatch.setenv("RANK", "2")
    clock = FakeClock()
    seen, _ = _run(Progress("plain", interval=1.0, clock=clock), clock, range(50), 5.0)
    assert seen == list(range(50)) and clock_records == []


def test_format_duration():
    assert format_duration(7) == "0:07"
    assert format_duration(249) == "4:09"
    assert format_duration(3909) == "1:05:09"


def _tiny_training(progress=None, steps=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    data = torch.utils.data.TensorDataset(
        torch.randn(steps * 4, 3, 2, 2), torch.arange(steps * 4) % 3
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = train.make_scheduler(opt, "constant", steps)
    kwargs = {} if progress is None else {"progress": progress}
    loss = train.train_one_epoch(model, loader, opt, sched, torch.device("cpu"), **kwargs)
    acc = train.evaluate(model, loader, torch.device("cpu"), **kwargs)
    return loss, acc


def test_training_loop_reports_through_the_progress_it_is_given(clock_records):
    class Ticking(FakeClock):
        def __call__(self):
            self.now += 31.0  # every step is past the interval
            return self.now

    quiet_loss, quiet_acc = _tiny_training()
    assert clock_records == []  # the default is silent
    loss, acc = _tiny_training(Progress("plain", interval=30.0, clock=Ticking()))
    lines = _messages(clock_records)
    assert (loss, acc) == (quiet_loss, quiet_acc)  # reporting changes nothing
    train_lines = [m for m in lines if m.startswith("train epoch 1: ")]
    assert train_lines and train_lines[-1].startswith("train epoch 1: step 6/6, loss ")
    assert any(m.startswith("evaluate: step ") for m in lines)
    assert SILENT.mode == "off"
