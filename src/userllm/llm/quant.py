"""4-bit weights for serving: a backbone's linear layers as group-wise int4, run by PyTorch's CPU int4 kernel.

Decoding one token is a matrix-vector product per layer, bound by reading the weights: SmolLM2-135M reads
538 MB of float32 per token. Its 30 decoder layers (425 MB of it) stored as 4 bits per weight with a scale
and an offset per group of 32 inputs take 66 MB, and PyTorch's ``_weight_int4pack_mm_for_cpu`` (bfloat16
activations) computes them from the packed form: ~80 -> ~40 ms per decoded token on 2 cores here, prefill
unchanged (``python -m userllm.bench.int4_decode``, ``userllm bench serve``). The LM head (tied to the input embeddings,
which are not 4-bit in the file) stays float32: callers quantize :func:`decoder_layers`.

For the default backbone the conversion is exact: SmolLM2-135M-Instruct (Q4_1) *is* 4-bit with groups of
32 (GGUF Q4_1: ``w = d * q + m``, ``q`` in 0..15), so each group's minimum and range give back ``m`` and
``d`` and every weight's ``q`` (:func:`quantize_linears` reports the largest reconstruction error: 0.0 for
its decoder layers). What changes is the arithmetic: activations, scales and offsets are bfloat16 (next-token
distributions within ~0.001 nats of float32's). Other backbones are quantized round-to-nearest (lossy, as
any 4-bit quantization; the reported error says how much).

Example::

    report = quantize_linears(decoder_layers(backbone))   # in place: {"layers": 210, "max_error": 0.0, ...}
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from userllm.errors import InputError

GROUP = 32  # inputs per scale/offset: GGUF Q4_1's block


def quantize_int4(weight: Tensor, group: int = GROUP) -> tuple[Tensor, Tensor, Tensor]:
    """Group-wise min-max 4-bit quantization of ``weight`` (n, k): ``q`` (n, k) int32 in 0..15, ``scale`` and
    ``low`` (n, k / group) with ``weight ~= scale * q + low`` per group of ``group`` consecutive inputs."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group, group)
    low = w.amin(-1)
    scale = (w.amax(-1) - low) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: q = 0, w = low
    q = ((w - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, scale, low


def dequantize_int4(q: Tensor, scale: Tensor, low: Tensor) -> Tensor:
    """The weight (n, k) that :func:`quantize_int4`'s ``q``, ``scale`` and ``low`` stand for."""
    n, k = q.shape
    return (q.float().reshape(n, scale.shape[1], -1) * scale[..., None] + low[..., None]).reshape(n, k)


class Int4Linear(nn.Module):
    """``nn.Linear`` with 4-bit group-wise weights (CPU): (..., in_features) -> (..., out_features), computed in
    bfloat16 from the packed weights and returned in the input's dtype. Inference only (no gradients)."""

    def __init__(self, linear: nn.Linear, group: int = GROUP) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
        q, scale, low = quantize_int4(linear.weight, group)
        self.max_error = float((dequantize_int4(q, scale, low) - linear.weight.detach().float()).abs().max())
        # the kernel computes (q - 8) * scale + zero: zero = low + 8 * scale; layout (k / group, n, 2)
        zeros = low + 8 * scale
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_zeros", torch.stack([scale, zeros], -1).transpose(0, 1).contiguous().bfloat16())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, int4"


def quantizable(name: str, module: nn.Module, group: int = GROUP) -> bool:
    """A linear layer of the backbone's own weights (not a LoRA adapter's) whose inputs split into groups."""
    adapter = any(part.startswith("lora_") for part in name.split("."))
    return (
        isinstance(module, nn.Linear)
        and not adapter
        and module.in_features % group == 0
        and module.out_features % 16 == 0
    )


def quantize_linears(model: nn.Module, group: int = GROUP) -> dict:
    """Replace every quantizable ``nn.Linear`` under ``model`` by an :class:`Int4Linear`, in place (CPU only).
    Returns ``{"layers", "max_error" (largest |w - dequantized w|), "float_bytes", "int4_bytes"}``."""
    targets = [(n, m) for n, m in model.named_modules() if quantizable(n, m, group)]
    if targets and targets[0][1].weight.device.type != "cpu":
        raise InputError(f"int4 weights run on the CPU only; the model is on {targets[0][1].weight.device}")
    report = {"layers": 0, "max_error": 0.0, "float_bytes": 0, "int4_bytes": 0}
    for name, linear in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantized = Int4Linear(linear, group)
        setattr(parent, leaf, quantized)
        report["layers"] += 1
        report["max_error"] = max(report["max_error"], quantized.max_error)
        report["float_bytes"] += linear.weight.numel() * linear.weight.element_size()
        report["int4_bytes"] += quantized.packed.numel() + quantized.scales_zeros.numel() * 2
    return report


__all__ = ["GROUP", "Int4Linear", "dequantize_int4", "quantize_int4", "quantize_linears", "quantizable"]
