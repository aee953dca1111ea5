"""Progress bars (rich) that show throughput, written to stderr so stdout stays clean for results."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


def rate(task: Task) -> float | None:
    """The task's throughput per second: rich's recent estimate, else (work that advances less often than
    rich's 30-second window, e.g. a training step a minute) the average since the start."""
    speed = task.finished_speed or task.speed
    if speed is None and task.completed and task.elapsed:
        speed = task.completed / task.elapsed
    return speed


def remaining(task: Task) -> float | None:
    """Seconds left at :func:`rate` (``None`` without a total or a rate)."""
    speed = rate(task)
    return (task.total - task.completed) / speed if task.total and speed else None


def format_rate(speed: float | None, unit: str) -> str:
    """``speed`` per second as text: k/M suffixes when fast, two significant digits when below one a second
    (a TP training example takes ~20 s: "0.05 examples/s", not "0.0")."""
    if speed is None:
        return f"- {unit}/s"
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if speed >= scale:
            return f"{speed / scale:.1f}{suffix} {unit}/s"
    digits = ".0f" if speed >= 100 else ".1f" if speed >= 1 else ".2g"
    return f"{speed:{digits}} {unit}/s"


class RateColumn(ProgressColumn):
    """Throughput in ``unit``/s with k/M suffixes; a task's own ``unit`` field overrides the bar's."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(format_rate(rate(task), task.fields.get("unit", self.unit)), style="progress.data.speed")


def _log_lines(progress: Progress, unit: str, stop: threading.Event, every_s: float) -> None:
    """Where stderr is not a terminal (a log file), rich draws nothing until the end: print each unfinished
    task's state as one line every ``every_s`` seconds instead."""
    while not stop.wait(every_s):
        for task in progress.tasks:
            if task.finished:
                continue
            total = f"/{task.total:,.0f}" if task.total else ""
            left_s = remaining(task)
            left = f", ~{left_s:.0f} s left" if left_s else ""
            console.print(
                f"{task.description}: {task.completed:,.0f}{total}, {format_rate(rate(task), task.fields.get('unit', unit))}, "
                f"{task.elapsed or 0:.0f} s{left}",
                highlight=False,
                soft_wrap=True,
            )


@contextmanager
def progress_bar(unit: str = "rows", *, transient: bool = False, log_every_s: float = 60.0) -> Iterator[Progress]:
    """A rich ``Progress`` with description, bar, count, rate in ``unit``/s, elapsed and remaining time;
    when stderr is not a terminal, a plain line per task every ``log_every_s`` seconds instead.

    Example::

        with progress_bar("rows") as p:
            task = p.add_task("reading u.data", total=n)
            p.advance(task, 1000)
    """
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    ) as progress:
        stop = threading.Event()
        if not console.is_terminal:
            threading.Thread(target=_log_lines, args=(progress, unit, stop, log_every_s), daemon=True).start()
        try:
            yield progress
        finally:
            stop.set()
