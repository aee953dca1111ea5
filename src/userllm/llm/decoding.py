"""Decoding for conditioned LLMs: greedy/sampled generation and beam search constrained to a token trie.

Both work on a *prefix* (embeddings (b, t, d) and attention mask (b, t), left-padded) and a model that
offers ``llm`` (the backbone, called step by step with its KV cache) and ``context_rows(rows)`` (a context
manager under which the decoded batch is those rows of the prefix batch, e.g. each row once per beam: any
per-row user context, such as cross-attention keys/values, is selected to match). ``UserLLM.conditioned`` and
``TextPromptLM.conditioned`` provide both, so User-LLM and the text-prompt baseline decode with the same code.

Example::

    trie = TokenTrie([tokenizer(t, add_special_tokens=False).input_ids for t in titles], eos_token_id=eos)
    with model.conditioned(user_batch, input_ids, attention_mask) as (embeds, mask):
        ranked = constrained_beam_search(model, embeds, mask, trie, beams=10)   # [[(title index, log p), ...]]
        exact = rank_sequences(model, embeds, mask, [trie.sequences] * len(mask), eos_token_id=eos)  # every title
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from userllm.llm.backbone import base_model


def positions(mask: Tensor) -> Tensor:
    """Position ids that skip padding: (b, t) attention mask -> cumulative count - 1, 0 on padding."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def llm_step(llm, embeds: Tensor, mask: Tensor, cache) -> tuple[Tensor, object]:
    """Run the new ``embeds`` (b, s, d) with the cache of everything before; ``mask`` (b, t) covers all t
    positions. Returns the last position's logits (b, V) in float32 and the updated cache."""
    pos = positions(mask)[:, -embeds.shape[1] :]
    keep = {"logits_to_keep": 1} if keeps_last_logits(llm) else {}  # no vocabulary projection of the whole prompt
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, **keep)
    return out.logits[:, -1].float(), out.cache


@lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def keeps_last_logits(llm) -> bool:
    """Whether the backbone (under any PEFT wrapper) can compute the logits of the last position only."""
    return _forward_takes_logits_to_keep(type(base_model(llm)))


# From this many prefix positions, a left-padded batch is prefilled one row at a time without its padding: a
# prompt without a mask takes the causal path of PyTorch's CPU flash attention, about twice as fast as the
# masked one, and at TP's 200-event prompts (1,500-4,300 tokens) the attention is most of the prefill.
PER_ROW_PREFILL_FROM = 1024


@torch.no_grad()
def prefill(
    model, embeds: Tensor, mask: Tensor, *, copies: int = 1, per_row_from: int = PER_ROW_PREFILL_FROM
) -> list[tuple[Tensor, object]]:
    """Run the prefix (embeds (b, t, d), mask (b, t)) once: ``copies`` independent ``(logits (b, V), cache)``
    pairs for :func:`iter_tokens` / :func:`constrained_beam_search` (``prefilled=``), so that two decodings
    of one long prompt (e.g. TP's beam search and its greedy answer) pay for its prefill once. From
    ``per_row_from`` positions a left-padded batch (each row's padding before its tokens) is run row by row
    without the padding, under :meth:`context_rows`, and the rows' caches are left-padded back into the
    batch's layout (the padded entries are masked by ``mask`` in every later step): the same logits and
    cache as one padded call, up to float rounding."""
    b, t = mask.shape
    lengths = mask.sum(1).tolist() if b > 1 and t >= per_row_from else [t]  # short prompts: no check per row
    padded = min(lengths) < t and all(bool(mask[r, t - n :].all()) for r, n in enumerate(lengths))  # on the left
    if not padded:
        logits, cache = llm_step(model.llm, embeds, mask, None)
    else:
        rows = []
        for r, n in enumerate(lengths):
            with model.context_rows(torch.tensor([r], device=mask.device)):
                rows.append(llm_step(model.llm, embeds[r : r + 1, t - n :], mask[r : r + 1, t - n :], None))
        logits, cache = torch.cat([row[0] for row in rows]), rows[0][1]
        for i, layer in enumerate(cache.layers):  # (1, heads, n, head dim) per row -> (b, heads, t, head dim)
            layer.keys, layer.values = (
                torch.cat(
                    [
                        nn.functional.pad(getattr(row[1].layers[i], part), (0, 0, t - n, 0))
                        for row, n in zip(rows, lengths)
                    ]
                )
                for part in ("keys", "values")
            )
    return [(logits, cache)] + [(logits, copy.deepcopy(cache)) for _ in range(copies - 1)]


