"""Shared reading machinery: file discovery, gzip streams that may break, fast line splitting, typed
parsing with skip accounting, and the cleaning of item metadata (HTML entities and tags, repeated ids)."""

from __future__ import annotations

import gzip
import html
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
from rich.progress import Progress

from userllm.data.schema import conform_events, conform_items
from userllm.data.skips import SkipLog
from userllm.errors import InputError


@dataclass
class RawData:
    """What a reader returns: normalized events and items, the files read, and the detected layout."""

    events: pl.DataFrame
    items: pl.DataFrame
    layout: str
    files: list[Path] = field(default_factory=list)
    merged_items: int = 0  # metadata records merged into an earlier record of the same item id

    def __post_init__(self) -> None:
        self.events = conform_events(self.events)
        self.items = conform_items(self.items)


@dataclass
class ReadContext:
    """Passed to every reader: where malformed rows go, and the progress display (may be ``None``)."""

    skips: SkipLog
    progress: Progress | None = None

    def task(self, description: str, total: float | None, unit: str = "rows") -> Callable[[float], None]:
        """Start a progress task counting ``unit``; returns ``advance(n)``."""
        if self.progress is None:
            return lambda n: None
        task_id = self.progress.add_task(description, total=total, unit=unit)
        return lambda n: self.progress.advance(task_id, n)


def list_files(paths: list[Path], source: str) -> list[Path]:
    """Expand directories (one level, sorted) into files; errors name any path that does not exist."""
    if not paths:
        raise InputError(f"--source {source} needs at least one input path (a directory or files)")
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(q for q in p.iterdir() if q.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"input path does not exist: {p}")
    return files


def describe_found(files: list[Path]) -> str:
    names = [f.name for f in files]
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} files)" if len(names) > 20 else "")
    return f"found: {shown or 'no files'}"


GZIP_BREAKS = (EOFError, zlib.error, gzip.BadGzipFile)  # what a truncated or corrupt gzip stream raises


def gzip_break(path: Path, lines: int, err: Exception, skips: SkipLog) -> None:
    """A gzip stream of ``path`` that broke after ``lines`` complete lines: one ``truncated_file`` skip at
    the line where it breaks (fatal under ``--strict``) and a warning. A file that is not gzip at all is an
    error."""
    if lines == 0 and isinstance(err, gzip.BadGzipFile):
        raise InputError(f"{path}: not a gzip file, although its name ends in .gz ({err})")
    how = "ends before its end-of-stream marker" if isinstance(err, EOFError) else f"is corrupt ({err})"
    skips.add(
        "truncated_file",
        path,
        lines + 1,
        f"the gzip stream {how} after line {lines:,} (an incomplete download?)",
        lenient=f"rerun without --strict to keep the {lines:,} complete lines before the break",
    )
    skips.warnings.append(
        f"{path} is incomplete: its gzip stream {how} after line {lines:,}; "
        f"the {lines:,} complete lines before the break were read, the rest of the file is missing"
    )


def read_gzip(path: Path, skips: SkipLog) -> bytes:
    """The decompressed bytes of a gzip file; a stream that breaks early (truncated download, corrupt
    block) gives the complete lines before the break, recorded by :func:`gzip_break`."""
    chunks = []
    with gzip.open(path, "rb") as f:
        try:
            while block := f.read1(1 << 20):  # one block at a time: a break loses no decompressed bytes
                chunks.append(block)
        except GZIP_BREAKS as err:
            data = b"".join(chunks)
            data = data[: data.rfind(b"\n") + 1]
            gzip_break(path, data.count(b"\n"), err, skips)
            return data
    return b"".join(chunks)


def read_small_text(path: Path, skips: SkipLog) -> str:
    """Whole file as text (gzip ok, see :func:`read_gzip`): UTF-8 when valid, else latin-1 (the encoding of
    MovieLens' older files)."""
    raw = read_gzip(path, skips) if path.suffix == ".gz" else path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_lines(path: Path, skips: SkipLog) -> pl.DataFrame:
    """All lines of a (possibly gzipped, see :func:`read_gzip`) text file as ``line`` (str) and 1-based
    ``lineno`` (int64).

    Columnar and multi-threaded (pyarrow's CSV reader with a delimiter that does not occur), so a
    20M-line file takes seconds. Empty lines are kept (as ``""``) so line numbers stay exact.
    """
    parse = pacsv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False, ignore_empty_lines=False)
    convert = pacsv.ConvertOptions(column_types={"line": pa.string()}, strings_can_be_null=False)
    source = pa.py_buffer(read_gzip(path, skips)) if path.suffix == ".gz" else path
    if isinstance(source, pa.Buffer) and source.size == 0:
        return pl.DataFrame({"line": [], "lineno": []}, schema={"line": pl.String, "lineno": pl.Int64})
    table = None
    for encoding in ("utf8", "latin-1"):
        read = pacsv.ReadOptions(column_names=["line"], encoding=encoding, block_size=64 << 20)
        try:
            data = pa.BufferReader(source) if isinstance(source, pa.Buffer) else source
            table = pacsv.read_csv(data, read_options=read, parse_options=parse, convert_options=convert)
            break
        except pa.ArrowInvalid as err:
            if "utf8" in str(err).lower():
                continue
            raise InputError(f"{path}: cannot read as text lines: {err}") from None
        except (pa.ArrowException, OSError) as err:
            raise InputError(f"{path}: cannot read: {err}") from None
    assert table is not None
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    return df.with_columns(lineno=pl.int_range(1, df.height + 1, dtype=pl.Int64))


