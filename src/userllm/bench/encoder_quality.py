"""Encoder quality on MovieLens-100K against RecBole 1.2.1's SASRec, measured side by side in one run.

Same data and protocol as the RecBole reference (all 100,000 ratings, no filtering, leave-one-out by time,
full ranking over all 1,682 items, history window 50, model selection on valid NDCG@10). Trains, with the
same recipe and the same wall-clock budget, the multi-feature early-fusion encoder and the item-only
(SASRec-style) configuration, then evaluates both beside popularity and a random-init encoder, unmasked
(RecBole's protocol) and masked (history excluded).

    python -m userllm.bench.encoder_quality [--epochs 40] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

from userllm.config import EncoderConfig, PrepareConfig, PretrainConfig
from userllm.data import prepare_dataset
from userllm.encoder.evaluate import evaluate_run
from userllm.encoder.train import pretrain

HERE = Path("benchmarks")  # run from the repository root: writes benchmarks/.cache and benchmarks/results

# RecBole 1.2.1's SASRec on the same data and protocol (its own run; benchmarks/README.md): test split
RECBOLE = {
    "SASRec, unmasked (RecBole protocol)": {
        "recall@1": 0.0159,
        "recall@5": 0.0689,
        "recall@10": 0.1251,
        "recall@20": 0.2301,
        "ndcg@10": 0.0609,
        "mrr@10": 0.0417,
    },
    "SASRec, same checkpoint, masked": {
        "recall@1": 0.0318,
        "recall@5": 0.1241,
        "recall@10": 0.2057,
        "recall@20": 0.3043,
        "ndcg@10": 0.1035,
        "mrr@10": 0.0727,
    },
}
TARGETS = {"unmasked": {"ndcg@10": 0.0609, "recall@10": 0.1251}, "masked": {"ndcg@10": 0.1035, "recall@10": 0.2057}}
COLUMNS = ("recall@1", "recall@5", "recall@10", "recall@20", "ndcg@10", "mrr@10")
MULTI = ["item", "rating", "category", "time_gap"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=None, help="optional cap on training seconds per encoder")
    parser.add_argument("--epochs", type=int, default=PretrainConfig().epochs)
    args = parser.parse_args()
    cache = HERE / ".cache"
    data = cache / "ml-100k"
    if not (data / "manifest.json").exists():
        prepare_dataset(PrepareConfig(out=data, force=True))
    runs = {}
    for name, features in (("multi-feature early fusion", MULTI), ("item-only (SASRec-style)", ["item"])):
        out = cache / ("encoder-multi" if len(features) > 1 else "encoder-item")
        cfg = PretrainConfig(
            dataset=data,
            out=out,
            force=True,
            epochs=args.epochs,
            time_budget_s=args.budget,
            patience=args.epochs,
            encoder=EncoderConfig(features=features),
        )
        summary = pretrain(cfg)
        history = json.loads((out / "history.json").read_text())
        best = next(r for r in history if r["epoch"] == summary["best_epoch"])
        runs[name] = {
            "out": out,
            "summary": summary,
            "time_to_best_s": best["train_seconds"],
            "events_per_s": sum(r["events_per_s"] for r in history) / len(history),
        }
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    multi, item = (runs[k]["out"] for k in runs)
    report = evaluate_run(multi, compare=[item])
    res = report["results"]
    rows = {
        "popularity": res["popularity"],
        "random-init encoder": res["random-init encoder"],
        "multi-feature early fusion": res[f"{multi.name} (this run)"],
        "item-only (SASRec-style)": res[item.name],
    }
    print(f"\nMovieLens-100K test split, full ranking over {report['items']:,} items, history window 50\n")
    print("| model (test) | " + " | ".join(COLUMNS) + " | training |")
    print("|---|" + "---|" * (len(COLUMNS) + 1))
    for name, m in RECBOLE.items():
        print(f"| RecBole 1.2.1 {name} | " + " | ".join(f"{m[c]:.4f}" for c in COLUMNS) + " | reference |")
    for name, r in rows.items():
        for variant in ("unmasked", "masked"):
            m = r[f"test/{variant}"]["all"]
            run = runs.get(name)
            train = (
                (
                    f"{run['summary']['epochs']} epochs, {run['summary']['train_seconds']:.0f} s, best epoch "
                    f"{run['summary']['best_epoch']} at {run['time_to_best_s']:.0f} s"
                )
                if run
                else "-"
            )
            print(f"| {name}, {variant} | " + " | ".join(f"{m[c]:.4f}" for c in COLUMNS) + f" | {train} |")
    print("\n| target (multi-feature, test) | ours | RecBole SASRec | ratio | met |")
    print("|---|---|---|---|---|")
    ok = True
    for variant, targets in TARGETS.items():
        for metric, ref in targets.items():
            ours = rows["multi-feature early fusion"][f"test/{variant}"]["all"][metric]
            ok &= ours >= ref
            print(
                f"| {metric} {variant} | {ours:.4f} | {ref:.4f} | {ours / ref:.2f} | {'yes' if ours >= ref else 'NO'} |"
            )
    multi_run = runs["multi-feature early fusion"]
    fast = multi_run["time_to_best_s"] <= 300
    print(
        f"\ntime to best epoch: {multi_run['time_to_best_s']:.0f} s (target <= 300 s: {'yes' if fast else 'NO'}); "
        f"RecBole needed ~38 min to its best epoch"
    )
    for name, run in runs.items():
        print(f"{name}: {run['events_per_s']:,.0f} training events/s, {run['summary']['parameters']:,} parameters")
    d = {
        v: rows["multi-feature early fusion"][f"test/{v}"]["all"]["ndcg@10"]
        - rows["item-only (SASRec-style)"][f"test/{v}"]["all"]["ndcg@10"]
        for v in ("unmasked", "masked")
    }
    print(f"multi-feature minus item-only, test NDCG@10: unmasked {d['unmasked']:+.4f}, masked {d['masked']:+.4f}")
    print(f"peak RSS of this process: {peak_gb:.2f} GB")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "encoder_quality.json").write_text(
        json.dumps(
            {
                "rows": {k: {v: r[f"test/{v}"]["all"] for v in ("unmasked", "masked")} for k, r in rows.items()},
                "runs": {
                    k: {**r["summary"], "time_to_best_s": r["time_to_best_s"], "events_per_s": r["events_per_s"]}
                    for k, r in runs.items()
                },
                "peak_rss_gb": peak_gb,
                "targets_met": bool(ok and fast),
            },
            indent=2,
        )
    )
    print("targets met" if ok and fast else "TARGETS MISSED")


if __name__ == "__main__":
    main()
