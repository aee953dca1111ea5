"""The model side of ``userllm serve``: a trained run answering batches of chat requests for users whose
events are in the store.

All model work runs on one worker thread (:attr:`Engine.executor`), off the server's event loop. A chat
request reads its user's fingerprint from the store (count and newest event id); when it differs from the
one the cached context was computed from, the user's newest events are read and the context is brought up
to date (``UserContextCache``: an incremental update when events were appended, else a recompute), so no
answer reads a context older than the store's committed events, whichever process appended them.
Appends through this server also refresh the cached context on the model thread (:meth:`Engine.schedule_refresh`:
at once, at most once a ``refresh_interval`` per user while events stream in), in batches: every user whose
refresh is due when the model thread gets to it is encoded together.

Each request of a batch keeps its own sampling (temperature, top_p, seed), token limit and stop strings;
its tokens are handed to the request as they are decoded (streaming), through ``Job.emit``.
"""

from __future__ import annotations

import heapq
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from userllm.errors import ConfigError
from userllm.llm.budget import batch_for, inference_bytes
from userllm.llm.cache import UserContextCache
from userllm.llm.prefix_cache import PrefixCache
from userllm.memory import memory_budget
from userllm.precision import autocast
from userllm.serve.decoding import Decoding
from userllm.serve.jobs import Conditioning, Job
from userllm.serve.metrics import Metrics
from userllm.serve.protocol import APIError, check_weights
from userllm.serve.store import EventStore, Fingerprint
from userllm.serve.timeline import RunVocabulary
from userllm.tasks import prompts
from userllm.tasks.pipeline import Pipeline


