"""``UserContextCache``: serve users from cached user-side state (beyond the paper).

The user's side of a User-LLM request (encoder -> projector (+ item words) -> Perceiver -> cross-attention keys/values)
does not depend on the question asked. The cache keeps, per user, the events it was computed from, the
encoder's outputs and its key/value state, the context the LLM reads and every cross-attention block's
keys/values (:class:`~userllm.llm.base.UserContext`). A request for the same events is a hit and skips
all user-side work; a request whose events extend the cached ones appends only the new events with the
encoder's incremental update (cost linear in the history), recomputing only what depends on all events
(the Perceiver latents, the encoder's candidates, and their keys/values); anything else is recomputed. Timelines longer than the
encoder's ``max_len`` keep their last ``max_len`` events, recomputed when the window slides.

On disk (``directory``): ``index.json`` (per user: shard, event count, checksum, model fingerprint) and
``shard-NNNNN.safetensors`` files written by :meth:`flush` (only the entries changed since the last flush;
shards no entry refers to are deleted). With ``bf16`` the contexts are computed under bf16 autocast and
the fingerprint says so. An entry whose model fingerprint differs (another encoder or connector
checkpoint, or the other precision) is stale; one whose shard is missing, unreadable or fails its checksum is corrupt;
both are recomputed, never served.

Example::

    cache = UserContextCache(model, "cache/")
    ctx = cache.get("user-42", events)            # events: encoder inputs of one timeline, (1, n) each
    tokens = model.generate(None, input_ids, attention_mask, context=ctx, max_new_tokens=16)
    cache.flush()
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from userllm.encoder.model import EncoderState
from userllm.io import state_hash, write_json
from userllm.llm.base import UserContext
from userllm.llm.connectors import ContextKV
from userllm.llm.model import UserLLM
from userllm.precision import autocast

EVENT_KEYS = ("item", "rating", "time_gap")


def model_fingerprint(model: UserLLM) -> str:
    """sha256 of every weight on the user side: encoder, projector, Perceiver, cross-attention blocks."""
    side = nn.ModuleDict({"encoder": model.encoder, "projector": model.projector, "xattn": model.xattn})
    for name in ("perceiver", "item_words", "candidates"):
        if getattr(model, name) is not None:
            side[name] = getattr(model, name)
    return state_hash(side)


def checksum(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def entry_bytes(entry: dict[str, Tensor]) -> int:
    """Bytes a user's cached entry holds (encoder state, context, cross-attention keys/values)."""
    return sum(t.nbytes for t in entry.values())


