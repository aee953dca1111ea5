"""How much memory training on one example takes, estimated before it runs, so that a run either fits the
machine or says so before it starts.

Back-propagating a decoder LLM keeps, per token, each layer's activations for the backward pass (the
attention's inputs and outputs, the residual stream, the norms, the gated MLP's three projections): about
``16 d + 4 f`` floats a layer (hidden ``d``, MLP width ``f``); the CPU's fused attention kernel keeps no
``t x t`` matrix. The loss holds the logits several times over (as computed, upcast to float32, their
log-softmax, its gradient): ``5 V`` floats a token (vocabulary ``V``). User-LLM's cross-attention blocks add
``6 d + 2 r d`` floats a token each (``r`` = ``ff_mult``). Everything is counted in float32; bf16 autocast
only lowers it. Calibrated on SmolLM2-135M: a TP prompt of 4,042 tokens took about 10 GiB above the loaded
model; the estimate is 10.6 GiB.

Example::

    per_example = training_bytes(model, tokens=3300)                # ~9 GiB for SmolLM2-135M
    micro = micro_batch_for(model, [3300] * 8, budget=16 * 2**30)    # examples per forward/backward
"""

from __future__ import annotations

from userllm.llm.model import UserLLM


def training_bytes(model, tokens: int) -> int:
    """The estimated peak memory of back-propagating one example of ``tokens`` tokens (see module)."""
    c = model.llm.config
    d, f, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    floats = tokens * layers * (16 * d + 4 * f) + 5 * tokens * vocab
    if isinstance(model, UserLLM) and model.xattn:
        floats += len(model.xattn) * tokens * (6 * d + 2 * model.cfg.ff_mult * d)
    return 4 * floats


def micro_batch_for(model, tokens: list[int], budget: int) -> int:
    """The most examples of a batch (their token counts ``tokens``, longest first) whose estimated memory
    together fits ``budget`` bytes; 0 when not even the longest fits."""
    need = sorted((training_bytes(model, t) for t in tokens), reverse=True)
    total, n = 0, 0
    for b in need:
        if total + b > budget:
            break
        total, n = total + b, n + 1
    return n


def inference_bytes(model, tokens: int, copies: int = 1) -> int:
    """The estimated peak memory of scoring one prompt of ``tokens`` tokens: ``copies`` KV caches of it (a
    beam search keeps one per beam) and one layer's activations at a time."""
    c = model.llm.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim
    return 4 * tokens * (copies * kv + 4 * c.hidden_size + 2 * c.intermediate_size) + 8 * c.vocab_size


def batch_for(model, tokens: int, budget: int, copies: int, most: int) -> int:
    """How many prompts of ``tokens`` tokens (the longest of a batch) fit ``budget`` bytes together, at least
    1 and at most ``most``."""
    return max(1, min(most, budget // max(1, inference_bytes(model, tokens, copies))))
