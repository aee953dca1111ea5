"""Events from the store as a served run reads them: checked against the run's dataset (its item ids and
rating range) and turned into the encoder's inputs (User-LLM) or the history lines of the prompt (TP),
exactly as ``userllm prepare`` and the task data turn a prepared timeline into them."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from userllm.data.dataset import PreparedDataset
from userllm.encoder.data import time_gap_buckets
from userllm.tasks import prompts

UNK = 1


class RunVocabulary:
    """The dataset vocabulary of a served run: item ids -> item indices, ratings -> rating buckets."""

    def __init__(self, ds: PreparedDataset, num_gap_buckets: int = 24) -> None:
        self.ds = ds
        items = ds.items.select("item_id", "item_idx")
        self.item_index = dict(zip(items.get_column("item_id").to_list(), items.get_column("item_idx").to_list()))
        self.ratings = ds.vocab["rating"]
        self.rating_index = {r: i for i, r in enumerate(self.ratings)}
        self.step = float(ds.vocab.get("rating_bucket", 1.0))
        values = [float(r) for r in self.ratings[2:]]
        self.rating_range = (min(values), max(values)) if values else None
        self.categories = ds.vocab["category"]
        self.num_gap_buckets = num_gap_buckets

    def problems(self, events: list[dict]) -> list[tuple[str, str]]:
        """``(param, message)`` for each event field the run cannot read: an item not in its catalogue, a
        rating outside the dataset's range (``param`` is ``events[i].field``)."""
        out = []
        for i, e in enumerate(events):
            if e["item_id"] not in self.item_index:
                out.append(
                    (
                        f"events[{i}].item_id",
                        f"events[{i}].item_id: unknown item {e['item_id']!r} "
                        f"(not in the served run's dataset {self.ds.root.name})",
                    )
                )
            rating = e.get("rating")
            if rating is not None and self.rating_range and not self.rating_range[0] <= rating <= self.rating_range[1]:
                out.append(
                    (
                        f"events[{i}].rating",
                        f"events[{i}].rating: {rating} is outside the dataset's ratings "
                        f"{self.rating_range[0]:g}..{self.rating_range[1]:g}",
                    )
                )
        return out

    def rating_bucket(self, rating: float | None) -> int:
        """The rating's index as ``prepare`` buckets it (``rating_token``: rounded to the bucket step)."""
        if rating is None:
            return UNK
        return self.rating_index.get(str(round(round(rating / self.step) * self.step, 6)), UNK)

    def encoder_inputs(self, rows: list[dict], before: dict | None = None) -> dict[str, Tensor]:
        """A window of a timeline (oldest first) as the encoder reads it: ``item``, ``rating``, ``time_gap``
        (1, n). ``before``: the user's event just before the window, if any: the window's first time gap is
        measured from it, as training measures every gap over the whole timeline (only a user's very first
        event has an unknown gap)."""
        stamps = np.array([r["timestamp"] for r in ([before] if before else []) + rows], dtype=np.int64)
        first = np.zeros(len(stamps), dtype=bool)
        first[:1] = True
        gaps = time_gap_buckets(stamps, first, self.num_gap_buckets)[len(stamps) - len(rows) :]
        return {
            "item": torch.tensor([[self.item_index.get(r["item_id"], UNK) for r in rows]], dtype=torch.long),
            "rating": torch.tensor([[self.rating_bucket(r["rating"]) for r in rows]], dtype=torch.long),
            "time_gap": torch.from_numpy(gaps)[None].long(),
        }

    def history_lines(self, rows: list[dict]) -> list[str]:
        """A timeline written out for the text-prompt baseline (one line per event, oldest first)."""
        lines = []
        for r in rows:
            i = self.item_index.get(r["item_id"], UNK)
            cats = [self.categories[c] for c in self.ds.item_categories[i] if c > 1]
            rating = "unknown" if r["rating"] is None else prompts.rating_text(r["rating"])
            lines.append(prompts.history_line(self.ds.item_titles[i], rating, cats))
        return lines
