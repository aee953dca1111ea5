"""A long-prompt batch prefilled in one padded call or row by row without its padding
(:func:`userllm.llm.decoding.prefill`, ``per_row_from``), on a trained run's test users.

    python benchmarks/prefill_rows.py runs/stage2-h200/next_item/tp-h200-shortlist20 --rank 0 468   # ~4 min

For each ``--rank`` (the batch's first place in prompt-length order, 0 = the longest), ``--batch`` users'
prompts are prefilled both ways under bf16 autocast (``--fp32``: in float32), as ``userllm evaluate --bf16``
does. Prints the seconds of each and the largest |difference| of the last logits (float rounding: the
tests check the two agree to 1e-4 in float32); writes ``benchmarks/results/prefill_rows.json``. Target: row
by row at least 1.5X faster on the first batch (``--rank 0``: the longest prompts).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from userllm.io import write_json
from userllm.llm.decoding import prefill
from userllm.tasks.evaluate import scoring_order
from userllm.tasks.pipeline import Pipeline

OUT = Path(__file__).parent / "results" / "prefill_rows.json"
PADDED = 10**9  # per_row_from that no prompt reaches: one padded call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a trained run (userllm train's output)")
    p.add_argument("--rank", type=int, nargs="+", default=[0], help="first places of the batches, by prompt length")
    p.add_argument("--batch", type=int, default=8, help="users in a batch")
    p.add_argument("--fp32", action="store_true", help="float32 instead of bf16 autocast")
    args = p.parse_args()
    run = Pipeline.from_pretrained(args.run)
    cfg, model, data = run.cfg, run.model, run.data
    ordered = scoring_order(data.examples("test"))
    rows = []
    print("| batch | positions | padded s | row by row s | speedup | max abs(d logit) |\n|---|---|---|---|---|---|")
    for rank in args.rank:
        examples = ordered[rank : rank + args.batch]
        ids, mask, _ = data.batch(examples, with_answers=False)
        users = data.user_batch(examples, "cpu") if cfg.method == "userllm" else None
        seconds, logits = {}, {}
        for name, per_row_from in (("padded", PADDED), ("row by row", 0)):
            with (
                torch.no_grad(),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32),
                model.conditioned(users, ids, mask) as (embeds, m),
            ):
                start = time.perf_counter()
                logits[name] = prefill(model, embeds, m, per_row_from=per_row_from)[0][0]
                seconds[name] = time.perf_counter() - start
        diff = (logits["padded"] - logits["row by row"]).abs().max().item()
        speedup = seconds["padded"] / seconds["row by row"]
        print(
            f"| --rank {rank} | {mask.shape[1]:,} | {seconds['padded']:.1f} | {seconds['row by row']:.1f} | "
            f"{speedup:.2f}X | {diff:.3f} |"
        )
        rows.append(
            {
                "rank": rank,
                "positions": int(mask.shape[1]),
                "seconds": seconds,
                "speedup": speedup,
                "max_logit_diff": diff,
            }
        )
    met = rows[0]["speedup"] >= 1.5
    print(f"\ntarget (row by row >= 1.5X faster for --rank {rows[0]['rank']}): {'met' if met else 'MISSED'}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_json(
        OUT,
        {
            "run": str(args.run),
            "precision": "fp32" if args.fp32 else "bf16",
            "batch": args.batch,
            "batches": rows,
            "torch_threads": torch.get_num_threads(),
            "target_met": met,
        },
    )


if __name__ == "__main__":
    main()
