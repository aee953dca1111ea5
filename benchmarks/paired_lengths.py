"""User-LLM's lead over TP at two history lengths, paired over the same test users (issue 13, target 3).

    python benchmarks/paired_lengths.py [--short runs/stage2/next_item] [--long runs/stage2-h200/next_item] [--out F]

Each test user is scored at both lengths on the same next item (their last event; only the window before it
differs), so the lead at each length (User-LLM minus TP) and the change of the lead between the lengths are
differences of per-user values, each with its 95% bootstrap interval over the users scored in all four runs
(:func:`userllm.eval.metrics.estimate`). Target: the lead at the long length is at least as large as at the
short one (the paper: gains grow with history length), i.e. long lead minus short lead >= 0.

Both methods rerank the stage-1 encoder's shortlist, so the encoder's own order of it (the records'
``encoder_ranked``: one list per user and length, checked to be the same in both runs) is a reference: its
rows give the lead over TP that a reranker returning the encoder's order unchanged would have, at each length,
and its change between them. Writes ``benchmarks/results/paired_lengths.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from userllm.errors import InputError, run_script
from userllm.eval.metrics import estimate
from userllm.io import write_json
from userllm.tasks.evaluate import per_example, read_records

OUT = Path(__file__).parent / "results" / "paired_lengths.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--short", type=Path, default=Path("runs/stage2/next_item"), help="the 50-event cells' folder")
    ap.add_argument("--long", type=Path, default=Path("runs/stage2-h200/next_item"), help="the 200-event cells' folder")
    ap.add_argument("--short-cells", default="shortlist20-proj-tpflops-exact,tp-256-shortlist20-exact",
                    help="User-LLM cell,TP cell at the short length")  # fmt: skip
    ap.add_argument("--long-cells", default="shortlist20-proj-tpflops-h200,tp-h200-shortlist20",
                    help="User-LLM cell,TP cell at the long length")  # fmt: skip
    ap.add_argument("--out", type=Path, default=OUT, help="where the figures are written as JSON")
    args = ap.parse_args()
    runs = {f"{method} {length}": folder / cell
            for length, folder, cells in (("short", args.short, args.short_cells), ("long", args.long, args.long_cells))
            for method, cell in zip(("User-LLM", "TP"), cells.split(","))}  # fmt: skip
    records = {name: {r["user_id"]: r for r in read_records(run)} for name, run in runs.items()}
    users = sorted(set.intersection(*(set(r) for r in records.values())), key=str)
    if not users:
        raise InputError(f"no test user is scored in all of {', '.join(map(str, runs.values()))}")
    for u in users:
        if len({records[name][u]["truth"] for name in records}) != 1:
            raise InputError(f"user {u} has different next items across {', '.join(map(str, runs.values()))}: "
                             "the runs are not of the same test split")  # fmt: skip
        for length in ("short", "long"):
            if records[f"User-LLM {length}"][u]["encoder_ranked"] != records[f"TP {length}"][u]["encoder_ranked"]:
                raise InputError(f"user {u}: the {length} User-LLM and TP runs rerank different encoder shortlists "
                                 f"({runs[f'User-LLM {length}']}, {runs[f'TP {length}']})")  # fmt: skip
    encoder = {f"encoder {length}": {u: {"ranked": r["encoder_ranked"], "truth": r["truth"]}
                                     for u, r in records[f"User-LLM {length}"].items()}
               for length in ("short", "long")}  # fmt: skip
    fmt = lambda m, sign: f"{m['value']:{sign}.3f} [{m['low']:{sign}.3f}, {m['high']:{sign}.3f}]"  # noqa: E731
    out = {"users": len(users), "runs": {k: str(v) for k, v in runs.items()}, "metrics": {}}
    print(f"{len(users)} users scored in all four runs: " + ", ".join(f"{k} = {v}" for k, v in runs.items()))
    recalls = {name: per_example("next_item", [recs[u] for u in users], set(), 10)
               for name, recs in {**records, **encoder}.items()}  # fmt: skip
    for k in (1, 5, 10):
        v = {name: np.array(r[f"recall@{k}"]) for name, r in recalls.items()}
        lead = {m: {length: v[f"{m} {length}"] - v[f"TP {length}"] for length in ("short", "long")}
                for m in ("User-LLM", "encoder")}  # fmt: skip
        rows = {
            **{name: estimate(x) for name, x in v.items()},
            "lead short (User-LLM - TP)": estimate(lead["User-LLM"]["short"]),
            "lead long (User-LLM - TP)": estimate(lead["User-LLM"]["long"]),
            "lead long - lead short (target >= 0)": estimate(lead["User-LLM"]["long"] - lead["User-LLM"]["short"]),
            "encoder's order: lead short (encoder - TP)": estimate(lead["encoder"]["short"]),
            "encoder's order: lead long (encoder - TP)": estimate(lead["encoder"]["long"]),
            "encoder's order: lead long - lead short": estimate(lead["encoder"]["long"] - lead["encoder"]["short"]),
            **{f"{m} long - short": estimate(v[f"{m} long"] - v[f"{m} short"]) for m in ("User-LLM", "TP", "encoder")},
        }  # fmt: skip
        out["metrics"][f"recall@{k}"] = rows
        print(f"\nrecall@{k}")
        for name, m in rows.items():
            print(f"  {name:<45} {fmt(m, '' if name in v else '+')}")
    write_json(args.out, out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    run_script(main)
