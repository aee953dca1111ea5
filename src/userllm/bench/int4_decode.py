"""SmolLM2-135M-Instruct (Q4_1) with float32 vs 4-bit decoder layers (``userllm serve --weights int4``), each
also under bf16 autocast (``userllm serve --bf16``): decoding and prefill time, and how far the next-token
distributions move.

    python -m userllm.bench.int4_decode [--steps 30 --context 60 --prefill 3400]

Decoding: the mean over ``--steps`` single-token steps after a ``--context``-token prompt (KV
cache on, logits of the last position only), after 3 warm-up steps. Prefill: one ``--prefill``-token prompt
(TP's 200-event prompt is ~3,400 tokens). Agreement: on 4 random prompts of 64 tokens, the largest weight
change, the mean KL(float32 || int4) of the next-token distributions, and how often their argmax agrees; the
same for float32 under bf16 autocast against float32.
"""

from __future__ import annotations

import argparse
import time

import torch

from userllm.llm.backbone import decoder_layers, load_backbone
from userllm.llm.quant import quantize_linears
from userllm.precision import autocast


def agreement(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """Mean KL(ref || got) of next-token log-distributions, and how often their argmax agrees."""
    return (ref.exp() * (ref - got)).sum(-1).mean().item(), (ref.argmax(-1) == got.argmax(-1)).float().mean().item()


@torch.no_grad()
def timings(model, steps: int, context: int, prefill: int) -> tuple[float, float]:
    ids = torch.randint(100, 40000, (1, context), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for i in range(3 + steps):
        if i == 3:
            start = time.perf_counter()
        cache = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).past_key_values
    decode = (time.perf_counter() - start) / steps
    ids = torch.randint(100, 40000, (1, prefill), generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return decode, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--context", type=int, default=60)
    p.add_argument("--prefill", type=int, default=3400)
    a = p.parse_args()
    model = load_backbone().model
    probe = torch.randint(100, 40000, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=probe).logits.log_softmax(-1)
        with autocast(True):
            bf16 = model(input_ids=probe).logits.float().log_softmax(-1)
    rows = {}
    for name, amp in (("float32", False), ("float32, bf16 autocast", True)):
        with autocast(amp):
            rows[name] = timings(model, a.steps, a.context, a.prefill)
    report = quantize_linears(decoder_layers(model))
    with torch.no_grad():
        got = model(input_ids=probe).logits.log_softmax(-1)
    for name, amp in (("int4", False), ("int4, bf16 autocast", True)):
        with autocast(amp):
            rows[name] = timings(model, a.steps, a.context, a.prefill)
    print(
        f"{report['layers']} decoder linear layers: {report['float_bytes'] / 1e6:.0f} MB float32 -> "
        f"{report['int4_bytes'] / 1e6:.0f} MB int4, largest weight change {report['max_error']:.3g}"
    )
    for name, other in (("int4", got), ("bf16 autocast", bf16)):
        kl, agree = agreement(ref, other)
        print(
            f"next-token distributions on 4 x 64 random tokens: KL(float32 || {name}) {kl:.5f} nats, "
            f"argmax agrees {agree:.1%}"
        )
    print(f"\n| weights | decode ms/token | prefill {a.prefill} tokens s |\n|---|---|---|")
    for name, (decode, prefill) in rows.items():
        print(f"| {name} | {decode * 1000:.1f} | {prefill:.2f} |")
    base = rows["float32"]
    for name, (decode, prefill) in list(rows.items())[1:]:
        print(f"{name}: decoding {base[0] / decode:.2f}x as fast as float32, prefill {base[1] / prefill:.2f}x")


if __name__ == "__main__":
    main()