class Engine(Decoding):
    """A trained run (User-LLM or TP) over an event store. A request reads the user's newest ``max_history``
    events (the run's); ``cache_dir``: keep the users' contexts on disk as well; ``refresh_interval``: the
    shortest time between two refreshes of one user's context after appends (:meth:`schedule_refresh`), in
    seconds of ``clock`` (monotonic time; tests pass one they advance by hand);
    ``weights``: ``float32`` (as trained and evaluated) or ``int4`` (the backbone's decoder layers as 4-bit
    weights, :mod:`userllm.llm.quant`: ~1.8x faster decoding on CPU; :attr:`quantized` is the report);
    ``bf16``: compute under bf16 autocast, the users' contexts included (None: as the run trained, as
    ``userllm evaluate`` scores it); ``max_memory_gb``: what one batch's decoding may take, GiB (None:
    :func:`~userllm.memory.usable_bytes` when it starts): a batch whose KV caches would not fit it is decoded
    in parts that do."""

    def __init__(
        self,
        run_dir: Path,
        store: EventStore,
        *,
        cache_dir: Path | None = None,
        metrics: Metrics | None = None,
        refresh_interval: float = 1.0,
        weights: str = "float32",
        bf16: bool | None = None,
        cache_bytes: int | None = None,
        max_memory_gb: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_weights(weights)
        self.run_dir = Path(run_dir)
        run = Pipeline.from_pretrained(self.run_dir, bf16=bf16)
        self.cfg, self.model, self.data = run.cfg, run.model, run.data
        self.weights = weights
        self.bf16 = self.cfg.bf16
        self.quantized = self.model.quantize_backbone() if weights == "int4" else None
        self.store = store
        self.metrics = metrics or Metrics()
        self.method = self.cfg.method
        self.name = f"userllm-{self.run_dir.name}"
        self.tokenizer = self.data.tokenizer
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos
        gaps = self.model.encoder.cfg.time_gap_buckets if self.method == "userllm" else 24
        self.vocab = RunVocabulary(self.data.ds, gaps)
        self.max_history = self.cfg.max_history
        self.listing = self.data.candidate_encoder if self.data.candidates else None  # TP's listed candidates
        self.listing_vocab = RunVocabulary(self.data.ds, self.listing.cfg.time_gap_buckets) if self.listing else None
        userllm = self.method == "userllm"
        self.cache = (
            UserContextCache(self.model, cache_dir, bf16=self.bf16, budget_bytes=cache_bytes) if userllm else None
        )
        self.prefix_cache = PrefixCache(cache_bytes) if cache_bytes and not userllm else None  # TP's history prefix
        self.fingerprints: dict[str, Fingerprint] = {}  # user -> the store state their cached context reflects
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="userllm-model")
        self.refresh_interval = refresh_interval
        self.clock = clock
        self.pending: set[str] = set()  # users with a refresh scheduled
        self.ready: set[str] = set()  # users whose refresh is due, for the next batch (:meth:`_refresh`)
        self.refresh_queued = False  # a batch of refreshes waits on the model thread
        self.refreshed: dict[str, float] = {}  # user -> when their last refresh started (monotonic)
        self.due: list[tuple[float, str]] = []  # heap of delayed refreshes (when, user), run by one timer thread
        self.lock = threading.Condition()  # pending, refreshed, due
        self.timer: threading.Thread | None = None
        self.closed = False
        self.inflight: set[Job] = set()  # jobs the model thread is decoding (ended on shutdown)
        llm_config = getattr(self.model.llm, "config", None)
        self.context_length = getattr(llm_config, "max_position_embeddings", None)  # the model's context
        self.max_memory_gb = max_memory_gb

    # ----------------------------------------------------------------- memory
    def memory_budget(self) -> tuple[int, str]:
        """The bytes a batch's decoding may take now, and where the figure comes from."""
        return memory_budget(self.max_memory_gb, "--max-memory-gb")

    def batch_fits(self, tokens: int, most: int) -> int:
        """How many chats of up to ``tokens`` positions (prompt and completion) decode together within the
        budget (:func:`~userllm.llm.budget.inference_bytes`): at least 1, at most ``most``."""
        return batch_for(self.model, tokens, self.memory_budget()[0], 1, most)

    def check_memory(self, tokens: int) -> None:
        """Refuse to start (:class:`ConfigError`, exit 2) where one chat of ``tokens`` positions, the longest
        the server accepts, would not fit the memory budget, naming both and what to change."""
        need, (budget, where) = inference_bytes(self.model, tokens), self.memory_budget()
        if need > budget:
            raise ConfigError(
                f"one chat of {tokens:,} tokens (the longest prompt accepted and --max-tokens) needs about "
                f"{need / 2**20:,.0f} MiB to decode; {where} leaves {budget / 2**20:,.0f} MiB. Accept shorter "
                "prompts (--max-prompt-tokens, --max-tokens), or give the server more memory"
            )

    # ----------------------------------------------------------------- user side (model thread)
    def context(self, user: str, *, refresh: bool = False) -> Conditioning:
        """The user's :class:`Conditioning` from their committed events (a user without events: no context, no
        lines, 0 events). ``refresh``: called after appends, not by a request (a context found current is not
        counted as a request's cache hit)."""
        return self.contexts([user], refresh=refresh)[user]

    def contexts(self, users: list[str], *, refresh: bool = False) -> dict[str, Conditioning]:
        """:meth:`context` for several users: the User-LLM contexts that must be computed are computed in one
        batch (:meth:`UserContextCache.get_many`), e.g. every user refreshed after a burst of appends."""
        out: dict[str, Conditioning] = {}
        timelines, counts, prints = {}, {}, {}
        for user in dict.fromkeys(users):
            if self.cache is not None:
                fp = self.store.fingerprint(user)
                cached = self.cache.cached(user) if fp.count and self.fingerprints.get(user) == fp else None
                if cached is not None:
                    if not refresh:
                        self.metrics.inc("userllm_context_total", result="hit")
                    out[user] = Conditioning(context=cached, events=min(fp.count, self.max_history))
                    continue
            fp, rows, before = self.window(user)
            if not rows:
                out[user] = Conditioning()
            elif self.cache is None:
                listed = None
                if self.listing is not None:
                    inputs = self.listing_vocab.encoder_inputs(rows, before)
                    with autocast(self.bf16):
                        top = self.listing.next_items(inputs, self.data.candidates, self.data.exclude_history)[0]
                    listed = [self.data.ds.item_titles[i] for i in top.tolist()]
                out[user] = Conditioning(lines=self.vocab.history_lines(rows), candidates=listed, events=len(rows))
            else:
                timelines[user], counts[user], prints[user] = self.vocab.encoder_inputs(rows, before), len(rows), fp
        if timelines:
            before = dict(self.cache.stats)
            computed = self.cache.get_many(timelines)
            for result, n in self.cache.stats.items():
                if n > before.get(result, 0) and not (refresh and result == "hit"):
                    self.metrics.inc("userllm_context_total", n - before.get(result, 0), result=result)
            for user, ctx in computed.items():
                self.fingerprints[user] = prints[user]
                out[user] = Conditioning(context=ctx, events=counts[user])
        return out

    def window(self, user: str) -> tuple[Fingerprint, list[dict], dict | None]:
        """The user's store fingerprint, their newest ``max_history`` events (oldest first; the window a
        request reads, as training's history window before a target) and the event just before it (None
        when the window starts at their first event)."""
        fp, rows = self.store.timeline(user, last=self.max_history + 1)
        return (fp, rows[1:], rows[0]) if len(rows) > self.max_history else (fp, rows, None)

    def prompt_tokens(self, user: str | None, messages: list[dict[str, str]]) -> int:
        """How many positions a chat's prompt takes, counted as :meth:`_decode` will build it (the TP history
        written out; a soft prompt's context entries), without any model work; a TP run's listed candidates
        are not counted."""
        lines, entries = None, 0
        if user is not None and self.method == "textprompt":
            _, rows, _ = self.window(user)
            lines = self.vocab.history_lines(rows) if rows else None
        elif user is not None and self.cfg.llm.mode == "soft_prompt":
            llm = self.cfg.llm
            entries = (
                llm.perceiver_latents or min(self.store.fingerprint(user).count, self.max_history) + llm.candidates
            )
        text = prompts.render_chat(self.tokenizer, messages, lines, self.data.words, None)
        return len(self.tokenizer(text, add_special_tokens=False).input_ids) + entries

    def schedule_refresh(self, user: str) -> None:
        """Bring the user's cached context up to date on the model thread after an append: at once, or, for a
        user refreshed less than ``refresh_interval`` seconds ago, that long after the last refresh (appends
        in between coalesce into one refresh: a user streaming events costs one recompute per interval)."""
        if self.cache is None:
            return
        with self.lock:
            if user in self.pending:
                return
            self.pending.add(user)
            due = self.refreshed.get(user, -float("inf")) + self.refresh_interval
            if due > self.clock():  # later: one timer thread serves every delayed refresh (not a thread per user)
                heapq.heappush(self.due, (due, user))
                if self.timer is None:
                    self.timer = threading.Thread(target=self._timer, name="userllm-refresh-timer", daemon=True)
                    self.timer.start()
                self.lock.notify()
                return
        self._submit_refresh(user)

    def _timer(self) -> None:
        while True:
            with self.lock:
                while not self.closed and (not self.due or self.due[0][0] > self.clock()):
                    self.lock.wait(self.due[0][0] - self.clock() if self.due else None)
                if self.closed:
                    return
                user = heapq.heappop(self.due)[1]
            self._submit_refresh(user)

    def _submit_refresh(self, user: str) -> None:
        """Queue the user for the next batch of refreshes; one batch job waits on the model thread at a time,
        and it takes every user queued by the time it runs (:meth:`contexts` computes them together)."""
        with self.lock:
            self.ready.add(user)
            if self.refresh_queued:
                return
            self.refresh_queued = True
        try:
            self.executor.submit(self._refresh)
        except RuntimeError:  # the server is shutting down: nothing left to refresh for
            pass

    def _refresh(self) -> None:
        with self.lock:
            users, self.ready, self.refresh_queued = sorted(self.ready), set(), False
            now = self.clock()
            for user in users:
                self.pending.discard(user)
                self.refreshed[user] = now
        self.metrics.observe("userllm_refresh_batch_size", len(users))
        self.contexts(users, refresh=True)

    def forget(self, user: str) -> None:
        """Drop the user's cached context (after their events were deleted)."""
        self.fingerprints.pop(user, None)
        if self.cache is not None:
            self.cache.forget(user)

    # ----------------------------------------------------------------- decoding (model thread)
    def run_batch(self, jobs: list[Job]) -> None:
        """Decode ``jobs`` together (users with a context, then any without, e.g. unpersonalized answers)."""
        jobs = [job for job in jobs if not self._ended(job)]
        if not jobs:
            return
        self.metrics.observe("userllm_batch_size", len(jobs))
        with self.lock:
            self.inflight.update(jobs)
        try:
            self._run_batch(jobs)
        finally:
            with self.lock:
                self.inflight.difference_update(jobs)

    def _ended(self, job: Job) -> bool:
        """Whether ``job`` must stop now: its client went away (counted, nothing sent), the server is shutting
        down (a 503) or its time limit passed (a 504). An ended job has been told so."""
        if job.cancelled == "client":
            self.metrics.inc("userllm_requests_abandoned_total")
            return True
        if job.cancelled == "shutdown" or self.closed:
            job.emit("error", APIError(503, "the server is shutting down; retry on another replica", code="shutdown"))
            return True
        if job.deadline is not None and self.clock() > job.deadline:
            self.metrics.inc("userllm_requests_timed_out_total")
            job.emit("error", APIError(504, "the request ran past the server's time limit", code="timeout"))
            return True
        return False

    def _run_batch(self, jobs: list[Job]) -> None:
        prepared = []
        try:  # the contexts the batch's users need are computed together
            found = self.contexts([job.user for job in jobs if job.user is not None])
        except Exception:  # noqa: BLE001 - one user at a time, so that only the failing requests get the error
            found = {}
        for job in jobs:
            try:
                c = (
                    Conditioning()
                    if job.user is None
                    else found[job.user]
                    if job.user in found
                    else self.context(job.user)
                )
                prepared.append((job, c))
            except Exception as e:  # noqa: BLE001 - the request gets the error, the server goes on
                job.emit("error", e)
        for group in ([p for p in prepared if p[1].context is not None], [p for p in prepared if p[1].context is None]):
            if group:
                try:
                    self._decode(group)
                except Exception as e:  # noqa: BLE001
                    for job, _ in group:
                        job.emit("error", e)

    def stop_decoding(self) -> None:
        """Shutting down: every request still decoding, or queued, ends at its next token with a 503."""
        with self.lock:
            self.closed = True
            for job in self.inflight:
                job.cancel("shutdown")
            self.lock.notify()

    def close(self) -> None:
        """Stop: requests still decoding end at their next token with a 503, queued ones never start, the
        cached contexts are written out (``cache_dir``) and the store is closed."""
        self.stop_decoding()
        self.executor.shutdown(wait=True)
        if self.cache is not None and self.cache.dir is not None:
            self.cache.flush()
        self.store.close()
        if self.cache is not None:
            self.cache.flush()