class UserContextCache:
    """Per-user :class:`UserContext` with incremental updates, in memory and optionally on disk (see module)."""

    def __init__(
        self,
        model: UserLLM,
        directory: str | Path | None = None,
        *,
        bf16: bool = False,
        budget_bytes: int | None = None,
    ) -> None:
        """``budget_bytes``: the most the entries in memory may hold; beyond it the least recently used users'
        are dropped from memory (written to ``directory`` first, when there is one). None: no limit."""
        self.model = model
        self.budget = budget_bytes
        self.bytes = 0  # what the entries in memory hold
        self.bf16 = bf16  # contexts computed under bf16 autocast (on the model's device type)
        self.fingerprint = model_fingerprint(model) + ("+bf16" if bf16 else "")
        self.dir = Path(directory) if directory is not None else None
        self.entries: dict[str, dict[str, Tensor]] = {}  # user -> flat tensors of its entry
        self.dirty: set[str] = set()
        self.index: dict[str, dict] = {}
        self.stats: Counter = Counter()  # hit, append, miss, stale, corrupt
        self.forgotten = False  # entries dropped since the last flush (the index on disk still lists them)
        if self.dir is not None and (self.dir / "index.json").exists():
            self.index = json.loads((self.dir / "index.json").read_text())

    # ----------------------------------------------------------------- serving
    @torch.no_grad()
    def get(self, user: str, events: dict[str, Tensor]) -> UserContext:
        """The user's context for timeline ``events`` (``item``, ``rating``, ``time_gap``: (1, n) each)."""
        return self.get_many({user: events})[user]

    @torch.no_grad()
    def get_many(self, timelines: dict[str, dict[str, Tensor]]) -> dict[str, UserContext]:
        """:meth:`get` for several users at once: ``{user: events}`` -> ``{user: context}``. Users whose
        context must be computed from scratch (new, or their window slid: every refresh of a timeline longer
        than ``max_len``) are encoded together, one batch per timeline length (no padding: each row is the
        computation :meth:`get` makes for that user, equal up to the rounding of batched matrix products);
        hits and incremental appends are per user."""
        with autocast(self.bf16, next(self.model.parameters()).device.type):
            return self._get_many(timelines)

    def _get_many(self, timelines: dict[str, dict[str, Tensor]]) -> dict[str, UserContext]:
        out: dict[str, UserContext] = {}
        misses: dict[int, list[tuple[str, dict[str, Tensor]]]] = {}  # timeline length -> users to compute
        for user, events in timelines.items():
            events = {k: events[k][:, -self.model.encoder.cfg.max_len :] for k in EVENT_KEYS}
            entry = self.entries.get(user) if user in self.entries else self._load(user)
            if entry is not None:
                n = entry["item"].shape[1]
                same = all(torch.equal(entry[k], events[k][:, :n]) for k in EVENT_KEYS) and events["item"].shape[1] >= n
                if same and events["item"].shape[1] == n:
                    self.stats["hit"] += 1
                    self.entries[user] = self.entries.pop(user)  # the most recently used last
                    out[user] = self._context(entry)
                    continue
                if same:
                    self.stats["append"] += 1
                    out[user] = self._store(user, self._append(entry, {k: v[:, n:] for k, v in events.items()}))
                    continue
            self.stats["miss"] += 1
            misses.setdefault(events["item"].shape[1], []).append((user, events))
        for group in misses.values():
            batch = self._compute({k: torch.cat([events[k] for _, events in group]) for k in EVENT_KEYS})
            for row, (user, _) in enumerate(group):  # each user's own tensors (not views of the batch)
                one = batch if len(group) == 1 else {name: t[row : row + 1].clone() for name, t in batch.items()}
                out[user] = self._store(user, one)
        return out

    def cached(self, user: str) -> UserContext | None:
        """The user's context as last computed, without checking their events (a caller that knows they
        have not changed, e.g. by a store fingerprint); ``None`` when not in memory. Counts as a hit."""
        entry = self.entries.get(user)
        if entry is None:
            return None
        self.stats["hit"] += 1
        self.entries[user] = self.entries.pop(user)  # the most recently used last
        return self._context(entry)

    def forget(self, user: str) -> None:
        """Drop the user's entry, from memory now and from the index on disk at the next :meth:`flush`."""
        self._drop(user)
        if self.index.pop(user, None) is not None:
            self.forgotten = True

    def _encode(self, events: dict[str, Tensor], state: EncoderState) -> Tensor:
        """The encoder's outputs for ``events`` after ``state``, in eval mode (switched only when needed:
        toggling a whole LLM's mode costs more than encoding a short timeline)."""
        was = self.model.encoder.training
        if was:
            self.model.encoder.eval()
        try:
            return self.model.encoder(events, state)[0]
        finally:
            if was:
                self.model.encoder.train()

    def _compute(self, events: dict[str, Tensor]) -> dict[str, Tensor]:
        state = EncoderState()
        h = self._encode(dict(events), state)
        return self._finish(dict(events), h, state)

    def _append(self, entry: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
        state = self._encoder_state(entry)
        h_new = self._encode(new, state)
        events = {k: torch.cat([entry[k], new[k]], 1) for k in EVENT_KEYS}
        h = torch.cat([entry["h"], h_new], 1)
        if self.model.perceiver is None and self.model.candidates is None:  # per-event context: only the new events
            ctx_new = self.model.event_context(h_new, new["item"])
            out = {
                **events,
                "h": h,
                "ctx": torch.cat([entry["ctx"], ctx_new], 1),
                "mask": torch.cat([entry["mask"], new["item"] > 0], 1),
            }
            for key, block in self.model.xattn.items():
                k, v = block.attn.context_kv(ctx_new)
                out[f"kv.{key}.k"] = torch.cat([entry[f"kv.{key}.k"], k], 2)
                out[f"kv.{key}.v"] = torch.cat([entry[f"kv.{key}.v"], v], 2)
            return out | self._state_tensors(state)
        return self._finish(events, h, state)

    def _finish(self, events: dict[str, Tensor], h: Tensor, state: EncoderState) -> dict[str, Tensor]:
        ctx, mask = self.model.context_from_embeddings(h, events["item"] > 0, events["item"])
        context = self.model.user_state(ctx=ctx, mask=mask)
        out = {**events, "h": h, "ctx": context.ctx, "mask": context.mask}
        for key, (k, v) in context.kv.items():
            out[f"kv.{key}.k"], out[f"kv.{key}.v"] = k, v
        return out | self._state_tensors(state)

    @staticmethod
    def _state_tensors(state: EncoderState) -> dict[str, Tensor]:
        return {
            f"enc.{stack}.{i}.{j}": t
            for stack, layers in state.kv.items()
            for i, kv in enumerate(layers)
            for j, t in enumerate(kv)
        }

    @staticmethod
    def _encoder_state(entry: dict[str, Tensor]) -> EncoderState:
        layers: dict[str, dict[int, list]] = {}
        for name, t in entry.items():
            if name.startswith("enc."):
                _, stack, i, j = name.split(".")
                layers.setdefault(stack, {}).setdefault(int(i), [None, None])[int(j)] = t
        kv = {stack: [tuple(layers[stack][i]) for i in sorted(layers[stack])] for stack in layers}
        return EncoderState(kv=kv, length=entry["item"].shape[1])

    @staticmethod
    def _context(entry: dict[str, Tensor]) -> UserContext:
        kv = {
            name.split(".")[1]: ContextKV(entry[name], entry[name[:-1] + "v"])
            for name in entry
            if name.startswith("kv.") and name.endswith(".k")
        }
        return UserContext(entry["ctx"], entry["mask"], kv)

    def _store(self, user: str, entry: dict[str, Tensor]) -> UserContext:
        self._drop(user)
        self.entries[user] = entry  # the most recently used last
        self.bytes += entry_bytes(entry)
        self.dirty.add(user)
        while self.budget is not None and self.bytes > self.budget and len(self.entries) > 1:
            old = next(iter(self.entries))
            if old in self.dirty and self.dir is not None:
                self.flush()
            self._drop(old)
            self.stats["evicted"] += 1
        return self._context(entry)

    def _drop(self, user: str) -> None:
        entry = self.entries.pop(user, None)
        if entry is not None:
            self.bytes -= entry_bytes(entry)
            self.dirty.discard(user)

    # ----------------------------------------------------------------- disk
    def _load(self, user: str) -> dict[str, Tensor] | None:
        info = self.index.get(user)
        if info is None or self.dir is None:
            return None
        if info["fingerprint"] != self.fingerprint:
            self.stats["stale"] += 1
            return None
        try:
            with safe_open(self.dir / info["shard"], framework="pt") as f:
                prefix = f"{info['slot']}/"
                entry = {name[len(prefix) :]: f.get_tensor(name) for name in f.keys() if name.startswith(prefix)}
        except Exception:  # missing or unreadable shard: recompute, never serve
            self.stats["corrupt"] += 1
            return None
        if not entry or checksum(entry) != info["checksum"]:
            self.stats["corrupt"] += 1
            return None
        self.entries[user] = entry
        self.bytes += entry_bytes(entry)
        return entry

    def flush(self) -> None:
        """Write the entries changed since the last flush to a new shard and the index, atomically."""
        if self.dir is None or not (self.dirty or self.forgotten):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.dirty:
            number = 1 + max((int(p.stem.split("-")[1]) for p in self.dir.glob("shard-*.safetensors")), default=-1)
            shard = f"shard-{number:05d}.safetensors"
            tensors = {}
            for slot, user in enumerate(sorted(self.dirty)):
                entry = self.entries[user]
                tensors |= {f"{slot}/{name}": t.contiguous() for name, t in entry.items()}
                self.index[user] = {
                    "shard": shard,
                    "slot": slot,
                    "events": int(entry["item"].shape[1]),
                    "checksum": checksum(entry),
                    "fingerprint": self.fingerprint,
                }
            tmp = self.dir / f".{shard}.tmp"
            save_file(tensors, tmp)
            tmp.replace(self.dir / shard)
        write_json(self.dir / "index.json", self.index)
        self.forgotten = False
        used = {info["shard"] for info in self.index.values()}
        for path in self.dir.glob("shard-*.safetensors"):
            if path.name not in used:
                path.unlink()
        self.dirty.clear()
