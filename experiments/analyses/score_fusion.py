"""Does adding the stage-1 encoder's scores to a reranker's help? next_item's shortlist reranked by
log p_LLM(title + eos) + w * log p_encoder(title), for several weights w, from the stored records (issue 13).

    python benchmarks/score_fusion.py [--short runs/stage2/next_item] [--long runs/h200-alibi-all] [--weights 0,1,2]

Each run's records keep every shortlisted title's log p(title + eos) (``shortlist_scores``, the exact ranking).
The encoder's term is its log-softmax over the whole catalogue after the user's history window (a title's
probability summed over the items that share it), recomputed with the run's own stage-1 encoder and checked
to give the very shortlist the run ranked. w = 0 is the run's own ranking; a large w is the encoder's order.
Per weight: each run's Recall@10 and, paired over the users all four runs scored, User-LLM's lead over TP at
each length and its change (:func:`userllm.metrics.estimate`). A product of experts with a weight chosen
by looking at test users is a second look at them, not a method: this script reports, it does not select.
Writes ``benchmarks/results/score_fusion.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from paired_lengths import four_runs, four_runs_arguments  # noqa: E402  (benchmarks/, the script's folder)
from shortlist_band import run_encoder  # noqa: E402

from userllm.errors import InputError, run_script
from userllm.io import write_json
from userllm.metrics import estimate
from userllm.tasks.records import recorded_shortlist

OUT = Path(__file__).parent / "results" / "score_fusion.json"


def encoder_title_logprobs(run: Path, tokenizers: dict) -> dict[str, dict[str, float]]:
    """{user_id: {title: log p_encoder(title)}} over each test user's shortlist (the run's ``shortlist`` top
    items of its stage-1 encoder, :meth:`TaskData.encoder_top`; a title's probability summed over its items)."""
    cfg, data, encoder = run_encoder(run, tokenizers)
    if not cfg.shortlist:
        raise InputError(f"{run}: not a next_item run that reranks a stage-1 encoder's shortlist")
    examples = data.examples("test")
    logp = data.encoder_logprobs(encoder, examples)
    out = {}
    for ex, row, top in zip(examples, logp, data.encoder_top(encoder, examples, cfg.shortlist)):
        by_title: dict[str, list[float]] = {}
        for i in top:
            by_title.setdefault(data.ds.item_titles[i], []).append(row[i].item())
        out[ex.user_id] = {t: float(np.logaddexp.reduce(v)) for t, v in by_title.items()}
    return out


def fused_hits(
    records: dict[str, dict], encoder: dict[str, dict[str, float]], users: list[str], w: float
) -> np.ndarray:
    """Per user, 1 if the truth is in the top 10 by log p_LLM + w * log p_encoder."""
    hits = []
    for u in users:
        score = {t: lp + w * encoder[u][t] for t, lp, _ in records[u]["shortlist_scores"]}
        hits.append(float(records[u]["truth"] in sorted(score, key=lambda t: -score[t])[:10]))
    return np.array(hits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    four_runs_arguments(ap, OUT, long="runs/h200-alibi-all")
    ap.add_argument("--weights", default="0,0.5,1,2,4", help="comma-separated weights w of the encoder's term")
    args = ap.parse_args()
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise InputError(f"--weights {args.weights!r}: expected comma-separated numbers, e.g. 0,1,2") from None
    runs, records, users = four_runs(args)
    tokenizers: dict = {}
    encoder = {name: encoder_title_logprobs(run, tokenizers) for name, run in runs.items()}
    for name, recs in records.items():
        for u in users:
            if set(recorded_shortlist(recs[u]) or ()) != set(encoder[name][u]):
                raise InputError(
                    f"{runs[name]}: user {u}'s recorded shortlist is not its encoder's top items now "
                    "(another encoder, or a ranking without shortlist_scores)"
                )
    fmt = lambda m: f"{m['value']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]"  # noqa: E731
    out = {"users": len(users), "runs": {k: str(v) for k, v in runs.items()}, "recall@10": {}}
    print(f"{len(users)} users scored in all four runs; Recall@10 by log p_LLM + w log p_encoder")
    for w in weights:
        hits = {name: fused_hits(records[name], encoder[name], users, w) for name in runs}
        lead = {length: hits[f"User-LLM {length}"] - hits[f"TP {length}"] for length in ("short", "long")}
        row = {
            **{name: float(h.mean()) for name, h in hits.items()},
            "lead short": estimate(lead["short"]),
            "lead long": estimate(lead["long"]),
            "lead long - lead short": estimate(lead["long"] - lead["short"]),
        }
        out["recall@10"][str(w)] = row
        leads = (
            f"lead short {fmt(row['lead short'])}, long {fmt(row['lead long'])}, "
            f"change {fmt(row['lead long - lead short'])}"
        )
        print(f"w={w:<5g} " + "  ".join(f"{name} {row[name]:.3f}" for name in runs) + " | " + leads)
    write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