def split_delimited(
    lines: pl.DataFrame, sep: str, names: list[str], file: Path, skips: SkipLog, *, skip_header: bool = False
) -> pl.DataFrame:
    """Split ``lines`` on the literal ``sep`` into string columns ``names`` (plus ``lineno``).

    Empty lines are ignored; lines with another number of fields are recorded as ``wrong field count``.
    """
    if skip_header:
        lines = lines.slice(1)
    n = pl.col("line").str.count_matches(sep, literal=True) + 1
    empty = pl.col("line").str.strip_chars("\r") == ""
    lines = lines.with_columns(_n=pl.when(empty).then(0).otherwise(n))  # empty lines are ignored
    bad = lines.filter((pl.col("_n") != len(names)) & (pl.col("_n") > 0)).select(
        line=pl.col("lineno"),
        reason=pl.lit("wrong field count"),
        detail=pl.format(f"expected {len(names)} fields separated by {sep!r}, got {{}}", pl.col("_n")),
    )
    skips.add_frame(file, bad)
    fields = pl.col("line").str.strip_chars_end("\r").str.split_exact(sep, len(names) - 1)
    return (
        lines.lazy()
        .filter(pl.col("_n") == len(names))
        .select(fields.struct.rename_fields(names).alias("_f"), "lineno")
        .unnest("_f")
        .collect()
    )


def parse_typed(df: pl.DataFrame, file: Path, skips: SkipLog, *, ms_timestamps: bool = False) -> pl.DataFrame:
    """Validate and cast string columns ``user_id``, ``item_id``, ``rating``, ``timestamp`` of ``df``.

    Rows with an empty id are ``missing required field``; an unparsable rating is ``non-numeric rating``;
    a timestamp that is not a non-negative number is ``bad timestamp``. Returns the good rows, typed.
    """
    ts = pl.col("timestamp").str.strip_chars().cast(pl.Float64, strict=False)
    ts = pl.when(ts.is_finite() & (ts >= 0)).then(ts)
    if ms_timestamps:
        ts = ts / 1000.0
    df = df.with_columns(
        _rating=pl.col("rating").str.strip_chars().cast(pl.Float32, strict=False),
        _ts=ts.floor().cast(pl.Int64),
    )
    checks = [
        (
            (pl.col("user_id").str.strip_chars() == "") | (pl.col("item_id").str.strip_chars() == ""),
            "missing required field",
            pl.lit("fields 'user_id' and 'item_id': expected a non-empty id"),
        ),
        (
            pl.col("_rating").is_null() | ~pl.col("_rating").is_finite(),
            "non-numeric rating",
            pl.format("field 'rating': expected a number, got '{}'", pl.col("rating")),
        ),
        (
            pl.col("_ts").is_null(),
            "bad timestamp",
            pl.format("field 'timestamp': expected non-negative Unix time, got '{}'", pl.col("timestamp")),
        ),
    ]
    is_bad = pl.lit(False)
    for cond, reason, detail in checks:
        bad = df.filter(~is_bad & cond).select(line=pl.col("lineno"), reason=pl.lit(reason), detail=detail)
        skips.add_frame(file, bad)
        is_bad = is_bad | cond
    return (
        df.filter(~is_bad)
        .with_columns(
            pl.col("user_id").str.strip_chars(),
            pl.col("item_id").str.strip_chars(),
            timestamp=pl.col("_ts"),
            rating=pl.col("_rating"),
        )
        .drop("_ts", "_rating")
    )


def iter_records(
    path: Path, ctx: ReadContext, *, parse: Callable[[str], object] = json.loads, what: str = "JSON"
) -> Iterator[tuple[int, dict]]:
    """Yield ``(lineno, record)`` for each line of a JSON-lines file (gz ok); bad lines go to the skip log."""
    advance = ctx.task(f"reading {path.name}", total=path.stat().st_size, unit="bytes")
    with open(path, "rb") as raw:
        stream = gzip.open(raw) if path.suffix == ".gz" else raw
        last, lineno = 0, 0
        try:
            for lineno, bline in enumerate(stream, start=1):
                if lineno % 4096 == 0:
                    pos = raw.tell()
                    advance(pos - last)
                    last = pos
                line = bline.decode("utf-8", errors="replace").strip()
                if not line:
                    continue
                try:
                    record = parse(line)
                except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
                    ctx.skips.add("invalid JSON", path, lineno, f"expected a {what} object: {str(err)[:80]}")
                    continue
                if not isinstance(record, dict):
                    ctx.skips.add(
                        "invalid JSON", path, lineno, f"expected a {what} object, got {type(record).__name__}"
                    )
                    continue
                yield lineno, record
        except GZIP_BREAKS as err:  # the line being read when the stream broke is incomplete: not yielded
            gzip_break(path, lineno, err, ctx.skips)
        advance(path.stat().st_size - last)


