"""Google Local Reviews (Li et al. / Yan et al., UCSD): ``review-<State>*.json(.gz)`` + ``meta-<State>.json(.gz)``.

Reviews: user_id, gmap_id, rating, time (milliseconds), text. Metadata: gmap_id, name, category (list),
description. Both are JSON lines.
"""

from __future__ import annotations

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

FIELDS = {"user_id": "user_id", "item_id": "gmap_id", "rating": "rating", "timestamp": "time", "text": "text"}
REVIEW_FILE = re.compile(r"^review-.+\.json(?:\.gz)?$")
META_FILE = re.compile(r"^meta-.+\.json(?:\.gz)?$")


def detect_layout(record: dict, path: Path) -> str:
    """Check that review records have the Google Local fields."""
    if "gmap_id" in record and "user_id" in record:
        return "google-local"
    raise InputError(
        f"{path}: review records have fields {sorted(record)[:12]}, which do not match the Google Local layout "
        "(user_id, gmap_id, rating, time, text)"
    )


def read_google_local(paths: list[Path], ctx: ReadContext) -> RawData:
    """Read Google Local review files and their metadata files."""
    files = list_files(paths, "google-local")
    reviews = [f for f in files if REVIEW_FILE.match(f.name)]
    metas = [f for f in files if META_FILE.match(f.name)]
    if not reviews:
        raise InputError(
            f"no Google Local review file among the inputs ({describe_found(files)}); "
            "expected review-<State>.json(.gz) (+ meta-<State>.json(.gz))"
        )
    events = []
    for path in reviews:
        _, rows = first_record_layout(path, ctx, detect_layout)
        events.append(records_to_events(rows, FIELDS, path, ctx, ms_timestamps=True))
    items = []
    for path in metas:
        for lineno, record in iter_records(path, ctx):
            if not record.get("gmap_id"):
                ctx.skips.add("missing required field", path, lineno, "field 'gmap_id': expected a value")
                continue
            items.append(
                (str(record["gmap_id"]), record.get("name"), record.get("category") or [], record.get("description"))
            )
    items, merged = items_frame(items)
    return RawData(
        events=pl.concat(events), items=items, layout="google-local", files=reviews + metas, merged_items=merged
    )
