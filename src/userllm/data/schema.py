"""The normalized timeline tables every reader produces (written as Parquet).

events: one row per interaction

====================  ===========  ==============================================
column                type         meaning
====================  ===========  ==============================================
``user_id``           str          user identifier as in the source
``item_id``           str          item identifier as in the source
``timestamp``         int64        seconds since the Unix epoch
``rating``            float32      explicit rating, null when the source has none
``text``              str          review body, nullable
``summary``           str          review title/summary, nullable
====================  ===========  ==============================================

items: one row per catalogue item

====================  ===========  ==============================================
``item_id``           str          item identifier
``title``             str          display title (MovieLens: with the year)
``categories``        list<str>    genres / categories, may be empty
``description``       str          nullable
``title_note``        str          why ``title`` is null: ``markup only`` (the
                                   source had only HTML) or ``empty title``
====================  ===========  ==============================================

Texts are clean (``readers.common.clean_text``: no HTML entities or tags) and ids unique (repeated metadata
records are merged by ``readers.common.items_frame``).
"""

from __future__ import annotations

import polars as pl

EVENT_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.String(),
    "item_id": pl.String(),
    "timestamp": pl.Int64(),
    "rating": pl.Float32(),
    "text": pl.String(),
    "summary": pl.String(),
}

ITEM_SCHEMA: dict[str, pl.DataType] = {
    "item_id": pl.String(),
    "title": pl.String(),
    "categories": pl.List(pl.String()),
    "description": pl.String(),
    "title_note": pl.String(),
}


def _conform(df: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return df.select(
        [
            (pl.col(name) if name in df.columns else pl.lit(None)).cast(dtype).alias(name)
            for name, dtype in schema.items()
        ]
    )


def conform_events(df: pl.DataFrame) -> pl.DataFrame:
    """Select and cast ``df`` to :data:`EVENT_SCHEMA` (missing optional columns become null)."""
    return _conform(df, EVENT_SCHEMA)


def conform_items(df: pl.DataFrame) -> pl.DataFrame:
    """Select and cast ``df`` to :data:`ITEM_SCHEMA`, strip titles; the first row wins for a repeated ``item_id``."""
    items = _conform(df, ITEM_SCHEMA).with_columns(pl.col("title").str.strip_chars())
    return items.unique("item_id", keep="first", maintain_order=True)
