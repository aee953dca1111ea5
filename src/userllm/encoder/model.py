"""The user encoder of User-LLM (stage 1): a causal Transformer that turns a timeline into per-event embeddings.

Every event has several features (item, rating bucket, categories, time-gap bucket, fixed item-text
embedding). They are fused either

- ``early``: the per-feature embeddings of an event are concatenated and projected to ``d_model``, and one
  causal Transformer runs over the fused sequence; or
- ``late``: one small causal Transformer runs per feature, and their outputs at each position are
  concatenated and fused by a linear layer to ``d_model``.

The output at position ``t`` summarizes events ``0..t`` (causal), and is trained to predict event ``t+1``
(next item over the catalogue, next rating bucket, next categories); items are scored by the dot product
of the output with their input embeddings, as in SASRec. ``features=["item"]`` is the SASRec-style
baseline. Timelines are right-padded (item index 0); because attention is causal, padding
never reaches a real event. Shapes: b = batch, n = events, d = d_model, V = items.

Example::

    enc = UserEncoder(EncoderConfig(num_items=1684, num_ratings=7, num_categories=20), item_categories=cats)
    h, mask = enc(batch)                     # (b, n, d), (b, n)
    logits = enc.item_logits(h)              # (b, n, V)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from userllm.config import EncoderConfig

KV = tuple[Tensor, Tensor]


@dataclass
class EncoderState:
    """Cached keys/values of every layer for the events seen so far (incremental encoding).

    ``kv[stack][layer] = (k, v)`` with shapes (b, heads, length, head_dim); ``length`` events are cached.
    """

    kv: dict[str, list[KV | None]] = field(default_factory=dict)
    length: int = 0


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's per-head slopes, the geometric sequence 2^(-8 h / H) for h = 1..H (Press et al., 2022): (H,)."""
    return torch.tensor([2.0 ** (-8.0 * h / n_heads) for h in range(1, n_heads + 1)])


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with an optional key/value cache.

    With ``alibi``, head h's score of query i for key j <= i is lowered by ``slope_h * (i - j)``: a recency
    bias that depends only on the distance, so a cached prefix and a shifted window read alike."""

    def __init__(self, *, d_model: int, n_heads: int, dropout: float, alibi: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.register_buffer("slopes", alibi_slopes(n_heads) if alibi else None, persistent=False)

    def forward(self, x: Tensor, past: KV | None = None) -> tuple[Tensor, KV]:
        """x: (b, n, d); past: cached (k, v) of earlier events. Returns (b, n, d) and the updated (k, v)."""
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2) for t in self.qkv(x).split(d, 2))
        p = self.dropout if self.training else 0.0
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        if past is None and self.slopes is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            start = k.shape[2] - n  # new queries sit at positions start..start+n-1
            dist = (
                start + torch.arange(n, device=x.device)[:, None] - torch.arange(k.shape[2], device=x.device)[None, :]
            )
            mask = dist >= 0  # (n, length)
            if self.slopes is not None:  # (H, n, length): -slope x distance where allowed, -inf elsewhere
                bias = -self.slopes.to(q.dtype)[:, None, None] * dist.to(q.dtype)
                mask = bias.masked_fill(~mask, float("-inf"))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(b, n, d)), (k, v)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, *, d_model: int, n_heads: int, dropout: float, alibi: bool = False) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model=d_model, n_heads=n_heads, dropout=dropout, alibi=alibi)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, past: KV | None = None) -> tuple[Tensor, KV]:
        a, kv = self.attn(self.ln1(x), past)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.ln2(x))), kv


class CausalTransformer(nn.Module):
    """Input projection, positions (learned embeddings, or ALiBi biases inside attention), causal blocks, final
    LayerNorm: (b, n, d_in) -> (b, n, d_model)."""

    def __init__(
        self,
        *,
        d_in: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        dropout: float,
        max_len: int,
        positions: str = "learned",
    ):
        super().__init__()
        self.max_len = max_len
        self.proj = nn.Linear(d_in, d_model) if d_in != d_model else nn.Identity()
        self.pos = nn.Embedding(max_len, d_model) if positions == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model=d_model, n_heads=n_heads, dropout=dropout, alibi=positions == "alibi")
            for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, past: list[KV | None] | None = None, start: int = 0) -> tuple[Tensor, list[KV]]:
        n = x.shape[1]
        if start + n > self.max_len:
            raise ValueError(f"timeline of {start + n} events is longer than max_len={self.max_len}")
        x = self.proj(x)
        if self.pos is not None:
            x = x + self.pos(torch.arange(start, start + n, device=x.device))
        x = self.drop(x)
        cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, past[i] if past else None)
            cache.append(kv)
        return self.ln_f(x), cache


class EventFeatures(nn.Module):
    """Per-feature embeddings of events: {feature: (b, n, d_feature)}.

    Categories are looked up from the item (``item_categories``: (V, c) category indices, 0-padded) and
    mean-pooled; the text feature projects a fixed (V, text_dim) table of item-text embeddings.
    """

    def __init__(self, cfg: EncoderConfig, item_categories: Tensor | None, item_text: Tensor | None) -> None:
        super().__init__()
        d, self.features = cfg.d_feature, list(cfg.features)
        self.item = nn.Embedding(cfg.num_items, d, padding_idx=0)
        if "rating" in self.features:
            self.rating = nn.Embedding(cfg.num_ratings, d, padding_idx=0)
        if "category" in self.features:
            if item_categories is None:
                raise ValueError("the 'category' feature needs item_categories (V, c)")
            self.category = nn.Embedding(cfg.num_categories, d, padding_idx=0)
        if "time_gap" in self.features:
            self.time_gap = nn.Embedding(cfg.time_gap_buckets, d, padding_idx=0)
        if "text" in self.features:
            if item_text is None or item_text.shape[1] != cfg.text_dim:
                raise ValueError(f"the 'text' feature needs item_text of shape (V, text_dim={cfg.text_dim})")
            self.text = nn.Linear(cfg.text_dim, d)
        cats = item_categories if item_categories is not None else torch.zeros(cfg.num_items, 1, dtype=torch.long)
        self.register_buffer("item_categories", cats.long(), persistent=True)
        text = item_text if item_text is not None else torch.zeros(cfg.num_items, 0)
        self.register_buffer("item_text", text.float(), persistent=True)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        items = batch["item"]
        out = {"item": self.item(items)}
        if "rating" in self.features:
            out["rating"] = self.rating(batch["rating"])
        if "category" in self.features:
            cats = self.item_categories[items]  # (b, n, c)
            present = (cats > 0).unsqueeze(-1).float()
            out["category"] = (self.category(cats) * present).sum(2) / present.sum(2).clamp(min=1)
        if "time_gap" in self.features:
            out["time_gap"] = self.time_gap(batch["time_gap"])
        if "text" in self.features:
            out["text"] = self.text(self.item_text[items])
        return {f: out[f] for f in self.features}


def last_output(h: Tensor, mask: Tensor) -> Tensor:
    """Each row's output after its last event: h (b, n, d), mask (b, n) -> (b, d) (the next-event prediction)."""
    return h[torch.arange(h.shape[0], device=h.device), (mask.sum(1) - 1).clamp(min=0)]


