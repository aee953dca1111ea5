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
from torch import Tensor

from userllm.data.dataset import PreparedDataset
from userllm.encoder.data import Timelines, eval_inputs, history_items
from userllm.encoder.model import UserEncoder
from userllm.encoder.pretrained import load_encoder
from userllm.io import write_json, write_text_atomically
from userllm.metrics import ranking_metrics, target_ranks

SPLITS, VARIANTS = ("valid", "test"), ("unmasked", "masked")
HISTORY_BUCKETS = ((0, 20), (20, 50), (50, 100), (100, 200), (200, None))
TABLE_METRICS = ("recall@1", "recall@5", "recall@10", "recall@20", "ndcg@10", "mrr@10")


@torch.no_grad()
def rank_split(
    score_fn, tl: Timelines, split: str, max_len: int, *, masked: bool, batch_size: int = 512
) -> tuple[Tensor, np.ndarray]:
    """Full-ranking ranks of each user's ``split`` target, and the user's history length before it.

    ``score_fn(users, starts, ends) -> (b, V)`` scores all items after the window ``[start, end)``. Padding
    and unknown items are never ranked. ``masked`` also excludes every item of the user's full history
    before the target (except the target itself); unmasked is RecBole's protocol for sequential models.
    """
    users, starts, ends, targets = eval_inputs(tl, split, max_len)
    ranks = []
    for c in range(0, len(users), batch_size):
        sl = slice(c, c + batch_size)
        scores = score_fn(users[sl], starts[sl], ends[sl]).float()
        scores[:, :2] = float("-inf")
        t = torch.from_numpy(targets[sl]).to(scores.device)
        if masked:
            rows, items = history_items(tl, users[sl], ends[sl])
            rows_t, items_t = torch.from_numpy(rows).to(scores.device), torch.from_numpy(items).to(scores.device)
            not_target = items_t != t[rows_t]
            scores[rows_t[not_target], items_t[not_target]] = float("-inf")
        ranks.append(target_ranks(scores, t).cpu())
    return torch.cat(ranks), ends


def encoder_scores(model: UserEncoder, tl: Timelines, device: str):
    """A ``score_fn`` for :func:`rank_split`: the item logits after each window's last event."""

    def score(users, starts, ends):
        batch = tl.collate(users, starts, ends, device=device)
        h, _ = model.encode(batch)
        last = torch.from_numpy(ends - starts - 1).to(device)
        return model.item_logits(h[torch.arange(len(users), device=device), last])

    return score


def evaluate_split(
    model: UserEncoder, tl: Timelines, split: str, device: str, masked: bool = False
) -> dict[str, float]:
    ranks, _ = rank_split(encoder_scores(model, tl, device), tl, split, model.cfg.max_len, masked=masked)
    return ranking_metrics(ranks)


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
                        "users": int(sel.sum()),
                        **ranking_metrics(ranks[torch.from_numpy(sel)]),
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
    random_model = UserEncoder(
        model.cfg, item_categories=model.embed.item_categories, item_text=model.embed.item_text
    ).to(device)
    models["random-init encoder"] = (describe(random_model), encoder_scores(random_model, tl, device))
    models[f"{run.name} (this run)"] = (describe(model), encoder_scores(model, tl, device))
    for other in compare:
        m = load_encoder(other, device)
        models[Path(other).name] = (describe(m), encoder_scores(m, tl, device))
    results, t0 = {}, time.perf_counter()
    for name, (desc, score_fn) in models.items():
        results[name] = {"model": desc, **evaluate_scorer(score_fn, tl, model.cfg.max_len)}
    report = {
        "dataset": str(ds.root),
        "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
        "users": tl.num_users,
        "items": model.cfg.num_items - 2,
        "max_history": model.cfg.max_len,
        "results": results,
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(run / "metrics.json", report)
    write_text_atomically(run / "metrics.md", markdown(report))
    return report


def describe(model: UserEncoder) -> str:
    c = model.cfg
    return f"{c.fusion} fusion of {'+'.join(c.features)}, {c.n_layers}x{c.d_model}, {model.num_parameters():,} params"


def markdown(report: dict) -> str:
    """Tables of test metrics (unmasked and masked), valid NDCG@10, and the run's history-length breakdown."""
    lines = [
        f"Dataset `{report['dataset']}`: {report['users']:,} users, {report['items']:,} items, "
        f"history window {report['max_history']}, full ranking.",
        "",
    ]
    for split in SPLITS:
        lines += [
            f"### {split}",
            "",
            "| model | variant | " + " | ".join(TABLE_METRICS) + " |",
            "|---|---|" + "---|" * len(TABLE_METRICS),
        ]
        for name, res in report["results"].items():
            for variant in VARIANTS:
                m = res[f"{split}/{variant}"]["all"]
                label = "unmasked (RecBole protocol)" if variant == "unmasked" else "masked (history excluded)"
                lines.append(f"| {name} | {label} | " + " | ".join(f"{m[k]:.4f}" for k in TABLE_METRICS) + " |")
        lines.append("")
    this = next(k for k in report["results"] if k.endswith("(this run)"))
    lines += [
        f"### test NDCG@10 by history length ({this})",
        "",
        "| events before target | users | unmasked | masked |",
        "|---|---|---|---|",
    ]
    un, ma = (report["results"][this][f"test/{v}"]["by_history_length"] for v in VARIANTS)
    for bucket, m in un.items():
        lines.append(f"| {bucket} | {m['users']} | {m['ndcg@10']:.4f} | {ma[bucket]['ndcg@10']:.4f} |")
    return "\n".join(lines) + "\n"
