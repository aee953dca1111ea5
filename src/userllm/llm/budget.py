"""How much memory training on one example, or scoring one prompt, takes, estimated before it runs, so that
a run either fits the machine or says so before it starts.

Back-propagating a decoder LLM keeps, per token, each layer's activations for the backward pass (the
attention's inputs and outputs, the residual stream, the norms, the gated MLP's three projections): about
``16 d + 4 f`` floats a layer (hidden ``d``, MLP width ``f``); the CPU's fused attention kernel keeps no
``t x t`` matrix. The loss holds the logits several times over (as computed, upcast to float32, their
log-softmax, its gradient): ``5 V`` floats a token (vocabulary ``V``). User-LLM's cross-attention blocks add
``6 d + 2 r d`` floats a token each (``r`` = ``ff_mult``). Everything is counted in float32; bf16 autocast
only lowers it. Calibrated on SmolLM2-135M: a TP prompt of 4,042 tokens took about 10 GiB above the loaded
model; the estimate is 10.6 GiB.

Example::

    per_example = training_bytes(model, tokens=3300)                       # ~9 GiB for SmolLM2-135M
    prompts = batch_for(model, 850, budget=2**30, copies=5, most=8)        # prompts scored together
"""

from __future__ import annotations

from userllm.llm.flops import backbone_shape
from userllm.llm.model import UserLLM


def training_bytes(model, tokens: int) -> int:
    """The estimated peak memory of back-propagating one example of ``tokens`` tokens (see module)."""
    c = model.llm.config
    d, f, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    floats = tokens * layers * (16 * d + 4 * f) + 5 * tokens * vocab
    if isinstance(model, UserLLM) and model.xattn:
        floats += len(model.xattn) * tokens * (6 * d + 2 * model.cfg.ff_mult * d)
    return 4 * floats


def inference_bytes(model, tokens: int, copies: int = 1) -> int:
    """The estimated peak memory of scoring one prompt of ``tokens`` tokens: ``copies`` KV caches of it (a
    beam search keeps one per beam) and one layer's activations at a time."""
    c = backbone_shape(model.llm.config)
    kv = 2 * c.num_hidden_layers * c.d_kv
    return 4 * tokens * (copies * kv + 4 * c.hidden_size + 2 * c.intermediate_size) + 8 * c.vocab_size


def batch_for(model, tokens: int, budget: int, copies: int, most: int) -> int:
    """How many prompts of ``tokens`` tokens (the longest of a batch) fit ``budget`` bytes together, at least
    1 and at most ``most``."""
    return max(1, min(most, budget // max(1, inference_bytes(model, tokens, copies))))