def top_items(scores: Tensor, k: int, exclude: Tensor | None = None) -> Tensor:
    """The ``k`` highest-scoring item indices per row of ``scores`` (b, V) -> (b, k), best first; padding and
    unknown (0, 1) are never chosen, nor the item indices of that row of ``exclude`` (b, n), e.g. the items of
    the history. ``scores`` is left unchanged."""
    scores = scores.detach().clone()
    if exclude is not None:
        scores.scatter_(1, exclude.long(), float("-inf"))
    scores[:, :2] = float("-inf")
    return scores.topk(k, dim=1).indices


class UserEncoder(nn.Module):
    """Timeline -> per-event user embeddings (b, n, d_model), with next-event prediction heads."""

    def __init__(self, cfg: EncoderConfig, *, item_categories: Tensor | None = None, item_text: Tensor | None = None):
        super().__init__()
        if "item" not in cfg.features:
            raise ValueError("the encoder needs the 'item' feature")
        if cfg.num_items < 3:
            raise ValueError("EncoderConfig.num_items must be set from the dataset (items + 2 specials)")
        self.cfg = cfg
        self.embed = EventFeatures(cfg, item_categories, item_text)
        kw = dict(
            d_model=cfg.d_model,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            dropout=cfg.dropout,
            max_len=cfg.max_len,
            positions=cfg.positions,
        )
        if cfg.fusion == "early":
            self.stacks = nn.ModuleDict({"fused": CausalTransformer(d_in=len(cfg.features) * cfg.d_feature, **kw)})
            self.fuse = nn.Identity()
        else:
            self.stacks = nn.ModuleDict({f: CausalTransformer(d_in=cfg.d_feature, **kw) for f in cfg.features})
            self.fuse = nn.Linear(len(cfg.features) * cfg.d_model, cfg.d_model)
        # scores items against the item embeddings: the output itself, as in SASRec, unless a head is asked for
        head = cfg.item_head or cfg.d_model != cfg.d_feature
        self.item_head = nn.Linear(cfg.d_model, cfg.d_feature) if head else nn.Identity()
        self.rating_head = nn.Linear(cfg.d_model, max(cfg.num_ratings, 1))
        self.category_head = nn.Linear(cfg.d_model, max(cfg.num_categories, 1))
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()

    def forward(self, batch: dict[str, Tensor], state: EncoderState | None = None) -> tuple[Tensor, Tensor]:
        """batch: ``item`` (b, n) and the other features' (b, n) indices -> embeddings (b, n, d), mask (b, n).

        With ``state`` the batch holds only new events, appended after the ``state.length`` cached ones; the
        state is updated in place, so each new event costs O(length) instead of re-encoding the timeline.
        """
        feats = self.embed(batch)
        start = state.length if state is not None else 0
        if self.cfg.fusion == "early":
            inputs = {"fused": torch.cat([feats[f] for f in self.cfg.features], -1)}
        else:
            inputs = feats
        outs = []
        for name, stack in self.stacks.items():
            h, kv = stack(inputs[name], state.kv.get(name) if state is not None else None, start)
            outs.append(h)
            if state is not None:
                state.kv[name] = kv
        if state is not None:
            state.length += batch["item"].shape[1]
        h = self.fuse(torch.cat(outs, -1)) if self.cfg.fusion == "late" else outs[0]
        return h, batch["item"] > 0

    @torch.no_grad()
    def encode(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Embeddings for a batch of timelines, in eval mode without gradients: (b, n, d), (b, n)."""
        was_training = self.training
        self.eval()
        try:
            return self(batch)
        finally:
            self.train(was_training)

    def set_dropout(self, p: float) -> None:
        """Use dropout ``p`` everywhere (embeddings, attention, MLP outputs), e.g. lower while stage 2 trains."""
        self.cfg = self.cfg.model_copy(update={"dropout": p})
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            elif isinstance(module, CausalSelfAttention):
                module.dropout = p

    def item_logits(self, h: Tensor, items: Tensor | None = None) -> Tensor:
        """Scores of the next item: (..., d) -> (..., V), or against ``items`` (k,) only -> (..., k)."""
        weight = self.embed.item.weight if items is None else self.embed.item.weight[items]
        return self.item_head(h) @ weight.T

    @torch.no_grad()
    def next_item_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """log p(next item) after each timeline's last event, over the catalogue: (b, V), padding and unknown
        (0, 1) at -inf. Eval mode."""
        logits = self.item_logits(last_output(*self.encode(batch))).float()
        logits[:, :2] = float("-inf")
        return torch.log_softmax(logits, -1)

    @torch.no_grad()
    def next_items(self, batch: dict[str, Tensor], k: int, exclude_history: bool = False) -> Tensor:
        """The ``k`` highest-scoring next items after each timeline's last event: item indices (b, k), best
        first; padding and unknown (0, 1) are never chosen, items already in the timeline only if not
        ``exclude_history``. Eval mode.

        Example::

            top = encoder.next_items({"item": items, "rating": ratings, "time_gap": gaps}, 20)   # (b, 20)
        """
        exclude = batch["item"] if exclude_history else None
        return top_items(self.item_logits(last_output(*self.encode(batch))), k, exclude)  # the raw scores' order

    def rating_logits(self, h: Tensor) -> Tensor:
        """(..., d) -> (..., num_ratings)."""
        return self.rating_head(h)

    def category_logits(self, h: Tensor) -> Tensor:
        """(..., d) -> (..., num_categories): independent (multi-label) logits."""
        return self.category_head(h)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
