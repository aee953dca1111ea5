"""Amazon Reviews in the 2014, 2018 and 2023 layouts (detected from the fields of the review records).

============  ==========================================  ==================================================
layout        reviews                                     metadata
============  ==========================================  ==================================================
2014          ``reviews_<Cat>[_5].json(.gz)``: reviewerID,  ``meta_<Cat>.json(.gz)``: Python dict literals
              asin, overall, unixReviewTime, reviewText,    (read with ``ast.literal_eval``, never ``eval``):
              summary, helpful                              asin, title, categories (list of paths), description
2018          ``<Cat>[_5].json(.gz)``: same fields as 2014  ``meta_<Cat>.json(.gz)`` JSON: asin, title,
              plus vote/verified/style, no ``helpful``      category (a path), description (list)
2023          ``<Cat>.jsonl(.gz)``: user_id, parent_asin,   ``meta_<Cat>.jsonl(.gz)``: parent_asin, title,
              rating, timestamp (ms), text, title           main_category, categories (a path), description
============  ==========================================  ==================================================

Category paths lose their root (``Books > Literature > Poetry`` -> ``Literature``, ``Poetry``): the root is
the same for the whole file and would make every favorite category the same.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import polars as pl

from userllm.data.readers.common import (
    RawData,
    ReadContext,
    describe_found,
    first_record_layout,
    items_frame,
    iter_records,
    list_files,
    records_to_events,
)
from userllm.errors import InputError

FIELDS = {
    "2014": {
        "user_id": "reviewerID",
        "item_id": "asin",
        "rating": "overall",
        "timestamp": "unixReviewTime",
        "text": "reviewText",
        "summary": "summary",
    },
    "2023": {
        "user_id": "user_id",
        "item_id": "parent_asin",
        "rating": "rating",
        "timestamp": "timestamp",
        "text": "text",
        "summary": "title",
    },
}
FIELDS["2018"] = FIELDS["2014"]
REVIEW_FILE = re.compile(r"^(?!meta_)(?:reviews_)?(?P<cat>.+?)(?:_5)?\.jsonl?(?:\.gz)?$")
META_FILE = re.compile(r"^meta_(?P<cat>.+?)\.jsonl?(?:\.gz)?$")
EXPECTED = (
    "2014: reviews_<Cat>_5.json(.gz) + meta_<Cat>.json(.gz); 2018: <Cat>.json(.gz) + meta_<Cat>.json(.gz); "
    "2023: <Cat>.jsonl(.gz) + meta_<Cat>.jsonl(.gz)"
)


def detect_layout(record: dict, path: Path) -> str:
    """The layout of a review record, from its fields."""
    if "parent_asin" in record and "user_id" in record:
        return "2023"
    if "reviewerID" in record and "asin" in record:
        return "2014" if "helpful" in record or path.name.startswith("reviews_") else "2018"
    raise InputError(
        f"{path}: review records have fields {sorted(record)[:12]}, which match no Amazon layout "
        "(2014/2018: reviewerID, asin, overall, unixReviewTime; 2023: user_id, parent_asin, rating, timestamp)"
    )


def parse_meta_line(line: str) -> object:
    """Metadata lines are JSON (2018, 2023) or Python dict literals (2014): never ``eval``."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return ast.literal_eval(line)


def _flat_categories(value: object) -> list[str]:
    """Categories from a path ``[root, a, b]`` or a list of paths, without the root, unique, in order."""
    if not value:
        return []
    paths = value if isinstance(value[0], list) else [value]  # type: ignore[index]
    out: list[str] = []
    for path in paths:
        for name in path[1:] if len(path) > 1 else path:
            name = str(name).strip()
            if name and name not in out:
                out.append(name)
    return out


def meta_to_item(record: dict, layout: str) -> tuple[str, object, list[str], object] | None:
    """One metadata record as ``(item_id, title, categories, description)`` (cleaned by ``items_frame``);
    ``None`` when it has no item id."""
    if layout == "2023":
        item_id = record.get("parent_asin")
        cats = _flat_categories(record.get("categories")) or [c for c in [record.get("main_category")] if c]
    else:
        item_id = record.get("asin")
        cats = _flat_categories(record.get("categories") or record.get("category"))
    if not item_id:
        return None
    return str(item_id), record.get("title"), cats, record.get("description")


def read_amazon(paths: list[Path], ctx: ReadContext) -> RawData:
    """Read Amazon review files (and their metadata files when present)."""
    files = list_files(paths, "amazon")
    reviews = [f for f in files if REVIEW_FILE.match(f.name) and not META_FILE.match(f.name)]
    metas = [f for f in files if META_FILE.match(f.name)]
    if not reviews:
        raise InputError(f"no Amazon review file among the inputs ({describe_found(files)}); expected {EXPECTED}")
    layouts, events = set(), []
    for path in reviews:
        layout, rows = first_record_layout(path, ctx, detect_layout)
        layouts.add(layout)
        events.append(records_to_events(rows, FIELDS[layout], path, ctx, ms_timestamps=layout == "2023"))
    if len(layouts) > 1:
        raise InputError(f"review files mix Amazon layouts {sorted(layouts)}; prepare each layout separately")
    layout = layouts.pop()
    items = []
    for path in metas:
        for lineno, record in iter_records(path, ctx, parse=parse_meta_line, what="JSON or Python dict"):
            item = meta_to_item(record, layout)
            if item is None:
                ctx.skips.add("missing required field", path, lineno, "field 'asin'/'parent_asin': expected a value")
            else:
                items.append(item)
    items, merged = items_frame(items)
    return RawData(events=pl.concat(events), items=items, layout=layout, files=reviews + metas, merged_items=merged)
