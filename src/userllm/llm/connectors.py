"""The connectors between the user encoder and the LLM, each one module named as in the papers.

- :class:`Projector`: user embeddings (b, n, d_enc) -> the LLM's width (b, n, d) (an MLP).
- :class:`PerceiverResampler` (Flamingo): ``num_latents`` learned queries attend to the user embeddings
  through ``depth`` blocks of cross-attention + feed-forward, compressing any timeline to (b, m, d).
  Padded events are masked out, so they never influence the latents.
- :class:`GatedCrossAttentionBlock` (Flamingo): the LLM's hidden states (b, t, d) attend to the user
  context (b, n, d); the attention and feed-forward outputs pass through ``tanh`` gates initialised to
  zero, so a freshly inserted block is the identity and the LLM starts exactly as it was.
- :class:`ItemWords` (beyond the paper): each event's item in the LLM's own language, the frozen mean of the
  backbone's input embeddings of its title's tokens (and of its categories' names), mapped into the context
  beside the projected user embeddings, so cross-attention can point at the tokens it has to write.
- :class:`EncoderCandidates` (beyond the paper): the encoder's top-k next items as extra context entries in the
  LLM's words, so the LLM can write what the encoder predicts.
- :class:`AbsorbedContext`: a fixed context folded into a block's query and output projections, so that
  serving a user costs each query token less (exact; see :meth:`MaskedCrossAttention.absorb`).

Example::

    proj = Projector(d_in=64, d_out=576)
    ctx = PerceiverResampler(dim=576, num_latents=16)(proj(user_emb), mask)     # (b, 16, 576)
    block = GatedCrossAttentionBlock(dim=576, heads=9)
    h = block(hidden, ctx, context_mask=torch.ones(b, 16, dtype=torch.bool))   # == hidden at init
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from userllm.encoder.model import top_items


class Projector(nn.Module):
    """Two-layer MLP from the encoder width to the LLM width: (b, n, d_in) -> (b, n, d_out)."""

    def __init__(self, *, d_in: int, d_out: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or d_out
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def mean_token_embeddings(tokenizer, embedding: nn.Embedding, texts: list[str]) -> Tensor:
    """(len(texts), d): the mean of ``embedding``'s rows for each text's tokens (zeros for an empty text)."""
    weight = embedding.weight.detach().float()
    out = torch.zeros(len(texts), weight.shape[1])
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False).input_ids if text else []
        if ids:
            out[i] = weight[ids].mean(0)
    return out


class ItemWords(nn.Module):
    """Item features in the LLM's own language: items (b, n) -> (b, n, d), added to the projected events.

    ``tables`` maps a feature name (``title``, ``category``) to a frozen (V, d) table, row i for item index i
    (e.g. :func:`mean_token_embeddings` of every title). Each feature has a learned linear map, initialised to
    the identity: at the start an event's context entry holds its words as the LLM embeds them. The tables are
    buffers (saved with the model; never trained).

    Example::

        words = ItemWords({"title": mean_token_embeddings(tok, llm.get_input_embeddings(), titles)})
        ctx = projector(h) + words(batch["item"])                        # (b, n, d)
    """

    def __init__(self, tables: dict[str, Tensor]) -> None:
        super().__init__()
        self.names = sorted(tables)
        self.maps = nn.ModuleDict()
        for name in self.names:
            d = tables[name].shape[1]
            self.register_buffer(f"table_{name}", tables[name].float(), persistent=True)
            self.maps[name] = nn.Linear(d, d, bias=False)
            nn.init.eye_(self.maps[name].weight)

    def forward(self, items: Tensor) -> Tensor:
        return sum(self.maps[name](getattr(self, f"table_{name}")[items]) for name in self.names)


class EncoderCandidates(nn.Module):
    """The user encoder's own next-item guesses, in the LLM's words (beyond the paper): the ``k`` items it
    scores highest after the last event, each one context entry (b, k, d) = its title's words (a frozen
    (V, d) table, e.g. :func:`mean_token_embeddings` of every title) through a linear map initialised to the
    identity, plus a learned embedding of its rank. Cross-attention can then copy a candidate's title tokens.

    Example::

        cand = EncoderCandidates(title_table, k=10)
        entries, valid = cand(encoder.item_logits(h_last))             # (b, 10, d), (b, 10)
    """

    def __init__(self, title_table: Tensor, k: int) -> None:
        super().__init__()
        d = title_table.shape[1]
        self.k = k
        self.register_buffer("table_title", title_table.float(), persistent=True)
        self.map = nn.Linear(d, d, bias=False)
        nn.init.eye_(self.map.weight)
        self.rank = nn.Parameter(torch.zeros(k, d))

    def forward(self, item_scores: Tensor, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """item_scores (b, V) over item indices (0 and 1, padding and unknown, are never chosen, nor the items
        of ``exclude`` (b, n)) -> entries (b, k, d) and their mask (b, k), all True."""
        top = top_items(item_scores, self.k, exclude)  # (b, k)
        entries = self.map(self.table_title[top]) + self.rank  # (b, k, d)
        return entries, torch.ones(top.shape, dtype=torch.bool, device=top.device)


def FeedForward(dim: int, mult: int = 4) -> nn.Sequential:  # noqa: N802 (a module factory, as in flamingo-pytorch)
    """Pre-LayerNorm MLP: (..., dim) -> (..., dim)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


