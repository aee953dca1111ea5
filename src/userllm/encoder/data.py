"""From a prepared dataset to encoder tensors: training windows and evaluation batches.

Timelines are right-padded to the batch's longest window (index 0 = padding). Each event carries ``item``,
``rating`` and ``time_gap`` indices; categories and item text are looked up from the item by the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from userllm.data.dataset import PreparedDataset


def time_gap_buckets(timestamps: np.ndarray, starts: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bucket of the seconds since the previous event of the same user.

    ``1`` (unknown) for a user's first event, else ``2 + floor(log2(gap + 1))`` clipped to ``num_buckets - 1``.
    ``starts`` marks the first event of each user (bool, same length).
    """
    gap = np.diff(timestamps, prepend=timestamps[:1]).clip(min=0)
    bucket = 2 + np.floor(np.log2(gap.astype(np.float64) + 1)).astype(np.int64)
    bucket = bucket.clip(max=num_buckets - 1)
    bucket[starts] = 1
    return bucket


@dataclass
class Timelines:
    """All users' events as flat arrays, ordered by user then time; user ``u`` spans ``offsets[u]:offsets[u]+lengths[u]``."""

    item: np.ndarray
    rating: np.ndarray
    time_gap: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray
    num_gap_buckets: int = 24  # what ``time_gap`` was bucketed into (an encoder reads its own count)

    @classmethod
    def from_dataset(cls, ds: PreparedDataset, num_gap_buckets: int = 24) -> Timelines:
        ev = ds.events.select("item_idx", "rating_idx", "timestamp", "pos")
        pos = ev.get_column("pos").to_numpy()
        lengths = ds.sequences.get_column("length").to_numpy().astype(np.int64)
        return cls(
            item=ev.get_column("item_idx").to_numpy().astype(np.int64),
            rating=ev.get_column("rating_idx").to_numpy().astype(np.int64),
            time_gap=time_gap_buckets(ev.get_column("timestamp").to_numpy(), pos == 0, num_gap_buckets),
            lengths=lengths,
            offsets=np.cumsum(lengths) - lengths,
            num_gap_buckets=num_gap_buckets,
        )

    @property
    def num_users(self) -> int:
        return len(self.lengths)

    def collate(
        self,
        users: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
        loss_from: np.ndarray | None = None,
        device: str | torch.device = "cpu",
    ) -> dict[str, Tensor]:
        """Windows ``[start, end)`` of each user's timeline, right-padded: (b, n) tensors.

        With ``loss_from`` also ``target_item`` / ``target_rating``: the event after each position, taken
        from ``[start+1, end+1)``, and 0 (no loss) before position ``loss_from`` of the window.
        """
        targets = loss_from is not None
        n = int((ends - starts).max())
        out = {}
        arrays = {"item": self.item, "rating": self.rating, "time_gap": self.time_gap}
        if targets:
            arrays |= {"target_item": self.item, "target_rating": self.rating}
        idx = np.arange(n)[None, :]
        valid = idx < (ends - starts)[:, None]
        for name, arr in arrays.items():
            shift = 1 if name.startswith("target_") else 0
            rows = self.offsets[users][:, None] + starts[:, None] + idx + shift
            keep = valid & (idx >= loss_from[:, None]) if shift else valid
            out[name] = torch.from_numpy(np.where(keep, arr[np.where(valid, rows, 0)], 0)).to(device)
        return out


def train_windows(
    tl: Timelines, max_len: int, rng: np.random.Generator, stride: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Windows that score every train target exactly once: (users, starts, ends, loss_from).

    A user's train part is events ``[0, n-2)`` (valid = n-2, test = n-1); its inputs ``[0, n-3)`` predict
    ``[1, n-2)``. Windows of up to ``max_len`` inputs end every ``stride`` events, going back from the end
    of the part after a random shift (a different tiling every epoch, from ``rng``). A window's loss counts
    only its positions from ``loss_from`` on (the ones no later window scores), so with ``stride <
    max_len`` every scored target sees at least ``max_len - stride`` events of context, as at evaluation.
    """
    stride = min(stride or max_len, max_len)
    users, starts, ends, loss_from = [], [], [], []
    for u, n in enumerate(tl.lengths):
        last = int(n) - 3  # inputs end (exclusive) so that the last target is n-3
        if last < 1:
            continue
        end = last - (int(rng.integers(0, stride)) if last > max_len else 0)
        if end < last:  # the tail after the shifted cut
            users.append(u), starts.append(max(0, last - max_len)), ends.append(last)
            loss_from.append(end - max(0, last - max_len))
        while end > 0:
            start = max(0, end - max_len)
            users.append(u), starts.append(start), ends.append(end)
            loss_from.append(0 if start == 0 else max(0, end - stride - start))
            if start == 0:
                break
            end -= stride
    return tuple(np.asarray(a, dtype=np.int64) for a in (users, starts, ends, loss_from))  # type: ignore[return-value]


def eval_inputs(tl: Timelines, split: str, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(users, starts, ends, targets) for ``valid`` (target n-2) or ``test`` (target n-1).

    The history is the up-to-``max_len`` events before the target (the test history includes the valid event).
    """
    offset = {"valid": 2, "test": 1}[split]
    users = np.arange(tl.num_users)
    target_pos = tl.lengths - offset
    starts = np.maximum(target_pos - max_len, 0)
    return users, starts, target_pos, tl.item[tl.offsets + target_pos]


def history_items(tl: Timelines, users: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs of every item a user interacted with before ``ends`` (the full history, not a window)."""
    counts = ends
    rows = np.repeat(np.arange(len(users)), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, tl.item[np.repeat(tl.offsets[users], counts) + within]
