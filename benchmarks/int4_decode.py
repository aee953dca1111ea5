"""SmolLM2-135M-Instruct (Q4_1) with float32 vs 4-bit decoder layers (``userllm serve --weights int4``):
decoding and prefill time, and how far the next-token distributions move.

    python benchmarks/int4_decode.py [--steps 30 --context 60 --prefill 3400]

Decoding: the mean over ``--steps`` single-token steps after a ``--context``-token prompt (KV
cache on, logits of the last position only), after 3 warm-up steps. Prefill: one ``--prefill``-token prompt
(TP's 200-event prompt is ~3,400 tokens). Agreement: on 4 random prompts of 64 tokens, the largest weight
change, the mean KL(float32 || int4) of the next-token distributions, and how often their argmax agrees.
"""

from __future__ import annotations

import argparse
import time

import torch

from userllm.llm.backbone import decoder_layers, load_backbone
from userllm.llm.quant import quantize_linears


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
    rows = [("float32", *timings(model, a.steps, a.context, a.prefill))]
    report = quantize_linears(decoder_layers(model))
    with torch.no_grad():
        got = model(input_ids=probe).logits.log_softmax(-1)
    rows.append(("int4", *timings(model, a.steps, a.context, a.prefill)))
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    print(f"{report['layers']} decoder linear layers: {report['float_bytes'] / 1e6:.0f} MB float32 -> "
          f"{report['int4_bytes'] / 1e6:.0f} MB int4, largest weight change {report['max_error']:.3g}")
    print(f"next-token distributions on 4 x 64 random tokens: KL(float32 || int4) {kl:.5f} nats, argmax agrees "
          f"{agree:.1%}")
    print(f"\n| weights | decode ms/token | prefill {a.prefill} tokens s |\n|---|---|---|")
    for name, decode, prefill in rows:
        print(f"| {name} | {decode * 1000:.1f} | {prefill:.2f} |")
    print(f"\ndecoding {rows[0][1] / rows[1][1]:.2f}x faster with int4; prefill {rows[0][2] / rows[1][2]:.2f}x")


if __name__ == "__main__":
    main()
