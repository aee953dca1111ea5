"""What ``userllm evaluate --bf16`` changes: one batch of a trained run's test users scored by
:func:`userllm.tasks.evaluate.predict` in float32 and under bf16 autocast, timed, and compared record by record.

    python benchmarks/bf16_scoring.py runs/stage2-h200/next_item/tp-h200-shortlist20 --rank 0     # the longest prompts
    python benchmarks/bf16_scoring.py runs/stage2-h200/next_item/tp-h200-shortlist20 --rank 468   # the median ones

The batch is ``--batch`` test users from place ``--rank`` in the order of their prompts' length, longest
first (the order ``predict`` scores in). Both precisions score the same batch with everything ``userllm
evaluate`` does for the task (next_item: the prompt's prefill, the greedy answer and the ranking of the
shortlist). Prints the seconds per user of each, the speedup, and how far the answers move: users whose top
title, top-10 set and greedy answer are the same; the mean and largest |difference| of the log-probabilities
of the shortlisted titles. Writes ``benchmarks/results/bf16_scoring-rankR.json``. Target: bf16 at least 1.5X
faster per user, with the same top-10 set for at least 7 users in 8 (bf16 keeps 8 bits of mantissa: titles
whose scores are within its rounding trade places).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from userllm.io import write_json
from userllm.tasks.evaluate import predict, scoring_order
from userllm.tasks.pipeline import Pipeline

OUT = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a trained run (userllm train's output)")
    p.add_argument("--batch", type=int, default=8, help="test users in the batch")
    p.add_argument("--rank", type=int, default=0, help="the batch's first place in prompt-length order, 0 = longest")
    args = p.parse_args()
    run = Pipeline.from_pretrained(args.run)
    cfg, model, data = run.cfg, run.model, run.data
    ordered = scoring_order(data.examples("test"))
    if not 0 <= args.rank < len(ordered):
        raise SystemExit(f"--rank {args.rank}: the run has {len(ordered)} test users")
    examples = ordered[args.rank : args.rank + args.batch]
    listed = run.shortlists(examples)
    tokens = [len(data.tokenizer(ex.prompt).input_ids) for ex in examples]
    seconds, records = {}, {}
    for bf16 in (False, True):
        run_cfg = cfg.model_copy(update={"bf16": bf16, "eval_batch_size": len(examples)})
        start = time.perf_counter()
        records[bf16] = predict(model, data, examples, run_cfg, "cpu", shortlist=listed)
        seconds["bf16" if bf16 else "fp32"] = (time.perf_counter() - start) / len(examples)
    pairs = list(zip(records[False], records[True]))
    same = {
        "top 1": sum(a["ranked"][:1] == b["ranked"][:1] for a, b in pairs),
        "top-10 set": sum(set(a["ranked"][:10]) == set(b["ranked"][:10]) for a, b in pairs),
        "greedy answer": sum(a["greedy"] == b["greedy"] for a, b in pairs),
    }
    drift = [
        abs(x[1] - y[1])
        for a, b in pairs
        if "shortlist_scores" in a
        for x, y in zip(sorted(a["shortlist_scores"]), sorted(b["shortlist_scores"]))
    ]
    speedup = seconds["fp32"] / seconds["bf16"]
    met = speedup >= 1.5 and same["top-10 set"] >= 7 / 8 * len(pairs)
    print(
        f"\n{args.run}: {len(pairs)} users from place {args.rank} by prompt length, "
        f"{min(tokens):,}-{max(tokens):,} prompt tokens, {torch.get_num_threads()} threads\n"
    )
    print(f"s per user: fp32 {seconds['fp32']:.2f}, bf16 {seconds['bf16']:.2f}: {speedup:.2f}X faster")
    print("users with the same " + ", ".join(f"{k}: {v}/{len(pairs)}" for k, v in same.items()))
    if drift:
        print(
            f"|log p(bf16) - log p(fp32)| over the {len(drift)} shortlisted titles: mean {sum(drift) / len(drift):.3f}, "
            f"max {max(drift):.3f}"
        )
    print(f"target (>= 1.5X, the same top-10 set for >= 7 users in 8): {'met' if met else 'MISSED'}")
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(
        OUT / f"bf16_scoring-rank{args.rank}.json",
        {
            "run": str(args.run),
            "rank": args.rank,
            "users": len(pairs),
            "prompt_tokens": tokens,
            "seconds_per_user": seconds,
            "speedup": speedup,
            "same": same,
            "logp_drift": {"mean": sum(drift) / len(drift), "max": max(drift)} if drift else None,
            "torch_threads": torch.get_num_threads(),
            "target_met": met,
        },
    )


if __name__ == "__main__":
    main()
