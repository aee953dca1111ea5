"""Per-user KV caches of a text prompt's prefix, the way vLLM's automatic prefix caching or SGLang's
RadixAttention serve the text-prompt baseline: the keys and values of everything before the question (the
chat template's opening and the user's history written out) are kept, least recently used first out, under
a byte budget. A request reuses the longest run of tokens its prefix shares with the cached one: all of it
when the history is unchanged (only the question is prefilled), most of it when an event only added a line
at the end, little when the window slid and every line moved.

Example::

    cache = PrefixCache(budget_bytes=2**30)
    kv, reused = cache.lookup("42", prefix_ids)        # None, 0 on a miss
    ...                                                  # run prefix_ids[reused:] + the question on kv
    cache.store("42", prefix_ids, kv)                    # cropped back to the prefix
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass


def kv_bytes(cache) -> int:
    """Bytes of a backbone KV cache (every layer's keys and values)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def crop(cache, length: int) -> None:
    """Keep the first ``length`` positions of a backbone KV cache (in place)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Entry:
    ids: list[int]
    cache: object
    nbytes: int


class PrefixCache:
    """Users' prefix KV caches, LRU under ``budget_bytes`` (see module). ``stats`` counts lookups by result:
    ``hit`` (the whole prefix reused), ``extend`` (part of it), ``miss``."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0
        self.stats: Counter = Counter()

    def lookup(self, user: str, ids: list[int]) -> tuple[object | None, int]:
        """The user's cache, cropped to the longest run of tokens it shares with ``ids``, and that length
        (``None, 0`` when nothing is shared). The entry leaves the cache until :meth:`store` puts it back."""
        entry = self.entries.pop(user, None)
        if entry is not None:
            self.bytes -= entry.nbytes
        reused = common_prefix(entry.ids, ids) if entry is not None else 0
        if reused == 0:
            self.stats["miss"] += 1
            return None, 0
        crop(entry.cache, reused)
        self.stats["hit" if reused == len(ids) else "extend"] += 1
        return entry.cache, reused

    def store(self, user: str, ids: list[int], cache) -> None:
        """Keep ``cache`` (cropped to ``ids``, the prefix) as the user's, evicting the least recently used
        users' until the cache fits the budget; a prefix larger than the whole budget is not kept."""
        crop(cache, len(ids))
        nbytes = kv_bytes(cache)
        if nbytes > self.budget:
            return
        self.forget(user)
        self.entries[user] = Entry(list(ids), cache, nbytes)
        self.bytes += nbytes
        while self.bytes > self.budget:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes
            self.stats["evicted"] += 1

    def forget(self, user: str) -> None:
        entry = self.entries.pop(user, None)
        if entry is not None:
            self.bytes -= entry.nbytes
