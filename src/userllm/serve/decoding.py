"""The model side of a served batch: chat requests decoded together (or, for a TP run with a prefix cache,
each on its user's cached history prefix), streamed token by token with each request's own sampling, stop
strings and limits, and dropped from the batch when its client goes or its time runs out. A batch whose KV
caches would not fit the memory is decoded in parts that do, shorter prompts together."""

from __future__ import annotations

import torch

from userllm.llm.base import UserContext
from userllm.llm.decoding import iter_tokens, llm_step, sample_token
from userllm.precision import autocast
from userllm.serve.jobs import Conditioning, Job, Row
from userllm.tasks import prompts


class Decoding:
    """The decoding half of :class:`~userllm.serve.engine.Engine` (which holds the model, the tokenizer, the
    caches and the metrics this uses)."""

    def _chooser(self, rows: list[Row]):
        """Each row's next token by its own sampling (temperature, top_p, seed)."""

        def choose(logits: torch.Tensor) -> torch.Tensor:
            return torch.stack(
                [
                    sample_token(
                        logits[i : i + 1], temperature=r.job.temperature, top_p=r.job.top_p, generator=r.generator
                    )[0]
                    for i, r in enumerate(rows)
                ]
            )

        return choose

    @torch.no_grad()
    def _decode_prefix_cached(self, job: Job, c: Conditioning) -> None:
        """A TP request on its user's cached history prefix (:class:`PrefixCache`): only the tokens the cached
        prefix does not hold are prefilled (the question, on a hit), and the prefix is kept for next time."""
        prefix, rest = prompts.render_chat_split(self.tokenizer, job.messages, c.lines, self.data.words, c.candidates)
        prefix_ids = self.tokenizer(prefix, add_special_tokens=False).input_ids
        ids = prefix_ids + self.tokenizer(rest, add_special_tokens=False).input_ids
        cache, reused = self.prefix_cache.lookup(job.user, prefix_ids) if job.user else (None, 0)
        result = "miss" if not reused else "hit" if reused == len(prefix_ids) else "extend"
        self.metrics.inc("userllm_prefix_cache_total", result=result)
        seed = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
        rows = [Row(job, len(ids), c.events, seed)]
        mask = torch.ones(1, len(ids), dtype=torch.long)
        eos = None if job.ignore_eos else self.eos
        with autocast(self.bf16):
            embeds = self.model.llm.get_input_embeddings()(torch.tensor([ids[reused:]]))
            prefilled = llm_step(self.model.llm, embeds, mask, cache)
            steps = iter_tokens(
                self.model,
                embeds,
                mask,
                self._chooser(rows),
                max_new_tokens=job.max_tokens,
                eos_token_id=eos,
                pad_token_id=self.pad,
                prefilled=prefilled,
            )
            self._stream(rows, steps)
        if job.user:
            self.prefix_cache.store(job.user, prefix_ids, prefilled[1])

    @torch.no_grad()
    def _decode(self, group: list[tuple]) -> None:
        if self.prefix_cache is not None:  # one request at a time, each on its user's cached prefix
            for job, c in group:
                self._decode_prefix_cached(job, c)
            return
        texts = [
            prompts.render_chat(self.tokenizer, job.messages, c.lines, self.data.words, c.candidates)
            for job, c in group
        ]
        seqs = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        t = max(len(s) for s in seqs)
        fit = self.batch_fits(t + max(job.max_tokens for job, _ in group), len(group)) if len(group) > 1 else 1
        if fit < len(group):  # their KV caches together would not fit the memory: shorter prompts together
            self.metrics.inc("userllm_batches_split_total")
            order = sorted(range(len(group)), key=lambda i: len(seqs[i]))
            for start in range(0, len(order), fit):
                self._decode([group[i] for i in order[start : start + fit]])
            return
        ids = torch.full((len(seqs), t), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, t - len(s) :], mask[r, t - len(s) :] = torch.tensor(s), 1
        contexts = [c.context for _, c in group]
        context = UserContext.stack(contexts) if contexts[0] is not None else None
        soft = self.cfg.llm.mode == "soft_prompt"
        rows = [
            Row(
                job,
                len(s) + (c.context.ctx.shape[1] if soft and c.context is not None else 0),
                c.events,
                torch.Generator().manual_seed(job.seed) if job.seed is not None else None,
            )
            for (job, c), s in zip(group, seqs)
        ]

        choose = self._chooser(rows)

        limit = max(r.job.max_tokens for r in rows)
        eos = None if all(r.job.ignore_eos for r in rows) else self.eos
        if context is None and self.method == "userllm":  # no user: the backbone alone, no cross-attention
            with autocast(self.bf16):
                prefix = (self.model.llm.get_input_embeddings()(ids), mask)
                steps = iter_tokens(
                    self.model, *prefix, choose, max_new_tokens=limit, eos_token_id=eos, pad_token_id=self.pad
                )
                self._stream(rows, steps)
        else:
            with autocast(self.bf16), self.model.conditioned(None, ids, mask, context=context) as (embeds, prefix_mask):
                steps = iter_tokens(
                    self.model,
                    embeds,
                    prefix_mask,
                    choose,
                    max_new_tokens=limit,
                    eos_token_id=eos,
                    pad_token_id=self.pad,
                )
                self._stream(rows, steps)

    def _stream(self, rows: list[Row], steps) -> None:
        for tokens in steps:
            for row, token in zip(rows, tokens.tolist()):
                if row.finish is not None:
                    continue
                if self._ended(row.job):  # dropped from the batch: the others decode on
                    row.finish = "ended"
                    continue
                if token == self.eos and not row.job.ignore_eos:
                    row.finish = "stop"
                else:
                    row.tokens.append(token)
                    text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
                    cut = min((text.find(s) for s in row.job.stop if s and s in text), default=-1)
                    if cut >= 0:
                        text, row.finish = text[:cut], "stop"
                    elif len(row.tokens) >= row.job.max_tokens:
                        row.finish = "length"
                    if not text.endswith("\ufffd") or row.finish:  # hold back half a UTF-8 character
                        if len(text) > len(row.sent) and text.startswith(row.sent):
                            row.job.emit("delta", text[len(row.sent) :])
                        row.sent = text
                if row.finish is not None:
                    self._finish(row)
            if all(r.finish is not None for r in rows):
                return  # every row done: the batch stops decoding, however long its longest request asked for
        for row in rows:
            if row.finish is None:
                row.finish = "length"
                self._finish(row)

    def _finish(self, row: Row) -> None:
        n = len(row.tokens)
        self.metrics.inc("userllm_generated_tokens_total", n)
        usage = {
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": row.prompt_tokens + n,
            "user_events": row.events,
        }
        row.job.emit("done", {"finish_reason": row.finish, "usage": usage})