def records_to_events(
    rows: Iterable[tuple[int, dict]], fields: dict[str, str], path: Path, ctx: ReadContext, *, ms_timestamps: bool
) -> pl.DataFrame:
    """Map JSON records to event columns (``fields``: our column -> source key) and validate them.

    ``user_id``, ``item_id``, ``rating`` and ``timestamp`` are required; ``text`` and ``summary`` optional.
    """
    required = ("user_id", "item_id", "rating", "timestamp")
    cols: dict[str, list] = {c: [] for c in ("lineno", *fields)}
    for lineno, rec in rows:
        missing = [fields[c] for c in required if rec.get(fields[c]) in (None, "")]
        if missing:
            ctx.skips.add("missing required field", path, lineno, f"field '{missing[0]}': expected a value")
            continue
        cols["lineno"].append(lineno)
        for col, key in fields.items():
            value = rec.get(key)
            if col in ("text", "summary"):
                cols[col].append(None if value is None else str(value))
            else:
                cols[col].append(str(value))
    df = pl.DataFrame(cols, schema={c: (pl.Int64 if c == "lineno" else pl.String) for c in cols})
    return parse_typed(df, path, ctx.skips, ms_timestamps=ms_timestamps)


def first_record_layout(
    path: Path, ctx: ReadContext, detect: Callable[[dict, Path], str]
) -> tuple[str, list[tuple[int, dict]]]:
    """Read a JSON-lines review file; ``detect`` names its layout from the first valid record (or raises)."""
    records = iter_records(path, ctx)
    first = next(records, None)
    if first is None:
        raise InputError(f"{path}: no valid review record in the file")
    return detect(first[1], path), [first, *records]


TAG = re.compile(r"<[A-Za-z/!][^>]*>|<[A-Za-z/!][^>]*$")  # an HTML tag, or one cut off at the end of the text
SPACE = re.compile(r"\s+")


def clean_text(value: object) -> str | None:
    """Metadata text as a person would read it: HTML entities unescaped (``&amp;#39;`` too, escaped twice),
    tags removed, whitespace collapsed; ``None`` when nothing is left.

    >>> clean_text("Chili&#39;s Grill &amp; Bar <br>Gift Card"), clean_text('<span class="a-size-medium"')
    ("Chili's Grill & Bar Gift Card", None)
    """
    if value is None:
        return None
    text = str(value)
    for _ in range(2):
        if "&" not in text:
            break
        text = html.unescape(text)
    text = SPACE.sub(" ", TAG.sub(" ", text)).strip()
    return text or None


def items_frame(rows: Iterable[tuple[str, object, object, object]]) -> tuple[pl.DataFrame, int]:
    """An items table (:data:`~userllm.data.schema.ITEM_SCHEMA`) from ``(item_id, title, categories,
    description)`` metadata records, and the number of records merged into an earlier one of the same id.

    Every text goes through :func:`clean_text`; a title empty after that is null, with ``title_note`` saying
    why (``markup only``: the record had only HTML; ``empty title``: it had none); categories are cleaned,
    de-duplicated, empty ones dropped; descriptions may be a list (joined by newlines). Records that repeat
    an id are merged: the first non-empty value of each field wins.
    """
    merged: dict[str, list] = {}
    repeats = 0
    for item_id, title, categories, description in rows:
        parts = description if isinstance(description, list) else [description]
        description = "\n".join(d for d in map(clean_text, parts) if d) or None  # paragraphs stay lines
        cats = list(dict.fromkeys(c for c in map(clean_text, categories or []) if c))
        clean = clean_text(title)
        note = None if clean else ("markup only" if title and str(title).strip() else "empty title")
        row = [clean, cats, description, note]
        if item_id in merged:
            repeats += 1
            old = merged[item_id]
            merged[item_id] = [o if o else n for o, n in zip(old[:3], row[:3])] + [None if old[0] or row[0] else old[3]]
        else:
            merged[item_id] = row
    schema = {
        "item_id": pl.String,
        "title": pl.String,
        "categories": pl.List(pl.String),
        "description": pl.String,
        "title_note": pl.String,
    }
    return pl.DataFrame([[k, *v] for k, v in merged.items()], schema=schema, orient="row"), repeats
