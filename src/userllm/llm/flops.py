"""Analytic FLOPs of a conditioned LLM: one request (prefill, generation) and one training example.

Matrix-multiply FLOPs, 2 per multiply-add; Llama-style backbone: hidden ``d``, ``L`` layers, key/value width
``d_kv``, gated MLP width ``f``, vocabulary ``V``. A forward of ``s`` new tokens
over ``S`` cached + new positions costs ``L (s (4 d^2 + 4 d d_kv + 6 d f) + 4 s S d) + 2 d V`` (logits of
the last position only). User-LLM adds: encoder ``n (2 d_in e + l_e 24 e^2) + l_e 4 n^2 e``; projector
``2 n (e d + d^2)``, and ``2 n d^2`` per item-words feature; the encoder's ``k`` candidates ``2 e V + 2 k d^2``
(context ``n + k``); Perceiver (``P`` latents, depth ``D``) ``D (4 P d^2 + 4 (n+P) d^2 + 4 P (n+P) d + 16 P d^2)``;
per cross-attention block (``k`` blocks, context ``m`` = n or P, ``h`` heads) the context keys/values
``4 m d^2`` once and ``s (4 d^2 + 4 m d + 4 r d^2)`` per forward of ``s`` tokens (``r`` = ff_mult); when
``h m < d`` and a prompt of ``t`` tokens pays for it (``t (d + m - h m) > m d``), generation folds the
keys/values into the query and output projections (``4 m d^2`` more once, then ``s (4 h m d + 4 r d^2)``
per forward; :meth:`~userllm.llm.connectors.MaskedCrossAttention.absorbs`). A soft prompt adds its ``m``
context positions to the prompt instead. Generating ``g`` tokens is the prefill plus ``g - 1`` one-token
forwards.

Training an example of ``t`` tokens counts 3 forwards of the whole sequence (forward + backward, whatever is
frozen), with logits at all ``t`` positions and the context never absorbed. ``userllm bench efficiency``
checks the request formula against ``torch.utils.flop_counter``.
"""

from __future__ import annotations

from types import SimpleNamespace

from torch import nn

from userllm.llm.base import ConditionedLM
from userllm.llm.model import UserLLM

GATED_MLP = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3"}


def llm_forward_flops(c, s: int, S: int) -> int:
    """Analytic FLOPs of one backbone forward of ``s`` new tokens over ``S`` positions (see module)."""
    per_token = 4 * c.hidden_size**2 + 4 * c.hidden_size * c.d_kv + 6 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (s * per_token + 4 * s * S * c.hidden_size) + 2 * c.hidden_size * c.vocab_size


def backbone_shape(cfg) -> SimpleNamespace:
    """What :func:`llm_forward_flops` reads of a backbone's config: hidden, key/value width, layers, MLP
    width, vocabulary."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return SimpleNamespace(
        hidden_size=cfg.hidden_size,
        d_kv=cfg.num_key_value_heads * head_dim,
        num_hidden_layers=cfg.num_hidden_layers,
        intermediate_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
    )


def analytic_flops(
    model: ConditionedLM, *, n_events: int, prompt_tokens: int, new_tokens: int, absorb: bool = True
) -> dict[str, int] | None:
    """{"prefill", "generate"} FLOPs of one request by the module formula; None for backbones outside
    the Llama-style (gated MLP) families. ``absorb=False``: the keys/values are never absorbed (training)."""
    cfg = model.llm.config
    if getattr(cfg, "model_type", None) not in GATED_MLP:
        return None
    heads = cfg.num_attention_heads
    c = backbone_shape(cfg)
    d, user, m, blocks, r, absorbed = cfg.hidden_size, 0, 0, 0, 0, False
    if isinstance(model, UserLLM):
        e = model.encoder.cfg
        d_in = len(e.features) * e.d_feature
        n = n_events
        user += n * (2 * d_in * e.d_model if d_in != e.d_model else 0) + e.n_layers * (
            n * 24 * e.d_model**2 + 4 * n * n * e.d_model
        )
        if "text" in e.features:
            user += 2 * n * e.text_dim * e.d_feature
        user += 2 * n * (e.d_model * d + d * d)
        if model.item_words is not None:
            user += 2 * n * d * d * len(model.item_words.names)
        m = n
        if model.candidates is not None:  # score the catalogue once after the last event, map k titles
            k = model.candidates.k  # k titles, each through a d x d map
            head = 0 if isinstance(model.encoder.item_head, nn.Identity) else 2 * e.d_model * e.d_feature
            user += head + 2 * e.d_feature * e.num_items + 2 * k * d * d
            m = n + k
        if model.perceiver is not None:
            P, depth = model.cfg.perceiver_latents, model.cfg.perceiver_depth
            user += depth * (4 * P * d * d + 4 * (m + P) * d * d + 4 * P * (m + P) * d + 16 * P * d * d)
            m = P
        blocks, r = len(model.xattn), model.cfg.ff_mult
        absorbed = absorb and blocks and next(iter(model.xattn.values())).attn.absorbs(m, prompt_tokens)
        user += blocks * 4 * m * d * d * (2 if absorbed else 1)
    soft = m if isinstance(model, UserLLM) and model.cfg.mode == "soft_prompt" else 0
    t = prompt_tokens + soft

    def xattn(s: int) -> int:
        attention = 4 * heads * m * d if absorbed else 4 * d * d + 4 * m * d
        return blocks * s * (attention + 4 * r * d * d)

    prefill = user + llm_forward_flops(c, t, t) + xattn(t)
    generate = prefill + sum(llm_forward_flops(c, 1, t + j) + xattn(1) for j in range(1, new_tokens))
    return {"prefill": prefill, "generate": generate}


def training_flops(model: ConditionedLM, *, n_events: int, tokens: int) -> int | None:
    """Analytic FLOPs of training on one example of ``tokens`` tokens (prompt + answer) and ``n_events``
    events: 3 forwards (forward + backward) of the whole sequence, logits at every position, no absorption."""
    c = model.llm.config
    once = analytic_flops(model, n_events=n_events, prompt_tokens=tokens, new_tokens=1, absorb=False)
    return None if once is None else 3 * (once["prefill"] + 2 * c.hidden_size * c.vocab_size * (tokens - 1))