def _append(mask: Tensor) -> Tensor:
    return torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)], 1)


def sample_token(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row of ``logits`` (b, V): the argmax at ``temperature`` 0, else a draw from
    softmax(logits / temperature) restricted to the ``top_k`` most likely tokens (0: all) and to the smallest
    set whose probability reaches ``top_p`` (nucleus sampling; 1: all)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus is full
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def iter_tokens(
    model,
    embeds: Tensor,
    mask: Tensor,
    choose,
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    use_cache: bool = True,
    prefilled: tuple[Tensor, object] | None = None,
) -> Iterator[Tensor]:
    """The new tokens (b,) after the prefix, one step at a time; ``choose(logits (b, V)) -> tokens (b,)``.
    After ``eos_token_id`` a row emits ``pad_token_id``; it stops when every row has ended or after
    ``max_new_tokens`` (a caller may stop earlier: e.g. a server streaming rows with their own limits).
    ``prefilled``: the prefix already run, ``(logits, cache)`` as :func:`prefill` returns them (the cache is
    extended in place: pass a copy to decode the same prefix again)."""
    llm, embed = model.llm, model.llm.get_input_embeddings()
    done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    cache, step_embeds = None, embeds
    for step in range(max_new_tokens):
        if step == 0 and prefilled is not None:
            logits, cache = prefilled
        elif use_cache:
            logits, cache = (
                llm_step(llm, step_embeds, mask, cache) if cache is not None else prefill(model, embeds, mask)[0]
            )
        else:
            logits = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask), use_cache=False)
            logits = logits.logits[:, -1].float()
        token = torch.where(done, torch.full_like(done, pad_token_id, dtype=torch.long), choose(logits))
        yield token
        if eos_token_id is not None:
            done |= token == eos_token_id
            if done.all():
                return
        step_embeds = embed(token[:, None])
        embeds = torch.cat([embeds, step_embeds], 1)
        mask = _append(mask)


@torch.no_grad()
def generate_tokens(
    model,
    embeds: Tensor,
    mask: Tensor,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    prefilled: tuple[Tensor, object] | None = None,
) -> Tensor:
    """New tokens (b, <= max_new_tokens) after the prefix: greedy, or sampling with temperature / top-k /
    top-p (:func:`sample_token`); see :func:`iter_tokens` (and its ``prefilled``). ``use_cache=False``
    recomputes the whole sequence at every step (slow; for checking the cache)."""
    t = temperature if do_sample else 0.0
    choose = lambda logits: sample_token(logits, temperature=t, top_p=top_p, top_k=top_k, generator=generator)  # noqa: E731
    steps = iter_tokens(
        model,
        embeds,
        mask,
        choose,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=use_cache,
        prefilled=prefilled,
    )
    return torch.stack(list(steps), 1)


@dataclass
class TokenTrie:
    """A trie over token sequences (e.g. every catalogue title), each ended by ``eos_token_id``.

    ``children(node)`` lists the allowed next tokens; following ``eos_token_id`` from a node completes
    sequence ``ends[node]`` (its index in the list given). Identical sequences keep the first index.
    """

    sequences: list[list[int]]
    eos_token_id: int
    nodes: list[dict[int, int]] = field(default_factory=lambda: [{}])
    ends: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for index, tokens in enumerate(self.sequences):
            node = 0
            for t in tokens:
                nxt = self.nodes[node].get(t)
                if nxt is None:
                    nxt = self.nodes[node][t] = len(self.nodes)
                    self.nodes.append({})
                node = nxt
            self.nodes[node].setdefault(self.eos_token_id, -1)  # -1: completion, not a node
            self.ends.setdefault(node, index)

    def children(self, node: int) -> list[int]:
        return list(self.nodes[node])


