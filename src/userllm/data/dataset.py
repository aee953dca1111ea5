"""Loading a prepared dataset directory (the output of ``userllm prepare``).

===================  ======================================================================================
file                 contents
===================  ======================================================================================
events.parquet       the normalized events after filtering, ordered by user then time, with ``user_idx``,
                     ``pos`` (0-based position in the user's timeline), ``item_idx`` and ``rating_idx``
items.parquet        one row per item of the vocabulary, ordered by ``item_idx`` (2..): ``item_id``,
                     ``title``, ``categories``, ``description``, ``category_idx`` (list), ``has_metadata``
sequences.parquet    one row per user, ordered by ``user_idx``: ``user_id`` and the aligned lists
                     ``item_idx``, ``rating_idx``, ``timestamp`` (chronological), ``length``
examples.parquet     labelled targets: ``split`` (train/valid/test), ``user_idx``, ``target_pos``;
                     history = the user's events ``[history_start, target_pos)``; labels ``target_item``,
                     ``target_rating``, ``favorite_category`` (index, null if none), ``review_text``/``summary``
vocab.json           the rating and category vocabularies (index = position; 0 = ``<pad>``, 1 = ``<unk>``)
manifest.json        provenance, filters with counts, vocabulary and split sizes, skipped rows, config
config.yaml          the resolved configuration
===================  ======================================================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import polars as pl

from userllm.errors import InputError

FILES = ("events.parquet", "items.parquet", "sequences.parquet", "examples.parquet", "vocab.json", "manifest.json")


@dataclass
class PreparedDataset:
    """A prepared dataset directory; tables load lazily on first use.

    Example::

        ds = PreparedDataset("outputs/ml-100k")
        seq = ds.sequences.row(0, named=True)      # user 0's timeline
        ds.item_titles[seq["item_idx"][-1]]         # title of their last item
    """

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        missing = [f for f in FILES if not (self.root / f).is_file()]
        if missing:
            raise InputError(
                f"{self.root} is not a prepared dataset (missing {', '.join(missing)}); create it with `userllm prepare`"
            )

    @cached_property
    def manifest(self) -> dict:
        return json.loads((self.root / "manifest.json").read_text())

    @cached_property
    def vocab(self) -> dict:
        return json.loads((self.root / "vocab.json").read_text())

    @cached_property
    def events(self) -> pl.DataFrame:
        return pl.read_parquet(self.root / "events.parquet")

    @cached_property
    def items(self) -> pl.DataFrame:
        return pl.read_parquet(self.root / "items.parquet")

    @cached_property
    def sequences(self) -> pl.DataFrame:
        return pl.read_parquet(self.root / "sequences.parquet")

    @cached_property
    def examples(self) -> pl.DataFrame:
        return pl.read_parquet(self.root / "examples.parquet")

    @property
    def num_items(self) -> int:
        """Size of the item vocabulary, specials included (valid item indices are 2..num_items-1)."""
        return self.manifest["vocab_sizes"]["item"]

    @cached_property
    def item_titles(self) -> list[str]:
        """Title per item index (``<pad>``, ``<unk>`` for 0 and 1)."""
        return ["<pad>", "<unk>", *self.items.get_column("title").to_list()]

    @cached_property
    def item_categories(self) -> list[list[int]]:
        """Category indices per item index."""
        return [[0], [1], *self.items.get_column("category_idx").to_list()]
