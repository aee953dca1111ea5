"""Stage 2 on SmolLM2-135M-Instruct (Q4_1): trainable parameters per strategy and one training step per mode.

    python -m userllm.bench.llm_step [--batch 4 --tokens 128 --events 50 --steps 3]

Uses an encoder of the default stage-1 shape (d_model 64) over MovieLens-100K-sized vocabularies, random
user timelines of ``--events`` events, and ``--tokens`` prompt tokens per example. The step time is the
median of ``--steps`` forward+backward+AdamW steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from userllm.config import EncoderConfig, UserLLMConfig
from userllm.encoder.model import UserEncoder
from userllm.llm.backbone import load_backbone
from userllm.llm.model import UserLLM

MODES = {
    "cross-attention": dict(mode="cross_attention"),
    "cross-attention + Perceiver (16)": dict(mode="cross_attention", perceiver_latents=16),
    "soft prompt": dict(mode="soft_prompt"),
    "soft prompt + Perceiver (16)": dict(mode="soft_prompt", perceiver_latents=16),
}


def encoder() -> UserEncoder:
    torch.manual_seed(0)
    cats = torch.randint(2, 20, (1684, 3))
    return UserEncoder(EncoderConfig(num_items=1684, num_ratings=7, num_categories=20), item_categories=cats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--events", type=int, default=50)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    users = {
        "item": torch.randint(2, 1684, (args.batch, args.events)),
        "rating": torch.randint(2, 7, (args.batch, args.events)),
        "time_gap": torch.randint(1, 24, (args.batch, args.events)),
    }
    ids = torch.randint(0, 49152, (args.batch, args.tokens))
    mask = torch.ones_like(ids)
    print(
        f"\nTrainable parameters (SmolLM2-135M-Instruct (Q4_1), cross-attention before every "
        f"{UserLLMConfig().cross_attention_every}th layer)\n"
    )
    print("| strategy | encoder | projector+perceiver | cross-attention blocks | llm | total trainable |")
    print("|---|---|---|---|---|---|")
    for strategy in ("full", "lora", "enc", "proj"):
        model = UserLLM(UserLLMConfig(strategy=strategy, item_words=[]), encoder=encoder(), llm=load_backbone().model)
        g = model.parameter_groups()
        cells = [f"{t:,} / {n:,}" for t, n in g.values()]
        print(f"| {strategy} | " + " | ".join(cells) + f" | {sum(t for t, _ in g.values()):,} |")
    print(
        f"\nOne training step (strategy enc, batch {args.batch} x {args.tokens} tokens, {args.events} events), "
        f"median of {args.steps} after a warm-up\n"
    )
    print("| mode | step (s) | LLM input tokens |")
    print("|---|---|---|")
    for name, kw in MODES.items():
        model = UserLLM(
            UserLLMConfig(strategy="enc", item_words=[], **kw), encoder=encoder(), llm=load_backbone().model
        ).train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        times = []
        for i in range(args.steps + 1):
            t = time.perf_counter()
            loss = model(users, ids, mask, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - t)
        extra = 0 if kw["mode"] == "cross_attention" else kw.get("perceiver_latents") or args.events
        print(f"| {name} | {statistics.median(times):.2f} | {args.tokens + extra} |")


if __name__ == "__main__":
    main()
