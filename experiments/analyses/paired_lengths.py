"""User-LLM's lead over TP at two history lengths, paired over the same test users (issue 13, target 3).

    python benchmarks/paired_lengths.py [--short runs/stage2/next_item] [--long runs/stage2-h200/next_item] [--out F]

Each test user is scored at both lengths on the same next item (their last event; only the window before it
differs), so the lead at each length (User-LLM minus TP) and the change of the lead between the lengths are
differences of per-user values, each with its 95% bootstrap interval over the users scored in all four runs
(:func:`userllm.metrics.estimate`). Target: the lead at the long length is at least as large as at the
short one (the paper: gains grow with history length), i.e. long lead minus short lead >= 0.

Both methods rerank the stage-1 encoder's shortlist, so the encoder's own order of it (the records'
``encoder_ranked``: one list per user and length, checked to be the same in both runs) is a reference: its
rows give the lead over TP that a reranker returning the encoder's order unchanged would have, at each length,
and its change between them. So is the shortlist in random order (its expected Recall@K,
:func:`userllm.tasks.evaluate.random_order`): each method's and the encoder's gain over it says how much their
order of the list finds, at each length. And how far each run's order follows the encoder's (:func:`follows_encoder`:
its first title the encoder's first, and the rank correlation over the encoder's top 10). Writes
``benchmarks/results/paired_lengths.json`` (or ``--out``).

``--unseen``: every ranking without the titles the user has already rated (any event before the target; in
MovieLens a user rates an item once, so they are never the answer), the masked protocol of stage 1, applied to
each method's exact ranking of the whole shortlist (``shortlist_scores``; ~40% of the encoder's 20 are rated
already); ``--unseen short`` (or ``long``) to one side's two runs only, e.g. to compare runs trained to leave
rated items out with older ones filtered afterwards. The encoder's own order is kept only to its 10th title,
so its rows are left out then.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

from userllm.data.dataset import PreparedDataset
from userllm.errors import InputError, run_script
from userllm.io import write_json
from userllm.metrics import estimate
from userllm.tasks.records import read_records, recorded_shortlist
from userllm.tasks.scoring import per_example, random_order

OUT = Path(__file__).parent / "results" / "paired_lengths.json"


def unseen(records: dict[str, dict], run: Path) -> tuple[dict[str, dict], dict[str, float]]:
    """``records`` (by user) ranked without the titles each user rated before the target: their whole shortlist
    in the run's exact order (``shortlist_scores``), already-rated titles removed; and over the users, the mean
    share of shortlisted titles already rated, of first answers already rated, and of targets whose title was."""
    ds = PreparedDataset(json.loads((run / "config.json").read_text())["dataset"])
    names, items = ds.item_titles, dict(zip(ds.sequences["user_id"], ds.sequences["item_idx"]))
    target = dict(ds.examples.filter(pl.col("split") == "test").select("user_id", "target_pos").iter_rows())
    out, shares = {}, {"shortlist": [], "first answer": [], "target": []}
    for u, r in records.items():
        rated = {names[i] for i in items[u][: target[u]]}
        listed = titles(r, run)
        out[u] = {
            **r,
            "ranked": [t for t in listed if t not in rated],
            "shortlist_scores": [s for s in r["shortlist_scores"] if s[0] not in rated],
        }
        for name, share in (
            ("shortlist", np.mean([t in rated for t in listed])),
            ("first answer", r["ranked"][0] in rated),
            ("target", r["truth"] in rated),
        ):
            shares[name].append(float(share))
    return out, {name: float(np.mean(v)) for name, v in shares.items()}


def titles(record: dict, run: Path) -> list[str]:
    """The whole shortlist ``run`` ranked for a record, in its order
    (:func:`~userllm.tasks.evaluate.recorded_shortlist`)."""
    listed = recorded_shortlist(record)
    if listed is None:
        raise InputError(
            f"{run}: user {record['user_id']} has no shortlist_scores; the runs must rank their whole "
            "shortlist exactly (shortlist_ranking: exact)"
        )
    return listed


def follows_encoder(record: dict, run: Path) -> tuple[float, float]:
    """How far a run's order of its shortlist follows the stage-1 encoder's: 1[its first title is the
    encoder's first], and the Spearman rank correlation between the two orders of the encoder's top titles
    (``encoder_ranked``, its first 10; a random order's expected values: 1 / list length and 0)."""
    position = {t: i for i, t in enumerate(titles(record, run))}
    top = record["encoder_ranked"]
    mine = np.argsort(np.argsort([position[t] for t in top]))  # each encoder title's rank in the run's order
    rho = float(np.corrcoef(np.arange(len(top)), mine)[0, 1]) if len(top) > 1 else float("nan")
    return float(min(position, key=position.get) == top[0]), rho


def four_runs_arguments(ap: argparse.ArgumentParser, out: Path, long: str = "runs/stage2-h200/next_item") -> None:
    """The options naming the four runs (User-LLM and TP at the short and the long length), with these
    defaults: the 50-event exact-ranking pair and the 200-event pair in ``long``; and ``--out`` (default
    ``out``)."""
    ap.add_argument("--short", type=Path, default=Path("runs/stage2/next_item"), help="the 50-event cells' folder")
    ap.add_argument("--long", type=Path, default=Path(long), help="the 200-event cells' folder")
    ap.add_argument(
        "--short-cells",
        default="shortlist20-proj-tpflops-exact,tp-256-shortlist20-exact",
        help="User-LLM cell,TP cell at the short length",
    )
    ap.add_argument(
        "--long-cells",
        default="shortlist20-proj-tpflops-h200,tp-h200-shortlist20",
        help="User-LLM cell,TP cell at the long length",
    )
    ap.add_argument(
        "--users-of",
        type=Path,
        help="only the users of a seeded subset a run was scored on (its "
        "eval_users-N-seedS.json), e.g. the figures of a TP run before --extend carried it to every user",
    )
    ap.add_argument("--out", type=Path, default=out, help="where the figures are written as JSON")


def four_runs(args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, dict[str, dict]], list[str]]:
    """The runs :func:`four_runs_arguments` name, as {"User-LLM short" | "TP short" | ...: run}, their records by
    user and the users all four scored (of those ``--users-of`` lists, when given: user indices of the dataset)."""
    runs = {
        f"{method} {length}": folder / cell
        for length, folder, cells in (("short", args.short, args.short_cells), ("long", args.long, args.long_cells))
        for method, cell in zip(("User-LLM", "TP"), cells.split(","))
    }
    records = {name: {r["user_id"]: r for r in read_records(run)} for name, run in runs.items()}
    users = sorted(set.intersection(*(set(r) for r in records.values())), key=str)
    if args.users_of:
        ids = PreparedDataset(json.loads((runs["TP short"] / "config.json").read_text())["dataset"]).sequences[
            "user_id"
        ]
        subset = {ids[i] for i in json.loads(args.users_of.read_text())}
        users = [u for u in users if u in subset]
    if not users:
        raise InputError(f"no test user is scored in all of {', '.join(map(str, runs.values()))}")
    return runs, records, users


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    four_runs_arguments(ap, OUT)
    ap.add_argument(
        "--unseen",
        nargs="?",
        const="both",
        choices=("both", "short", "long"),
        help="rank without the titles each user has already rated (both lengths' runs, or one's)",
    )
    args = ap.parse_args()
    runs, records, users = four_runs(args)
    for u in users:
        if len({records[name][u]["truth"] for name in records}) != 1:
            raise InputError(
                f"user {u} has different next items across {', '.join(map(str, runs.values()))}: "
                "the runs are not of the same test split"
            )
        for length in ("short", "long"):
            ul, tp = records[f"User-LLM {length}"][u], records[f"TP {length}"][u]
            same = set(titles(ul, runs[f"User-LLM {length}"])) == set(titles(tp, runs[f"TP {length}"]))
            if ul["encoder_ranked"] != tp["encoder_ranked"] or not same:
                raise InputError(
                    f"user {u}: the {length} User-LLM and TP runs rerank different encoder shortlists "
                    f"({runs[f'User-LLM {length}']}, {runs[f'TP {length}']})"
                )
    encoder = {
        f"encoder {length}": {
            u: {"ranked": r["encoder_ranked"], "truth": r["truth"]} for u, r in records[f"User-LLM {length}"].items()
        }
        for length in ("short", "long")
    }
    rated = {}
    if args.unseen:
        for name in [n for n in records if args.unseen in ("both", n.split()[-1])]:
            records[name], rated[name] = unseen(records[name], runs[name])
        encoder = {}
        for name, shares in rated.items():
            print(f"{name}: already rated: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    fmt = lambda m, sign: f"{m['value']:{sign}.3f} [{m['low']:{sign}.3f}, {m['high']:{sign}.3f}]"  # noqa: E731
    out = {
        "users": len(users),
        "runs": {k: str(v) for k, v in runs.items()},
        "unseen": args.unseen,
        "rated": rated,
        "metrics": {},
    }
    print(f"{len(users)} users scored in all four runs: " + ", ".join(f"{k} = {v}" for k, v in runs.items()))
    recalls = {
        name: per_example("next_item", [recs[u] for u in users], set(), 10)
        for name, recs in {**records, **encoder}.items()
    }
    for length in ("short", "long"):  # the list each user's two runs ranked (without rated titles with --unseen)
        recs = [records[f"TP {length}"][u] for u in users]
        lists = [titles(r, runs[f"TP {length}"]) for r in recs]
        recalls[f"random order {length}"] = random_order(lists, [r["truth"] for r in recs], 10)
    for k in (1, 5, 10):
        v = {name: np.array(r[f"recall@{k}"]) for name, r in recalls.items()}
        references = ("encoder",) if encoder else ()
        lead = {
            m: {length: v[f"{m} {length}"] - v[f"TP {length}"] for length in ("short", "long")}
            for m in ("User-LLM", *references)
        }
        rows = {
            **{name: estimate(x) for name, x in v.items()},
            "lead short (User-LLM - TP)": estimate(lead["User-LLM"]["short"]),
            "lead long (User-LLM - TP)": estimate(lead["User-LLM"]["long"]),
            "lead long - lead short (target >= 0)": estimate(lead["User-LLM"]["long"] - lead["User-LLM"]["short"]),
        }
        if encoder:
            rows |= {
                "encoder's order: lead short (encoder - TP)": estimate(lead["encoder"]["short"]),
                "encoder's order: lead long (encoder - TP)": estimate(lead["encoder"]["long"]),
                "encoder's order: lead long - lead short": estimate(lead["encoder"]["long"] - lead["encoder"]["short"]),
            }
        rows |= {
            f"{m} {length} - random order": estimate(v[f"{m} {length}"] - v[f"random order {length}"])
            for length in ("short", "long")
            for m in ("User-LLM", "TP", *references)
        }
        rows |= {
            f"{m} long - short": estimate(v[f"{m} long"] - v[f"{m} short"]) for m in ("User-LLM", "TP", *references)
        }
        out["metrics"][f"recall@{k}"] = rows
        print(f"\nrecall@{k}")
        for name, m in rows.items():
            print(f"  {name:<45} {fmt(m, '' if name in v else '+')}")
    if encoder:  # without rated titles the encoder's order is kept to its 10th title only: no agreement rows
        print("\nhow far each order follows the encoder's (random order: 1 / list length, and 0)")
        out["follows encoder"] = {}
        for name in records:
            first, rho = np.array([follows_encoder(records[name][u], runs[name]) for u in users]).T
            out["follows encoder"][name] = {
                "first title the encoder's": estimate(first),
                "spearman, encoder's top 10": estimate(rho),
            }
            print(
                f"  {name:<15} first title the encoder's {fmt(estimate(first), '')}   "
                f"Spearman over the encoder's top 10 {fmt(estimate(rho), '+')}"
            )
    write_json(args.out, out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    run_script(main)
