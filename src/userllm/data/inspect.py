"""Readable views of a prepared dataset: the one-screen summary and example timelines."""

from __future__ import annotations

from datetime import datetime, timezone

import polars as pl
from rich.console import Group
from rich.table import Table

from userllm.data.dataset import PreparedDataset


def _counts_row(c: dict) -> list[str]:
    return [f"{c['events']:,}", f"{c['users']:,}", f"{c['items']:,}"]


def summary(manifest: dict) -> Group:
    """The one-screen summary printed at the end of ``prepare`` and by ``inspect``."""
    filters = Table(title=f"{manifest['source']} ({manifest['format']})", title_justify="left")
    for col in ("step", "parameters", "events", "users", "items"):
        filters.add_column(col, justify="right" if col in ("events", "users", "items") else "left")
    filters.add_row("input", "", *_counts_row(manifest["input_counts"]))
    for step in manifest["filters"]:
        params = ", ".join(f"{k}={v}" for k, v in step["params"].items() if k != "key")
        filters.add_row(step["name"], params, *_counts_row(step["after"]))

    facts = Table(show_header=False, box=None)
    facts.add_column(style="bold")
    facts.add_column()
    vs = manifest["vocab_sizes"]
    facts.add_row(
        "vocabularies",
        f"items {vs['item']:,}, ratings {vs['rating']}, categories {vs['category']:,} "
        "(sizes include <pad>=0 and <unk>=1)",
    )
    split = manifest["split"]
    facts.add_row("split events", ", ".join(f"{k} {v:,}" for k, v in split["events"].items()))
    facts.add_row(
        "examples",
        ", ".join(f"{k} {v:,}" for k, v in sorted(split["examples"].items()))
        + f" (history window <= {split['max_history']})",
    )
    for name, q in manifest["history_length"].items():
        facts.add_row(name.replace("_", " "), "  ".join(f"{k} {v:.4g}" for k, v in q.items()))
    if "item_titles" in manifest:  # (datasets prepared before it was counted have none)
        titles = manifest["item_titles"]
        merged = (
            f"; {titles['metadata_records_merged']:,} repeated metadata records merged"
            if titles["metadata_records_merged"]
            else ""
        )
        facts.add_row("item titles", ", ".join(f"{k} {v:,}" for k, v in titles["source"].items()) + merged)
    skipped = manifest["skipped"]
    facts.add_row("skipped rows", f"{skipped['total']:,}")
    for reason, info in skipped["by_reason"].items():
        facts.add_row(f"  {reason}", f"{info['count']:,}  e.g. " + "; ".join(info["examples"][:2]))
    return Group(filters, facts)


def timelines(ds: PreparedDataset, users: int = 3, events: int = 8, user_id: str | None = None) -> list[Table]:
    """The last ``events`` events of the first ``users`` users (or of ``user_id``), readable."""
    seqs = ds.sequences
    seqs = seqs.filter(pl.col("user_id") == user_id) if user_id is not None else seqs.head(users)
    categories, ratings = ds.vocab["category"], ds.vocab["rating"]
    tables = []
    for row in seqs.iter_rows(named=True):
        n = row["length"]
        table = Table(
            title=f"user {row['user_id']} — {n} events (last {min(events, n)} shown; test = last, valid = second last)",
            title_justify="left",
        )
        for col in ("#", "date", "title", "rating", "categories", "split"):
            table.add_column(col)
        for pos in range(max(0, n - events), n):
            item = row["item_idx"][pos]
            when = datetime.fromtimestamp(row["timestamp"][pos], tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
            split = "test" if pos == n - 1 else "valid" if pos == n - 2 else "train"
            cats = ", ".join(categories[c] for c in ds.item_categories[item])
            table.add_row(str(pos), when, ds.item_titles[item], ratings[row["rating_idx"][pos]], cats, split)
        tables.append(table)
    return tables
