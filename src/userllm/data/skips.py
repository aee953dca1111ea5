"""Bookkeeping of malformed input rows: skipped and counted, or fatal under ``--strict``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import polars as pl

from userllm.errors import MalformedRowError

MAX_EXAMPLES = 5


class SkipLog:
    """Counts skipped rows per reason and keeps up to 5 ``file:line`` examples of each.

    With ``strict=True`` the first malformed row raises :class:`MalformedRowError` instead.
    Reasons used by the readers: ``wrong field count``, ``non-numeric rating``, ``bad timestamp``,
    ``invalid JSON``, ``missing required field``, and ``truncated_file`` (a gzip stream that breaks before
    its end: the complete lines before the break are kept, see ``readers.common.read_gzip``).
    ``warnings`` are messages the command prints and the manifest keeps (e.g. an incomplete file).
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.warnings: list[str] = []

    def add(
        self,
        reason: str,
        file: Path | str,
        line: int,
        detail: str,
        lenient: str = "rerun without --strict to skip such rows",
    ) -> None:
        """Record one malformed row at ``file:line`` (1-based). ``detail`` says the field and what was expected;
        ``lenient`` what the default mode would do instead (said under ``strict``)."""
        where = f"{file}:{line}"
        if self.strict:
            raise MalformedRowError(f"{where}: {reason}: {detail} ({lenient})")
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(f"{where}: {detail}")

    def add_frame(self, file: Path | str, bad: pl.DataFrame) -> None:
        """Record many malformed rows at once; ``bad`` has columns ``line`` (int), ``reason``, ``detail``.

        Under ``strict`` the row with the smallest line number is the one reported.
        """
        if bad.height == 0:
            return
        bad = bad.sort("line")
        if self.strict:
            first = bad.row(0, named=True)
            self.add(first["reason"], file, first["line"], first["detail"])
        for (reason,), group in bad.group_by("reason", maintain_order=True):
            self.counts[reason] += group.height
            examples = self.examples.setdefault(reason, [])
            for row in group.head(MAX_EXAMPLES - len(examples)).iter_rows(named=True):
                examples.append(f"{file}:{row['line']}: {row['detail']}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "by_reason": {r: {"count": n, "examples": self.examples.get(r, [])} for r, n in self.counts.items()},
        }
