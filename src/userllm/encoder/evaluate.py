"""``userllm evaluate-encoder``: RecBole's protocol for sequential recommenders, plus a masked variant.

Leave-last-out by time (valid = second last event, test = last), the history is the up-to-``max_len``
events before the target, and every item of the catalogue is ranked. Two variants, always labelled:

- ``unmasked``: RecBole's protocol for sequential models (items the user already had stay in the ranking);
- ``masked``: every item the user interacted with before the target (the full history, not only the
  window) is excluded from the ranking.

Baselines in the same report: popularity (train-part counts), a randomly initialised encoder of the same
configuration, and any runs given with ``--compare`` (e.g. the item-only, SASRec-style configuration
trained the same way). Results also by history-length bucket (events before the target).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from userllm.data.dataset import PreparedDataset
from userllm.encoder.data import Timelines
from userllm.encoder.model import UserEncoder
from userllm.encoder.train import encoder_scores, load_encoder, rank_split
from userllm.eval.metrics import ranking_metrics
from userllm.io import write_json, write_text_atomically

SPLITS, VARIANTS = ("valid", "test"), ("unmasked", "masked")
HISTORY_BUCKETS = ((0, 20), (20, 50), (50, 100), (100, 200), (200, None))
TABLE_METRICS = ("recall@1", "recall@5", "recall@10", "recall@20", "ndcg@10", "mrr@10")


def popularity_scores(tl: Timelines, num_items: int):
    """Scores = number of train-part events of each item (the same for every user)."""
    train = np.concatenate([tl.item[o : o + n - 2] for o, n in zip(tl.offsets, tl.lengths)])
    counts = torch.from_numpy(np.bincount(train, minlength=num_items).astype(np.float32))
    return lambda users, starts, ends: counts[None, :].expand(len(users), -1).clone()


def bucket_name(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else f"{lo}-{hi - 1}"


def evaluate_scorer(score_fn, tl: Timelines, max_len: int) -> dict:
    """Metrics for both splits and variants, and per history-length bucket."""
    out: dict = {}
    for split in SPLITS:
        for variant in VARIANTS:
            ranks, history = rank_split(score_fn, tl, split, max_len, masked=variant == "masked")
            entry = {"all": ranking_metrics(ranks), "by_history_length": {}}
            for lo, hi in HISTORY_BUCKETS:
                sel = (history >= lo) & (history < (hi if hi is not None else np.inf))
                if sel.any():
                    entry["by_history_length"][bucket_name(lo, hi)] = {
                        "users": int(sel.sum()), **ranking_metrics(ranks[torch.from_numpy(sel)])
                    }
            out[f"{split}/{variant}"] = entry
    return out


def evaluate_run(run: Path, *, compare: list[Path] = (), dataset: Path | None = None, device: str = "cpu") -> dict:
    """Evaluate the run's best encoder beside popularity, a random encoder and ``compare`` runs."""
    run = Path(run)
    cfg = json.loads((run / "config.json").read_text())
    ds = PreparedDataset(dataset or cfg["dataset"])
    model = load_encoder(run, device)
    tl = Timelines.from_dataset(ds, model.cfg.time_gap_buckets)
    models: dict[str, tuple[str, object]] = {}
    models["popularity"] = ("-", popularity_scores(tl, model.cfg.num_items))
    torch.manual_seed(cfg.get("seed", 0))
    random_model = UserEncoder(model.cfg, item_categories=model.embed.item_categories,
                               item_text=model.embed.item_text).to(device)  # fmt: skip
    models["random-init encoder"] = (describe(random_model), encoder_scores(random_model, tl, device))
    models[f"{run.name} (this run)"] = (describe(model), encoder_scores(model, tl, device))
    for other in compare:
        m = load_encoder(other, device)
        models[Path(other).name] = (describe(m), encoder_scores(m, tl, device))
    results, t0 = {}, time.perf_counter()
    for name, (desc, score_fn) in models.items():
        results[name] = {"model": desc, **evaluate_scorer(score_fn, tl, model.cfg.max_len)}
    report = {"dataset": str(ds.root), "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
              "users": tl.num_users, "items": model.cfg.num_items - 2, "max_history": model.cfg.max_len,
              "results": results, "eval_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    write_json(run / "metrics.json", report)
    write_text_atomically(run / "metrics.md", markdown(report))
    return report


def describe(model: UserEncoder) -> str:
    c = model.cfg
    return f"{c.fusion} fusion of {'+'.join(c.features)}, {c.n_layers}x{c.d_model}, {model.num_parameters():,} params"


def markdown(report: dict) -> str:
    """Tables of test metrics (unmasked and masked), valid NDCG@10, and the run's history-length breakdown."""
    lines = [f"Dataset `{report['dataset']}`: {report['users']:,} users, {report['items']:,} items, "
             f"history window {report['max_history']}, full ranking.", ""]  # fmt: skip
    for split in SPLITS:
        lines += [f"### {split}", "", "| model | variant | " + " | ".join(TABLE_METRICS) + " |",
                  "|---|---|" + "---|" * len(TABLE_METRICS)]  # fmt: skip
        for name, res in report["results"].items():
            for variant in VARIANTS:
                m = res[f"{split}/{variant}"]["all"]
                label = "unmasked (RecBole protocol)" if variant == "unmasked" else "masked (history excluded)"
                lines.append(f"| {name} | {label} | " + " | ".join(f"{m[k]:.4f}" for k in TABLE_METRICS) + " |")
        lines.append("")
    this = next(k for k in report["results"] if k.endswith("(this run)"))
    lines += [f"### test NDCG@10 by history length ({this})", "", "| events before target | users | unmasked | masked |",
              "|---|---|---|---|"]  # fmt: skip
    un, ma = (report["results"][this][f"test/{v}"]["by_history_length"] for v in VARIANTS)
    for bucket, m in un.items():
        lines.append(f"| {bucket} | {m['users']} | {m['ndcg@10']:.4f} | {ma[bucket]['ndcg@10']:.4f} |")
    return "\n".join(lines) + "\n"
