"""``userllm prepare``: normalized events/items -> a prepared dataset directory.

Steps, in order (each filter's parameters and its before/after counts go to ``manifest.json``):

1. read the source (malformed rows skipped and counted, or fatal under ``strict``);
2. ``dedup``: identical (user, item, timestamp) events keep their first occurrence;
3. ``rating_threshold`` (optional): keep events rated at least the threshold;
4. ``k_core`` (optional): iteratively drop users with fewer than ``min_user_events`` and items with fewer
   than ``min_item_events`` events until both hold;
5. ``split_min_events``: users need 3 events for the leave-last-out split;
6. order each user's events by timestamp with a *stable* sort: events with equal timestamps keep the
   order of the input file (415 of MovieLens-100K's 943 test items tie with the event before them);
7. vocabularies (0 = padding, 1 = unknown) for items, rating buckets and categories; an item without a
   usable title (no metadata record, an empty title, or one that was only HTML) is called
   ``item <item_id> (no title)``, and ``manifest.json`` ``item_titles`` counts titles by source;
8. leave-last-out split per user: test = last event, valid = second last, train = the rest (RecBole and
   SASRec's protocol), and labelled examples whose history is the ``max_history`` events before the target.

Output files (see :class:`~userllm.data.dataset.PreparedDataset`): ``events.parquet``, ``items.parquet``,
``sequences.parquet``, ``examples.parquet``, ``vocab.json``, ``manifest.json``, ``config.yaml``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl

import userllm
from userllm.config import PrepareConfig, dump_config, save_config
from userllm.data.readers import ReadContext, read_source
from userllm.data.skips import SkipLog
from userllm.errors import EmptyResultError
from userllm.io import check_output, sha256, write_dir_atomically
from userllm.progress import progress_bar

PAD, UNK = 0, 1
SPECIAL = ["<pad>", "<unk>"]
MIN_SPLIT_EVENTS = 3
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
FALLBACK_TITLE = "item {} (no title)"  # the title of an item whose metadata gives none (marked as such)
LABEL_CHUNK = 100_000  # examples labelled per step (bounds memory of the exploded history windows)


def counts(events: pl.DataFrame) -> dict[str, int]:
    """Events, users and items of a frame with the integer codes ``u`` and ``i`` (fast on 20M rows)."""
    return {
        "events": events.height,
        "users": events.get_column("u").n_unique(),
        "items": events.get_column("i").n_unique(),
    }


class FilterLog:
    """Applies filters in order, recording parameters and counts, and failing clearly on an empty result."""

    def __init__(self, events: pl.DataFrame) -> None:
        self.input = counts(events)
        self.steps: list[dict] = []
        self.events = events

    def apply(self, name: str, params: dict, fn, hint: str) -> None:
        before = self.steps[-1]["after"] if self.steps else self.input
        self.events, extra = fn(self.events)
        after = counts(self.events)
        self.steps.append({"name": name, "params": params, "before": before, "after": after, **extra})
        if after["events"] == 0:
            raise EmptyResultError(
                f"filter '{name}' {params} removed every event (before it: {before['events']:,} events, "
                f"{before['users']:,} users, {before['items']:,} items); {hint}"
            )


def keep(events: pl.DataFrame, condition: pl.Expr) -> pl.DataFrame:
    """``events.filter(condition)``, without copying the frame when every row is kept."""
    mask = events.select(condition.fill_null(False)).to_series()
    return events if mask.all() else events.filter(mask)


def k_core(events: pl.DataFrame, min_user: int, min_item: int) -> tuple[pl.DataFrame, dict]:
    """Iterate user and item minimum-count filters until both hold (the k-core of the bipartite graph)."""
    iterations = 0
    while True:
        iterations += 1
        n = events.height
        if min_user:
            events = keep(events, pl.len().over("u") >= min_user)
        if min_item:
            events = keep(events, pl.len().over("i") >= min_item)
        if events.height == n:
            return events, {"iterations": iterations}


def vocabulary(values: pl.DataFrame, key: str, weight: str | None = None) -> list[str]:
    """Specials, then values by descending frequency (or summed ``weight``), ties by value."""
    agg = pl.col(weight).sum() if weight else pl.len()
    ranked = values.group_by(key).agg(n=agg).with_columns(pl.col(key).cast(pl.String))
    ranked = ranked.sort(["n", key], descending=[True, False])
    return SPECIAL + ranked.get_column(key).to_list()


def rating_token(step: float) -> pl.Expr:
    """The rating bucket as a string token, e.g. ``4.5`` (ratings rounded to ``step``)."""
    return ((pl.col("rating") / step).round(0) * step).round(6).cast(pl.String)


def favorite_categories(
    examples: pl.DataFrame, item_of_event: np.ndarray, item_cats: pl.DataFrame, progress
) -> pl.Series:
    """Favorite category of each example's history window: most frequent, ties to the most recent.

    ``examples`` has global event rows ``g0`` (window start) and ``g1`` (target, excluded).
    Each category of each event counts once; the unknown category is ignored. A remaining tie (two
    categories of the same latest event) goes to the smaller category index (the more frequent one).
    Null when the window has no known category.
    """
    task = progress.add_task("labelling examples", total=examples.height, unit="examples")
    out = []
    for start in range(0, examples.height, LABEL_CHUNK):
        chunk = examples.slice(start, LABEL_CHUNK).with_row_index("ex", offset=start)
        win = chunk.select("ex", g=pl.int_ranges("g0", "g1")).explode("g").drop_nulls()
        win = win.with_columns(item_idx=pl.Series(item_of_event[win.get_column("g").to_numpy()]))
        cats = win.join(item_cats, on="item_idx").explode("category_idx").filter(pl.col("category_idx") > UNK)
        best = (
            cats.group_by("ex", "category_idx")
            .agg(n=pl.len(), last=pl.col("g").max())
            .sort(["ex", "n", "last", "category_idx"], descending=[False, True, True, False])
            .unique("ex", keep="first", maintain_order=True)
        )
        out.append(chunk.select("ex").join(best.select("ex", "category_idx"), on="ex", how="left"))
        progress.advance(task, chunk.height)
    return pl.concat(out).sort("ex").get_column("category_idx").alias("favorite_category")


def build_examples(
    sequences: pl.DataFrame, events: pl.DataFrame, item_cats: pl.DataFrame, cfg: PrepareConfig, progress
) -> pl.DataFrame:
    """Labelled targets per user: the last ``train_examples_per_user`` train positions, valid, test."""
    n = sequences.get_column("length").to_numpy().astype(np.int64)
    offsets = np.cumsum(n) - n
    k = np.minimum(cfg.train_examples_per_user, n - MIN_SPLIT_EVENTS)
    users_train = np.repeat(np.arange(len(n)), k)
    within = np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)
    t_train = np.repeat(n - 2 - k, k) + within
    user = np.concatenate([users_train, np.arange(len(n)), np.arange(len(n))])
    target = np.concatenate([t_train, n - 2, n - 1])
    split = np.repeat(["train", "valid", "test"], [len(t_train), len(n), len(n)])
    order = np.lexsort((target, user))  # examples grouped by user, in time order
    user, target, split = user[order], target[order], split[order]
    start = np.maximum(target - cfg.max_history, 0)
    g = offsets[user] + target
    ex = pl.DataFrame(
        {
            "split": split,
            "user_idx": user.astype(np.int32),
            "target_pos": target.astype(np.int32),
            "history_start": start.astype(np.int32),
            "history_len": (target - start).astype(np.int32),
            "g0": offsets[user] + start,
            "g1": g,
        }
    )
    target_cols = events.select(
        "user_id",
        target_item=pl.col("item_idx"),
        target_item_id=pl.col("item_id"),
        target_rating=pl.col("rating"),
        review_text=pl.col("text"),
        review_summary=pl.col("summary"),
    )[g]
    fav = favorite_categories(ex, events.get_column("item_idx").to_numpy(), item_cats, progress)
    return (
        pl.concat([ex.drop("g0", "g1"), target_cols], how="horizontal")
        .with_columns(fav)
        .select(
            "split",
            "user_idx",
            "user_id",
            "target_pos",
            "history_start",
            "history_len",
            "target_item",
            "target_item_id",
            "target_rating",
            "favorite_category",
            "review_text",
            "review_summary",
        )
    )


def quantiles(values: np.ndarray) -> dict[str, float]:
    return {f"p{int(q * 100)}": float(np.quantile(values, q)) for q in QUANTILES}


def prepare_dataset(cfg: PrepareConfig) -> dict:
    """Run the whole pipeline for ``cfg`` and return the manifest (also written to ``cfg.out``).

    Example::

        from userllm.config import PrepareConfig
        manifest = prepare_dataset(PrepareConfig(source="synthetic", out="runs/syn"))
        manifest["vocab_sizes"]["item"]
    """
    started = time.perf_counter()
    out = Path(cfg.out)
    check_output(out, cfg.force)
    skips = SkipLog(strict=cfg.strict)
    with progress_bar("rows") as progress:
        raw = read_source(cfg, ReadContext(skips, progress))
        if raw.events.height == 0:
            raise EmptyResultError(
                f"no valid events were read from {[str(f) for f in raw.files]} ({skips.total} rows skipped)"
            )
        # Categorical ids hold each string once (freeing the reader's line buffers); their integer codes
        # u, i make filters and counts fast; row keeps the input order for timestamp ties.
        log = FilterLog(
            raw.events.with_columns(
                row=pl.int_range(pl.len(), dtype=pl.Int64),
                user_id=pl.col("user_id").cast(pl.Categorical),
                item_id=pl.col("item_id").cast(pl.Categorical),
            ).with_columns(u=pl.col("user_id").to_physical(), i=pl.col("item_id").to_physical())
        )
        items_meta, layout, files, merged_items = raw.items, raw.layout, raw.files, raw.merged_items
        del raw  # frees the raw events early (peak memory on 20M rows)
        log.apply(
            "dedup",
            {"key": ["user_id", "item_id", "timestamp"], "keep": "first"},
            lambda e: (keep(e, pl.struct("u", "i", "timestamp").is_first_distinct()), {}),
            "this cannot happen with valid input",
        )
        if cfg.rating_threshold is not None:
            log.apply(
                "rating_threshold",
                {"min_rating": cfg.rating_threshold},
                lambda e: (keep(e, pl.col("rating") >= cfg.rating_threshold), {}),
                "lower --rating-threshold",
            )
        if cfg.min_user_events or cfg.min_item_events:
            log.apply(
                "k_core",
                {"min_user_events": cfg.min_user_events, "min_item_events": cfg.min_item_events},
                lambda e: k_core(e, cfg.min_user_events, cfg.min_item_events),
                "lower --min-user-events / --min-item-events",
            )
        log.apply(
            "split_min_events",
            {"min_user_events": MIN_SPLIT_EVENTS},
            lambda e: (keep(e, pl.len().over("u") >= MIN_SPLIT_EVENTS), {}),
            f"leave-last-out needs users with at least {MIN_SPLIT_EVENTS} events",
        )

        # users in id order; each user's events by time, ties in input order (a stable sort)
        users = log.events.select("u", pl.col("user_id").cast(pl.String)).unique("u").sort("user_id")
        users = users.with_columns(user_idx=pl.int_range(pl.len(), dtype=pl.Int32)).drop("user_id")
        events = log.events.join(users, on="u").sort(["user_idx", "timestamp", "row"]).drop("u", "i", "row")
        log.events = events.head(0)
        items_meta = items_meta.join(
            events.select(pl.col("item_id").cast(pl.String)).unique(), on="item_id", how="semi"
        )

        # vocabularies
        item_vocab = vocabulary(events, "item_id")
        item_index = pl.DataFrame(
            {"item_id": item_vocab[2:], "item_idx": np.arange(2, len(item_vocab), dtype=np.int32)}
        )
        items = (
            item_index.join(items_meta, on="item_id", how="left", maintain_order="left")
            .with_columns(
                has_metadata=pl.col("categories").is_not_null(),  # a metadata record (categories may be [])
                title_source=pl.when(pl.col("title").is_not_null())
                .then(pl.lit("metadata"))
                .when(pl.col("categories").is_null())
                .then(pl.lit("no metadata record"))
                .otherwise(pl.coalesce("title_note", pl.lit("empty title"))),
            )
            .with_columns(
                title=pl.coalesce("title", pl.format(FALLBACK_TITLE, "item_id")),
                categories=pl.col("categories").fill_null(pl.lit([], dtype=pl.List(pl.String))),
            )
        )
        item_freq = events.group_by("item_id").agg(n=pl.len()).with_columns(pl.col("item_id").cast(pl.String))
        cat_counts = items.join(item_freq, on="item_id").select("n", category=pl.col("categories")).explode("category")
        category_vocab = vocabulary(cat_counts.drop_nulls("category"), "category", weight="n")
        cat_index = {c: i for i, c in enumerate(category_vocab)}
        items = items.with_columns(
            category_idx=pl.col("categories").list.eval(
                pl.element().replace_strict(cat_index, default=UNK, return_dtype=pl.Int32)
            )
        ).with_columns(
            category_idx=pl.when(pl.col("category_idx").list.len() == 0)
            .then(pl.lit([UNK], dtype=pl.List(pl.Int32)))
            .otherwise(pl.col("category_idx"))
        )
        rated = events.filter(pl.col("rating").is_not_null())
        buckets = sorted(set(rated.select(rating_token(cfg.rating_bucket)).to_series().to_list()), key=float)
        rating_vocab = SPECIAL + buckets
        rating_index = {r: i for i, r in enumerate(rating_vocab)}

        item_codes = item_index.with_columns(pl.col("item_id").cast(pl.Categorical))
        events = events.join(item_codes, on="item_id", how="left", maintain_order="left").with_columns(
            pl.col("user_id", "item_id").cast(pl.String),
            pos=pl.int_range(pl.len(), dtype=pl.Int32).over("user_idx"),
            rating_idx=rating_token(cfg.rating_bucket).replace_strict(rating_index, default=UNK, return_dtype=pl.Int16),
        )
        sequences = events.group_by("user_idx", maintain_order=True).agg(
            pl.col("user_id").first(),
            item_idx=pl.col("item_idx"),
            rating_idx=pl.col("rating_idx"),
            timestamp=pl.col("timestamp"),
            length=pl.len().cast(pl.Int32),
        )
        examples = build_examples(sequences, events, items.select("item_idx", "category_idx"), cfg, progress)

    lengths = sequences.get_column("length").to_numpy()
    test_hist = examples.filter(pl.col("split") == "test").get_column("history_len").to_numpy()
    manifest = {
        "userllm_version": userllm.__version__,
        "libraries": {"polars": pl.__version__, "numpy": np.__version__},
        "source": cfg.source,
        "format": layout,
        "inputs": [{"path": str(f), "bytes": f.stat().st_size, "sha256": sha256(f)} for f in files],
        "input_counts": log.input,
        "filters": log.steps,
        "final_counts": log.steps[-1]["after"],
        "vocab_sizes": {
            "item": len(item_vocab),
            "rating": len(rating_vocab),
            "category": len(category_vocab),
            "user": sequences.height,
        },
        "special_tokens": {"pad": PAD, "unk": UNK},
        "split": {
            "protocol": "leave-last-out by time: test = last event, valid = second last, train = the rest",
            "events": {"train": int((lengths - 2).sum()), "valid": int(len(lengths)), "test": int(len(lengths))},
            "examples": dict(examples.group_by("split").len().iter_rows()),
            "max_history": cfg.max_history,
        },
        "history_length": {"timeline": quantiles(lengths), "test_history_window": quantiles(test_hist)},
        "skipped": skips.to_dict(),
        "warnings": skips.warnings,
        "item_titles": {
            "source": dict(items.group_by("title_source").len().sort("title_source").iter_rows()),
            "fallback": FALLBACK_TITLE.replace("{}", "<item_id>"),
            "metadata_records_merged": merged_items,  # records that repeated an item id (first non-empty wins)
        },
        "config": dump_config(cfg),
    }

    def write(tmp: Path) -> None:
        events.select(
            "user_id", "item_id", "timestamp", "rating", "text", "summary", "user_idx", "pos", "item_idx", "rating_idx"
        ).write_parquet(tmp / "events.parquet")
        items.select(
            "item_idx", "item_id", "title", "categories", "description", "category_idx", "has_metadata"
        ).write_parquet(tmp / "items.parquet")
        sequences.write_parquet(tmp / "sequences.parquet")
        examples.write_parquet(tmp / "examples.parquet")
        vocab = {"rating": rating_vocab, "category": category_vocab, "rating_bucket": cfg.rating_bucket}
        (tmp / "vocab.json").write_text(json.dumps(vocab, indent=1, ensure_ascii=False))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        save_config(cfg, tmp / "config.yaml")

    write_dir_atomically(out, write, force=cfg.force)
    manifest["elapsed_s"] = round(time.perf_counter() - started, 2)
    return manifest
