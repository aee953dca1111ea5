"""next_item's shortlist, ranked two ways on one batch of a trained run's test users: the prompt's prefill,
the 10-beam constrained search (``shortlist_ranking: beams``) and the exact ranking of every title
(``shortlist_ranking: exact``, :func:`userllm.llm.decoding.rank_sequences`).

    python benchmarks/shortlist_ranking.py runs/stage2/next_item/tp-256-shortlist20-exact [--batch 8]

The run must rank a shortlist (``shortlist`` N > 0, e.g. stage2.yaml's TP cell, ~1,100-token prompts). Prints
the seconds of each part per batch and per user, how far the two rankings agree, and writes
``benchmarks/results/shortlist_ranking.json``. The two rank by the same score; the beams can lose a title
before its end (they keep 10 partial titles of 20 at each step). Target: the exact ranking costs at most a fifth of the 10-beam
search, so scoring all test users is affordable for TP.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from userllm.io import write_json
from userllm.llm.decoding import constrained_beam_search, prefill, rank_sequences
from userllm.tasks.evaluate import answer_space, answer_trie
from userllm.tasks.train import load_run, shortlists, stage1_encoder

OUT = Path(__file__).parent / "results" / "shortlist_ranking.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a trained next_item run with a shortlist")
    p.add_argument("--batch", type=int, default=8, help="test users in the batch (the first ones)")
    args = p.parse_args()
    cfg, model, data = load_run(args.run)
    if data.task != "next_item" or not cfg.shortlist:
        raise SystemExit(f"{args.run}: not a next_item run with a shortlist (task {data.task}, shortlist {cfg.shortlist})")
    examples = data.examples("test")[: args.batch]
    listed = shortlists(cfg, data, examples, stage1_encoder(cfg, data))
    tries, names = answer_space(data, answer_trie(data), examples, listed)
    eos = data.tokenizer.eos_token_id
    seconds = {}
    with torch.no_grad():
        ids, mask, _ = data.batch(examples, with_answers=False)
        users = data.user_batch(examples, "cpu") if cfg.method == "userllm" else None
        with model.conditioned(users, ids, mask) as (embeds, m):
            start = time.perf_counter()
            first, second = prefill(model, embeds, m, copies=2)
            seconds["prefill"] = time.perf_counter() - start
            start = time.perf_counter()
            beams = constrained_beam_search(model, embeds, m, tries, beams=10, prefilled=first)
            seconds["10-beam search"] = time.perf_counter() - start
            start = time.perf_counter()
            exact = rank_sequences(model, embeds, m, [t.sequences for t in tries], eos_token_id=eos, prefilled=second)
            seconds["exact ranking"] = time.perf_counter() - start
    top = lambda found: [[names[r][i] for i, _ in row[:10]] for r, row in enumerate(found)]  # noqa: E731
    pairs = list(zip(top(beams), top(exact)))
    same = {k: sum(a[:k] == b[:k] for a, b in pairs) / len(pairs) for k in (1, 5, 10)}  # the same titles in order
    shared = sum(len(set(a) & set(b)) for a, b in pairs) / len(pairs)  # of the 10 titles each keeps
    ratio = seconds["exact ranking"] / seconds["10-beam search"]
    print(f"\n{args.run}: {len(examples)} users, prompts of {int(m.shape[1])} positions, "
          f"{max(len(t.sequences) for t in tries)} titles each\n")  # fmt: skip
    print("| part | s per batch | s per user |")
    print("|---|---|---|")
    for part, s in seconds.items():
        print(f"| {part} | {s:.1f} | {s / len(examples):.2f} |")
    print(f"\nexact / 10-beam search: {ratio:.3f} (target <= 0.2: {'met' if ratio <= 0.2 else 'MISSED'})")
    print("users whose top 1 / 5 / 10 the two give in the same order: " + " / ".join(f"{v:.2f}" for v in same.values())
          + f"; titles the two top 10s share: {shared:.1f} of 10 (the beams keep 10 of the 20 as they go)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_json(OUT, {"run": str(args.run), "users": len(examples), "prompt_positions": int(m.shape[1]),
                     "seconds": seconds, "exact_over_beams": ratio, "same_order_top": same,
                     "shared_of_top10": shared, "torch_threads": torch.get_num_threads()})  # fmt: skip


if __name__ == "__main__":
    main()
