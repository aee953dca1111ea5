"""Does the model read the order of the events? Each run of ``experiments/history_order.yaml``, scored with
every test user's history window in order and shuffled (``RUN/shuffled-0``), paired over the same users.

    python experiments/analyses/history_order.py [--runs runs/order] [--out F]

Per run, each metric's change (shuffled minus ordered) with its 95% bootstrap interval. A next_item run ranks
the stage-1 encoder's shortlist, which the shuffled history changes too, so two more figures separate what
the encoder reads from what the LLM reads: the encoder alone's change (its own order of its list, the
records' ``encoder_ranked``), and in each condition the run's gain over its shortlist in random order
(:func:`userllm.tasks.records.paired_vs_random_order`: what the LLM's order of the list adds). favorite_genre
asks which genre appears most often in the history, so its right answer does not depend on the order: a model
that reads the history well keeps its accuracy. Writes ``benchmarks/records/history_order.json``, keeping
the runs it already holds that ``--runs`` lacks (each run's entry says where it was measured), so the cells
can be run apart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from userllm.errors import InputError, run_script
from userllm.io import runtime, write_json
from userllm.metrics import paired_estimate
from userllm.tasks.records import paired_difference, paired_vs_random_order, read_records, saved_scoring
from userllm.tasks.scoring import per_example

OUT = Path(__file__).parents[2] / "benchmarks" / "records" / "history_order.json"  # committed: docs/results.md cites it


def encoder_change(run: Path, seed: int) -> dict[str, dict]:
    """The stage-1 encoder alone (its own top titles, ``encoder_ranked``) on the shuffled histories minus on
    the ordered ones, per user."""
    task, catalogue, beams = saved_scoring(run)
    sides = [{r["user_id"]: r for r in read_records(d)} for d in (run / "shuffled-0", run)]
    users = sorted(set(sides[0]) & set(sides[1]))
    values = [
        per_example(task, [{"ranked": s[u]["encoder_ranked"], "truth": s[u]["truth"]} for u in users], catalogue, beams)
        for s in sides
    ]
    return {m: paired_estimate([values[0][m]], [values[1][m]], seed=seed) for m in values[0]}


def history_order(run: Path, seed: int) -> dict:
    config = json.loads((run / "config.json").read_text())
    ordered, shuffled = (json.loads((d / "metrics.json").read_text()) for d in (run, run / "shuffled-0"))
    users, change = paired_difference(run / "shuffled-0", run, seed)
    out = {
        "task": config["task"],
        "method": config["method"],
        "users": users,
        "ordered": ordered["metrics"],
        "shuffled": shuffled["metrics"],
        "change": change,
    }
    if config["task"] == "next_item" and config.get("shortlist"):
        out["encoder_alone"] = {
            "ordered": ordered["references"]["encoder alone"],
            "shuffled": shuffled["references"]["encoder alone"],
        }
        out["encoder_alone_change"] = encoder_change(run, seed)
        out["gain_over_random_order"] = {
            "ordered": paired_vs_random_order(run, seed)[1],
            "shuffled": paired_vs_random_order(run / "shuffled-0", seed)[1],
        }
    return out


def kept_runs(record: Path) -> dict[str, dict]:
    """The runs an earlier record holds, each with the runtime it was measured under."""
    if not record.exists():
        return {}
    old = json.loads(record.read_text())
    return {name: {"runtime": old.get("runtime")} | res for name, res in old["runs"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/order"), help="the experiment's out directory")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    runs = sorted(p.parent.parent for p in args.runs.glob("*/*/shuffled-0/metrics.json"))
    if not runs:
        raise InputError(f"{args.runs}: no run scored both in order and shuffled (RUN/shuffled-0/metrics.json)")
    fmt = lambda m: f"{m['value']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]"  # noqa: E731
    out = {"runs": kept_runs(args.out)}
    for run in runs:
        out["runs"][f"{run.parent.name}/{run.name}"] = history_order(run, args.seed) | {"runtime": runtime()}
    out["runs"] = dict(sorted(out["runs"].items()))
    for name, res in out["runs"].items():
        metric = "accuracy" if res["task"] == "favorite_genre" else "recall@10"
        print(f"\n{name} ({res['method']}, {res['users']} users), {metric}:")
        print(f"  ordered {res['ordered'][metric]['value']:.3f}, shuffled {res['shuffled'][metric]['value']:.3f}")
        print(f"  shuffled minus ordered      {fmt(res['change'][metric])}")
        if "encoder_alone_change" in res:
            alone = {side: res["encoder_alone"][side][metric]["value"] for side in ("ordered", "shuffled")}
            print(f"  the encoder alone: ordered {alone['ordered']:.3f}, shuffled {alone['shuffled']:.3f}")
            print(f"  the encoder alone, change   {fmt(res['encoder_alone_change'][metric])}")
            for side, gain in res["gain_over_random_order"].items():
                print(f"  gain over random order, {side:<9}{fmt(gain[metric])}")
    write_json(args.out, out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    run_script(main)