class ContextKV(NamedTuple):
    """A context's keys and values, each (b, heads, n, d / heads)."""

    k: Tensor
    v: Tensor


class AbsorbedContext(NamedTuple):
    """A fixed context folded into the query and output projections (:meth:`MaskedCrossAttention.absorb`):
    ``qk`` (b, d, heads * n) maps a normed hidden state to attention scores, ``ov`` (b, heads * n, d) maps
    attention weights to the output, ``bias`` (b, 1, 1, n) is 0 for real entries and -inf for padding."""

    qk: Tensor
    ov: Tensor
    bias: Tensor


class MaskedCrossAttention(nn.Module):
    """Queries (b, t, d) attend to a context (b, n, d); ``context_mask`` (b, n) is True for real entries.

    ``kv`` (precomputed keys/values from :meth:`context_kv`, or their :meth:`absorb`-ed form) lets a decoder
    reuse them at every step. A query whose context is entirely masked receives zeros.

    """

    def __init__(self, *, dim: int, heads: int, dim_context: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim_context or dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def context_kv(self, context: Tensor) -> ContextKV:
        """Keys and values of a context (b, n, d) -> two (b, heads, n, d/heads)."""
        b, n, _ = context.shape
        k, v = self.to_kv(context).chunk(2, dim=-1)
        return ContextKV(*(t.view(b, n, self.heads, -1).transpose(1, 2) for t in (k, v)))

    def absorbs(self, n: int, tokens: int) -> bool:
        """Whether :meth:`absorb` saves FLOPs for a context of ``n`` entries read by ``tokens`` query tokens:
        per token its two (d, heads * n) products replace the (d, d) query and output projections and the
        attention over n entries (4 h n d instead of 4 d^2 + 4 n d), and absorbing costs 4 n d^2 once."""
        d = self.to_q.in_features
        return self.heads * n < d and tokens * (d + n - self.heads * n) > n * d

    def absorb(self, kv: ContextKV, context_mask: Tensor) -> AbsorbedContext:
        """Fold a fixed context's keys/values into the query and output projections (exact; once per call):
        scores_h = norm(x) Wq_h k_h^T / sqrt(d_h) = norm(x) qk_h and out = sum_h p_h v_h Wo_h^T = p ov.
        A row with no real entry gets bias 0 and ov 0, so its output is 0 as in :meth:`forward`."""
        k, v = kv
        h, e = self.heads, k.shape[-1]
        real = context_mask.to(torch.bool)
        empty = ~real.any(-1)  # (b,)
        qk = torch.einsum("hed,bhne->bdhn", self.to_q.weight.view(h, e, -1), k).flatten(2) * e**-0.5
        ov = torch.einsum("bhne,dhe->bhnd", v, self.to_out.weight.view(-1, h, e)).flatten(1, 2)
        ov = ov.masked_fill(empty[:, None, None], 0.0)
        bias = torch.zeros(real.shape, dtype=qk.dtype, device=qk.device).masked_fill(
            ~real & ~empty[:, None], float("-inf")
        )
        return AbsorbedContext(qk, ov, bias[:, None, None, :])

    def forward(
        self, x: Tensor, context: Tensor | None, context_mask: Tensor, kv: ContextKV | AbsorbedContext | None = None
    ) -> Tensor:
        b, t, d = x.shape
        if isinstance(kv, AbsorbedContext):
            scores = (self.norm(x) @ kv.qk).view(b, t, self.heads, -1) + kv.bias  # (b, t, heads, n)
            return scores.softmax(-1).view(b, t, -1) @ kv.ov
        q = self.to_q(self.norm(x)).view(b, t, self.heads, -1).transpose(1, 2)
        k, v = kv if kv is not None else self.context_kv(context)
        mask = context_mask[:, None, None, :].to(torch.bool)  # (b, 1, 1, n)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = torch.where(mask.any(-1, keepdim=True), y, torch.zeros_like(y))  # fully masked rows -> 0, not NaN
        return self.to_out(y.transpose(1, 2).reshape(b, t, d))


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated xattn-dense block: x + tanh(a) * xattn(x, ctx), then + tanh(f) * ffw(x).

    Both gates start at ``gate_init`` (0 by default, as in Flamingo), so the block starts as the identity.
    """

    def __init__(self, *, dim: int, heads: int, ff_mult: int = 4, gate_init: float = 0.0) -> None:
        super().__init__()
        self.attn = MaskedCrossAttention(dim=dim, heads=heads)
        self.attn_gate = nn.Parameter(torch.full((1,), gate_init))
        self.ff = FeedForward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.full((1,), gate_init))

    def forward(
        self, x: Tensor, context: Tensor | None, *, context_mask: Tensor, kv: ContextKV | AbsorbedContext | None = None
    ) -> Tensor:
        """x: (b, t, d) LLM hidden states; context: (b, n, d) user context (or ``kv`` precomputed)."""
        a = self.attn(x, context, context_mask, kv).to(x.dtype) * self.attn_gate.tanh().to(x.dtype)
        f = self.ff(x + a) * self.ff_gate.tanh().to(x.dtype)
        if self.training:  # how much each branch moves the hidden states, for the training log
            with torch.no_grad():
                size = x.norm(dim=-1).mean().clamp(min=1e-12)
                self.contribution = {k: v.norm(dim=-1).mean() / size for k, v in (("attn", a), ("ff", f))}
        return x + a + f

    def gate_report(self) -> dict[str, float]:
        """tanh of both gates and, from the last training forward, each gated branch's output norm relative to
        the hidden states' (mean over tokens)."""
        out = {"attn_gate": self.attn_gate.tanh().item(), "ff_gate": self.ff_gate.tanh().item()}
        for branch, value in getattr(self, "contribution", {}).items():
            out[f"{branch}_norm"] = float(value)
        return out


class PerceiverAttention(nn.Module):
    """Latents attend to [inputs; latents] (Flamingo's Perceiver Resampler attention)."""

    def __init__(self, *, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor, mask: Tensor) -> Tensor:
        """x: (b, n, d) inputs with mask (b, n); latents: (b, m, d) -> (b, m, d)."""
        b, m, d = latents.shape
        x, latents = self.norm_media(x), self.norm_latents(latents)
        kv_input = torch.cat([x, latents], 1)
        full_mask = torch.cat([mask.bool(), torch.ones(b, m, dtype=torch.bool, device=x.device)], 1)
        q = self.to_q(latents).view(b, m, self.heads, -1).transpose(1, 2)
        k, v = (t.view(b, -1, self.heads, d // self.heads).transpose(1, 2) for t in self.to_kv(kv_input).chunk(2, -1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=full_mask[:, None, None, :])
        return self.to_out(y.transpose(1, 2).reshape(b, m, d))


class PerceiverResampler(nn.Module):
    """Compress a variable-length user context (b, n, d) with mask (b, n) into (b, num_latents, d)."""

    def __init__(self, *, dim: int, num_latents: int = 16, depth: int = 2, heads: int = 8, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, heads=heads), FeedForward(dim, ff_mult)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        latents = self.latents[None].repeat(
            x.shape[0], 1, 1
        )  # a copy: a no-grad view of a parameter would still require grad
        for attn, ff in self.layers:
            latents = latents + attn(x, latents, mask)
            latents = latents + ff(latents)
        return self.norm(latents)
