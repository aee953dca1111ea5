"""How much order is there to find in a shortlist of N titles? For the stage-1 encoder (and history window)
a next_item run reranks, per shortlist size N (issue 13):

    python benchmarks/shortlist_band.py RUN [RUN ...] [--sizes 10,20,30,50,100] [--k 10] [--out F]
    python benchmarks/shortlist_band.py runs/stage2/next_item/shortlist20-proj-tpflops-exact \
        runs/h200-alibi-all/shortlist20-proj-tpflops-h200

Each RUN is a `userllm train` next_item run that reads a stage-1 encoder (its ``config.json`` names the
dataset, the history window, ``exclude_history`` and the encoder). Over every test user, with 95% bootstrap
intervals (:func:`userllm.metrics.estimate`), for the distinct titles of the encoder's top N items
(:meth:`userllm.tasks.data.TaskData.encoder_top`, :func:`userllm.tasks.evaluate.shortlist_titles`):

- listed: 1[the target's title is among them], the Recall@K of a reranker that always puts it first;
- random order: their expected Recall@K in uniformly random order (:func:`userllm.metrics.random_order_recall`),
  what a reranker that ignores the user gets from the list alone;
- encoder order: Recall@K of the encoder's own order of them, which for N >= K is the encoder's own top K;
- encoder - random: the band a reranker is judged in, paired per user.

A reranker of a short list can only be told from one that ignores the user inside that band; a longer list
dilutes the random order and lifts the ceiling (listed), at the cost of longer prompts for TP. Writes
``benchmarks/results/shortlist_band.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from userllm.config import TrainConfig
from userllm.data.dataset import PreparedDataset
from userllm.errors import InputError, run_script
from userllm.io import write_json
from userllm.llm.backbone import load_backbone
from userllm.metrics import estimate, random_order_recall
from userllm.tasks.data import TaskData
from userllm.tasks.pipeline import shortlist_titles, stage1_encoder

OUT = Path(__file__).parent / "results" / "shortlist_band.json"


def run_encoder(run: Path, tokenizers: dict) -> tuple[TrainConfig, TaskData, object]:
    """A next_item run's config, next_item data (its history window and ``exclude_history``) and
    stage-1 encoder, the one whose shortlist it ranks. ``tokenizers`` caches each backbone's tokenizer."""
    if not (run / "config.json").exists():
        raise InputError(f"{run} is not a training run (no config.json); create one with `userllm train`")
    cfg = TrainConfig.from_saved(json.loads((run / "config.json").read_text()))
    if cfg.task != "next_item":
        raise InputError(f"{run}: a {cfg.task} run; shortlists are next_item's")
    if cfg.llm.backbone not in tokenizers:
        tokenizers[cfg.llm.backbone] = load_backbone(cfg.llm.backbone).tokenizer
    data = TaskData(
        PreparedDataset(cfg.dataset),
        tokenizers[cfg.llm.backbone],
        task="next_item",
        method="userllm",
        max_history=cfg.max_history,
        exclude_history=cfg.llm.exclude_history,
    )
    encoder = stage1_encoder(cfg, data)
    if encoder is None:
        raise InputError(f"{run}: reads no stage-1 encoder (encoder: random or none), so it has no shortlist")
    return cfg, data, encoder


def band(run: Path, sizes: list[int], k: int, tokenizers: dict) -> dict:
    """Per shortlist size: listed, random order, encoder order and encoder - random (value, low, high) over
    every test user of ``run``'s dataset. ``tokenizers`` caches each backbone's tokenizer across runs."""
    cfg, data, encoder = run_encoder(run, tokenizers)
    examples = data.examples("test")
    top = data.encoder_top(encoder, examples, max(sizes))
    truths = [ex.answer for ex in examples]
    rows = {}
    for n in sizes:
        lists = [shortlist_titles(data.ds.item_titles, row[:n]) for row in top]
        listed = np.array([float(t in names) for names, t in zip(lists, truths)])
        rand = random_order_recall(lists, truths, k)
        ordered = np.array([float(t in names[:k]) for names, t in zip(lists, truths)])
        rows[n] = {
            "listed": estimate(listed),
            "random order": estimate(rand),
            "encoder order": estimate(ordered),
            "encoder - random": estimate(ordered - rand),
        }
    return {
        "history": cfg.max_history,
        "exclude_history": cfg.llm.exclude_history,
        "users": len(examples),
        "encoder": str(cfg.encoder),
        "sizes": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="next_item training runs that read a stage-1 encoder")
    ap.add_argument("--sizes", default="10,20,30,50,100", help="comma-separated shortlist sizes N")
    ap.add_argument("--k", type=int, default=10, help="the cutoff K of Recall@K")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    try:
        sizes = sorted({int(n) for n in args.sizes.split(",")})
    except ValueError:
        raise InputError(f"--sizes {args.sizes!r}: expected comma-separated whole numbers, e.g. 20,50") from None
    if min(sizes) < 1 or args.k < 1:
        raise InputError(f"--sizes {args.sizes!r} and --k {args.k}: each must be at least 1")
    fmt = lambda m: f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"  # noqa: E731
    out, tokenizers = {"k": args.k, "runs": {}}, {}
    for run in args.runs:
        res = out["runs"][str(run)] = band(run, sizes, args.k, tokenizers)
        print(f"\n{run}: {res['history']} events, {res['users']} users, Recall@{args.k}")
        print(f"  {'N':>4}  {'listed':<22} {'random order':<22} {'encoder order':<22} encoder - random")
        for n, row in res["sizes"].items():
            print(
                f"  {n:>4}  "
                + " ".join(f"{fmt(row[c]):<22}" for c in ("listed", "random order", "encoder order"))
                + fmt(row["encoder - random"])
            )
    write_json(args.out, out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    run_script(main)
