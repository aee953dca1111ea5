"""Stage-1 encoders of different history windows, paired over the same test users (issue 13).

    python benchmarks/encoder_lengths.py RECIPE [RECIPE ...]   # a recipe: a pretraining run, or its seeds joined by commas
    python benchmarks/encoder_lengths.py runs/enc50,runs/enc50-s1 runs/enc200,runs/enc200-s1

Each run is a `userllm pretrain` directory, scored on the test split (every user's last event, full ranking,
unmasked: RecBole's protocol, as `userllm evaluate-encoder`) with the history window it was trained for. Every
user's target is the same whatever the window, so two recipes differ user by user: per-user Recall@10 and
NDCG@10 (formulas in :mod:`userllm.metrics`), a recipe's value the mean over its runs, each with its 95%
bootstrap interval (:func:`userllm.metrics.paired_estimate`: users resampled, and the runs of a recipe
with several, so the spread between training seeds enters the interval), and each recipe minus the first.
Over all users and split by the users whose history before the target has at most 50 events (where a 50- and
a 200-event window read the same events) and more than 50. Writes ``benchmarks/results/encoder_lengths.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from userllm.data.dataset import PreparedDataset
from userllm.encoder.data import Timelines
from userllm.encoder.evaluate import encoder_scores, rank_split
from userllm.encoder.pretrained import load_encoder
from userllm.errors import InputError, run_script
from userllm.io import write_json
from userllm.metrics import ndcg_values, paired_estimate, recall_values

OUT = Path(__file__).parent / "results" / "encoder_lengths.json"
SPLIT_AT = 50  # history length separating the two groups of users


def score(run: Path, timelines: dict[tuple[str, int], Timelines]) -> tuple[dict[str, np.ndarray], np.ndarray, str, str]:
    """Per-user test Recall@10 and NDCG@10 of one pretraining run, each user's history length, the run's
    dataset and a description of its window and positions. ``timelines`` holds each (dataset, time-gap
    buckets) read so far, so runs of one dataset read it once."""
    if not (run / "config.json").exists():
        raise InputError(f"{run} is not a pretraining run (no config.json); create one with `userllm pretrain`")
    dataset = json.loads((run / "config.json").read_text())["dataset"]
    model = load_encoder(run, "cpu").eval()
    key = (dataset, model.cfg.time_gap_buckets)
    if key not in timelines:
        timelines[key] = Timelines.from_dataset(PreparedDataset(dataset), model.cfg.time_gap_buckets)
    tl = timelines[key]
    ranks, ends = rank_split(encoder_scores(model, tl, "cpu"), tl, "test", model.cfg.max_len, masked=False)
    values = {"recall@10": recall_values(ranks, 10).numpy(), "ndcg@10": ndcg_values(ranks, 10).numpy()}
    return values, ends, dataset, f"window {model.cfg.max_len}, {model.cfg.positions} positions"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "recipes", nargs="+", help="pretraining runs (seeds of one recipe joined by commas), the first the reference"
    )
    args = ap.parse_args()
    recipes = {arg: [Path(p) for p in arg.split(",") if p] for arg in args.recipes}
    if len(recipes) < 2 or not all(recipes.values()):
        raise InputError("give at least two recipes, each one or more pretraining runs joined by commas")
    values: dict[str, dict[str, np.ndarray]] = {}
    history, datasets, timelines = None, set(), {}
    for name, runs in recipes.items():
        scored = [score(run, timelines) for run in runs]
        for run, (_, ends, dataset, desc) in zip(runs, scored):
            print(f"{run}: {desc}", flush=True)
            datasets.add(dataset)
            if len(datasets) > 1:
                raise InputError(f"the runs were pretrained on different datasets: {', '.join(sorted(datasets))}")
            history = ends if history is None else history
        values[name] = {m: np.stack([v[m] for v, *_ in scored]) for m in ("recall@10", "ndcg@10")}  # (runs, users)
    groups = {
        "all": np.ones(len(history), bool),
        f"<= {SPLIT_AT} events": history <= SPLIT_AT,
        f"> {SPLIT_AT} events": history > SPLIT_AT,
    }
    fmt = lambda m, sign="": f"{m['value']:{sign}.4f} [{m['low']:{sign}.4f}, {m['high']:{sign}.4f}]"  # noqa: E731
    out = {
        "recipes": {k: [str(r) for r in v] for k, v in recipes.items()},
        "users": {g: int(s.sum()) for g, s in groups.items()},
        "metrics": {},
    }
    ref = next(iter(recipes))
    width = max(len(k) for k in recipes)
    for metric in ("recall@10", "ndcg@10"):
        for group, sel in groups.items():
            print(f"\n{metric}, {group} ({sel.sum()} users)")
            rows = {}
            for name in recipes:
                x = values[name][metric][:, sel]
                rows[name] = paired_estimate(x)
                line = f"  {name:<{width}} {fmt(rows[name])}"
                if name != ref:
                    rows[f"{name} - {ref}"] = paired_estimate(x, values[ref][metric][:, sel])
                    line += f"   minus the first: {fmt(rows[f'{name} - {ref}'], '+')}"
                print(line)
            out["metrics"][f"{metric} {group}"] = rows
    write_json(OUT, out)
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    run_script(main)
