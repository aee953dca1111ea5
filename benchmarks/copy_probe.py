"""Can User-LLM's connectors learn to copy a candidate at all? next_item trained on a synthetic target that
only the user path can reveal: every training example's answer is replaced by a title of the stage-1
encoder's shortlist for that user (``--rank`` 1: its first; the encoder's order is what the LLM reads,
``llm.candidates``). A model that reads its context learns to answer that title for everyone; one that does
not can at best learn the titles' overall frequency.

    python benchmarks/copy_probe.py --out runs/probe/copy-rank1 [-s llm.candidate_tokens=8 ...]

Trains ``--examples`` (default 1,024) with stage2.yaml's next_item recipe (``shortlist20-proj``: strategy
proj, 20 candidates, gates at 20x the learning rate, no category words) plus the overrides, then ranks the
20 titles of ``--users`` seeded test users exactly and prints how often the LLM's first title is the
encoder's ``--rank``-th (the target the probe trained for; chance 1/20) and its mean position in the LLM's
order (the records keep the top 10; a title below them counts as 21). Writes ``copy_probe.json`` in the
run directory. Target: well above chance, or the architecture cannot carry the encoder's candidates into
the answer at this budget.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from userllm.cli import parse_sets
from userllm.config import TrainConfig, load_config
from userllm.errors import InputError, run_script
from userllm.eval.metrics import estimate
from userllm.io import write_json
from userllm.tasks import train as train_module
from userllm.tasks.evaluate import evaluate, read_records

RECIPE = {"task": "next_item", "train_examples": 1024, "batch_size": 8, "lr": 1e-3,
          "warmup_steps": 10, "gate_lr_scale": 20.0, "shortlist": 20, "shortlist_ranking": "exact",
          "llm": {"item_words": [], "candidates": 20, "strategy": "proj"}}  # fmt: skip


def probe_build(rank: int):
    """:func:`~userllm.tasks.train.build`, whose training examples answer the encoder's ``rank``-th title."""
    original = train_module.build

    def build(cfg, ds, backbone=None):
        model, data = original(cfg, ds, backbone)
        examples = data.examples

        def relabelled(split, users=None):
            out = examples(split, users)
            if split != "train":
                return out
            top = data.encoder_top(model.encoder, out, rank)
            return [replace(ex, answer=ds.item_titles[row[rank - 1]], label=row[rank - 1]) for ex, row in zip(out, top)]

        data.examples = relabelled
        return model, data

    return build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--rank", type=int, default=1, help="the encoder's rank whose title every training answer becomes")
    p.add_argument("--examples", type=int, default=1024, help="training examples")
    p.add_argument("--users", type=int, default=200, help="seeded test users scored")
    p.add_argument("--encoder", default="runs/enc50", help="stage-1 run (stage2.yaml's pretrain)")
    p.add_argument("-s", "--set", action="append", default=[], help="config override KEY=VALUE (as `userllm train -s`)")
    args = p.parse_args()
    if not 1 <= args.rank <= 10:
        raise InputError(f"--rank {args.rank}: expected 1-10 (the records keep the encoder's top 10)")
    run(args)


def run(args: argparse.Namespace) -> None:
    cfg = load_config(TrainConfig, None, {**RECIPE, "train_examples": args.examples, "out": str(args.out),
                                          "encoder": args.encoder, **parse_sets(args.set)})  # fmt: skip
    train_module.build = probe_build(args.rank)
    if not (args.out / "summary.json").exists():
        train_module.train(cfg)
    if not (args.out / "metrics.json").exists():  # the test split is not relabelled
        evaluate(args.out, users=args.users, seed=0)
    records = read_records(args.out)
    target = [r["encoder_ranked"][args.rank - 1] for r in records]
    first = np.array([r["ranked"][0] == t for r, t in zip(records, target)], dtype=float)
    n = cfg.shortlist  # titles ranked per user; a target beyond the records' top list counts as n + 1
    where = [r["ranked"].index(t) + 1 if t in r["ranked"] else n + 1 for r, t in zip(records, target)]
    losses = json.loads((args.out / "summary.json").read_text())["losses"]
    summary = {
        "rank": args.rank, "users": len(records), "train_examples": args.examples, "overrides": args.set,
        "llm_first_is_target": estimate(first), "chance": 1 / n,
        "target_position_mean": float(np.mean(where)),
        "loss_first20": float(np.mean(losses[:20])), "loss_last20": float(np.mean(losses[-20:])),
    }  # fmt: skip
    write_json(args.out / "copy_probe.json", summary)
    print(summary)


if __name__ == "__main__":
    run_script(main)