@torch.no_grad()
def constrained_beam_search(
    model,
    embeds: Tensor,
    mask: Tensor,
    trie: TokenTrie | Sequence[TokenTrie],
    *,
    beams: int,
    max_steps: int | None = None,
    prefilled: tuple[Tensor, object] | None = None,
) -> list[list[tuple[int, float]]]:
    """The ``beams`` most likely complete trie sequences for each prefix: per row ``[(index, log p), ...]``,
    best first. Every answer is a sequence of the trie (e.g. a real catalogue title). ``trie`` is one trie
    for every row, or one per row (e.g. each user's shortlist; the tries share ``eos_token_id``); with at
    least as many beams as a row's sequences the search ranks all of them exactly.

    Scores are summed token log-probabilities (eos included). The prefix is run once per row (or given,
    ``prefilled``, see :func:`prefill`); its KV cache (and the model's user context, via
    ``model.context_rows``) is then repeated for the beams. :func:`rank_sequences` ranks every sequence
    exactly, at the cost of one batched forward of all of them.
    """
    llm, embed = model.llm, model.llm.get_input_embeddings()
    b, device, k = embeds.shape[0], embeds.device, beams
    tries = [trie] * b if isinstance(trie, TokenTrie) else list(trie)
    if len(tries) != b:
        raise ValueError(f"{len(tries)} tries for {b} rows")
    eos = tries[0].eos_token_id
    logits, cache = prefilled if prefilled is not None else prefill(model, embeds, mask)[0]
    logp = logits.float().log_softmax(-1)
    finished: list[list[tuple[float, int]]] = [[] for _ in range(b)]
    # beam state per row r of (b*k): trie node, score; start: all k beams of a prefix at the root, one alive
    node = torch.zeros(b * k, dtype=torch.long)
    score = torch.full((b * k,), float("-inf"))
    score[::k] = 0.0
    logp = logp.repeat_interleave(k, 0)
    cache.batch_repeat_interleave(k)
    mask = mask.repeat_interleave(k, 0)
    limit = max_steps or 1 + max(len(s) for t in tries for s in t.sequences)
    with model.context_rows(torch.arange(b, device=device).repeat_interleave(k)):
        for _ in range(limit):
            allowed = torch.full_like(logp, float("-inf"))
            for r in range(b * k):
                if score[r] > float("-inf"):
                    allowed[r, tries[r // k].children(int(node[r]))] = 0.0
            total = (score.to(device)[:, None] + logp + allowed).view(b, -1).cpu()  # (b, k*V)
            top = total.topk(min(2 * k, total.shape[1]), dim=1)
            new_node = torch.zeros(b * k, dtype=torch.long)
            new_score = torch.full((b * k,), float("-inf"))
            source = torch.arange(b * k)  # the beam each new beam continues (for the cache)
            new_token = torch.full((b * k,), eos, dtype=torch.long)
            for i in range(b):
                filled = 0
                for s, flat in zip(top.values[i].tolist(), top.indices[i].tolist()):
                    if s == float("-inf") or filled == k:
                        break
                    beam, token = divmod(flat, logp.shape[1])
                    parent = i * k + beam
                    if token == eos:
                        finished[i].append((s, tries[i].ends[int(node[parent])]))
                        continue
                    r = i * k + filled
                    new_node[r] = tries[i].nodes[int(node[parent])][token]
                    new_score[r], source[r], new_token[r] = s, parent, token
                    filled += 1
            node, score = new_node, new_score
            # stop when every row has k answers that no live beam can beat (scores only fall)
            best_live = score.view(b, k).max(1).values
            if all(
                best_live[i] == float("-inf") or (len(f) >= k and sorted(f, reverse=True)[k - 1][0] >= best_live[i])
                for i, f in enumerate(finished)
            ):
                break
            cache.reorder_cache(source.to(device))
            mask = _append(mask)
            logits, cache = llm_step(llm, embed(new_token.to(device)[:, None]), mask, cache)
            logp = logits.float().log_softmax(-1)
    return [[(index, s) for s, index in sorted(f, reverse=True)[:k]] for f in finished]


@torch.no_grad()
def rank_sequences(
    model,
    embeds: Tensor,
    mask: Tensor,
    sequences: Sequence[Sequence[Sequence[int]]],
    *,
    eos_token_id: int,
    prefilled: tuple[Tensor, object] | None = None,
) -> list[list[tuple[int, float]]]:
    """Every sequence of each prefix row, ranked exactly: per row ``[(index, log p), ...]`` over all of
    ``sequences[row]``, best first, where log p is the teacher-forced log-probability of the sequence followed
    by ``eos_token_id`` after the prefix (embeds (b, t, d), mask (b, t)): the score
    :func:`constrained_beam_search` ranks by, which it finds exactly only with as many beams as sequences.

    The prefix is run once (or given, ``prefilled``, see :func:`prefill`; its cache is used up). Then each
    row's sequences are packed into one continuation (b, w) and run in one forward after the prefix's cache,
    under a 4D attention mask where each sequence sees the prefix and its own earlier tokens only, at the
    positions right after the prefix: no copy of the prefix's cache per sequence, and each token is computed
    once (a beam search runs one step per token for every beam)."""
    llm, embed = model.llm, model.llm.get_input_embeddings()
    b, t = mask.shape
    if len(sequences) != b or any(len(row) == 0 or any(len(s) == 0 for s in row) for row in sequences):
        raise ValueError(f"rank_sequences needs one non-empty list of non-empty sequences per prefix row ({b} rows)")
    logits, cache = prefilled if prefilled is not None else prefill(model, embeds, mask)[0]
    first = logits.float().log_softmax(-1)  # (b, V): the log-probability of each sequence's first token
    w, device = max(sum(map(len, row)) for row in sequences), mask.device
    tokens = torch.full((b, w), eos_token_id, dtype=torch.long)
    target = torch.full((b, w), eos_token_id, dtype=torch.long)  # the token each position predicts
    seq = torch.full((b, w), -1, dtype=torch.long)  # which sequence of its row a position holds (-1: padding)
    offset = torch.zeros(b, w, dtype=torch.long)  # its place in that sequence
    for r, row in enumerate(sequences):
        at = 0
        for j, s in enumerate(row):
            n = len(s)
            tokens[r, at : at + n], target[r, at : at + n] = torch.tensor(s), torch.tensor([*s[1:], eos_token_id])
            seq[r, at : at + n], offset[r, at : at + n] = j, torch.arange(n)
            at += n
    # (b, w, w): a query sees the keys of its own sequence up to itself; padding sees only itself
    own = (seq[:, :, None] == seq[:, None, :]) & (offset[:, None, :] <= offset[:, :, None]) & (seq[:, :, None] >= 0)
    own |= torch.eye(w, dtype=torch.bool)
    seen = torch.cat([mask.bool().cpu()[:, None, :].expand(b, w, t), own], 2)[:, None]  # (b, 1, w, t + w)
    bias = torch.zeros(seen.shape, dtype=embeds.dtype).masked_fill(~seen, torch.finfo(embeds.dtype).min)
    pos = positions(mask)[:, -1:] + 1 + offset.to(device)
    out = llm(
        inputs_embeds=embed(tokens.to(device)),
        attention_mask=bias.to(device),
        position_ids=pos,
        cache=cache,
        use_cache=True,
    ).logits.float()
    later = (out.gather(2, target.to(device)[..., None])[..., 0] - out.logsumexp(-1)).cpu()  # (b, w)
    ranked = []
    for r, row in enumerate(sequences):
        total = torch.zeros(len(row)).index_add_(0, seq[r].clamp(min=0), later[r] * (seq[r] >= 0))
        total += first[r, [s[0] for s in row]].cpu()
        ranked.append(sorted(enumerate(total.tolist()), key=lambda x: -x[1]))
    return ranked
