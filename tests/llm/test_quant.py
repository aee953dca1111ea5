"""4-bit serving weights: exact on Q4_1-style weights, close to float32 on a model, adapters left alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.llm.conftest import tiny_llama
from userllm.errors import InputError
from userllm.llm.backbone import decoder_layers
from userllm.llm.quant import GROUP, Int4Linear, dequantize_int4, quantize_int4, quantize_linears


def q4_1_weight(n: int = 48, k: int = 64, seed: int = 0) -> torch.Tensor:
    """A weight as GGUF Q4_1 stores it: per group of 32 inputs w = d * q + m, q in 0..15, d and m fp16."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    q[:, ::GROUP], q[:, 1::GROUP] = 0, 15  # every group spans the full range, as the quantizer makes it
    d = (torch.rand(n, k // GROUP, generator=g) * 0.02 + 0.001).half().float()
    m = (-torch.rand(n, k // GROUP, generator=g) * 0.1).half().float()
    return (q.view(n, -1, GROUP) * d[..., None] + m[..., None]).view(n, k)


def test_quantize_int4_recovers_q4_1_weights_exactly():
    w = q4_1_weight()
    q, scale, low = quantize_int4(w)
    assert q.min() >= 0 and q.max() <= 15
    assert (dequantize_int4(q, scale, low) - w).abs().max() < 1e-6
    assert Int4Linear(nn.Linear(64, 48, bias=False).requires_grad_(False)).max_error > 0  # random weights: lossy


def test_int4_linear_matches_the_float_layer_within_bfloat16_rounding():
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(q4_1_weight())
    quantized = Int4Linear(linear)
    assert quantized.max_error < 1e-6
    x = torch.randn(2, 5, 64)
    y, ref = quantized(x), linear(x)
    assert y.shape == ref.shape == (2, 5, 48) and y.dtype == torch.float32
    assert torch.allclose(y, ref, atol=0.02 * ref.abs().max().item())
    assert not torch.equal(y, ref)  # bfloat16 arithmetic: close, not identical


def test_quantize_linears_replaces_the_decoder_layers_only_and_keeps_the_logits_close():
    model = tiny_llama(tie=True)
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    report = quantize_linears(decoder_layers(model))
    assert report["layers"] == 4 * 7  # q, k, v, o, gate, up, down in each of 4 layers
    assert report["int4_bytes"] < report["float_bytes"] / 4
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
    assert isinstance(model.lm_head, nn.Linear)  # tied to the input embeddings: left float
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_quantize_linears_leaves_lora_adapters_float():
    from userllm.config import UserLLMConfig
    from userllm.llm.base import apply_llm_strategy

    cfg = UserLLMConfig(strategy="lora", lora_rank=16, lora_alpha=16, lora_targets=["q_proj", "v_proj"])
    model = apply_llm_strategy(tiny_llama(), cfg)  # the library's own LoRA wrapping (PEFT)
    report = quantize_linears(decoder_layers(model.get_base_model()))
    attn = model.get_base_model().model.layers[0].self_attn
    assert isinstance(attn.q_proj.base_layer, Int4Linear)
    assert isinstance(attn.q_proj.lora_A["default"], nn.Linear) and isinstance(attn.q_proj.lora_B["default"], nn.Linear)
    assert report["layers"] == 4 * 7
    with torch.no_grad():
        assert model(input_ids=torch.randint(3, 96, (1, 6))).logits.isfinite().all()


def test_quantize_linears_refuses_a_model_off_the_cpu():
    model = nn.Sequential(nn.Linear(32, 16)).to("meta")
    with pytest.raises(InputError, match="CPU only"):
        quantize_linears(model)
