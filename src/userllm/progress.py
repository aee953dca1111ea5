"""Progress bars (rich) that show throughput, written to stderr so stdout stays clean for results."""

from __future__ import annotations

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


class RateColumn(ProgressColumn):
    """Throughput in ``unit``/s with k/M suffixes; a task's own ``unit`` field overrides the bar's."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", self.unit)
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"- {unit}/s", style="progress.data.speed")
        for scale, suffix in ((1e6, "M"), (1e3, "k")):
            if speed >= scale:
                return Text(f"{speed / scale:.1f}{suffix} {unit}/s", style="progress.data.speed")
        return Text(f"{speed:.0f} {unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(unit: str = "rows", *, transient: bool = False) -> Iterator[Progress]:
    """A rich ``Progress`` with description, bar, count, rate in ``unit``/s, elapsed and remaining time.

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
        yield progress
