"""A scored run's records (``records.jsonl``, one line per test user) and the comparisons drawn from them.

``records.partial.jsonl`` holds an unfinished scoring's records, appended batch by batch, so an interrupted
scoring resumes (:func:`load_partial`). Comparisons pair runs per user: :func:`paired_difference` (run A
minus run B), :func:`paired_vs_encoder` and :func:`paired_vs_random_order` (a run minus a reference on its
own users), each with its 95% bootstrap interval.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from userllm.data.dataset import PreparedDataset
from userllm.errors import InputError
from userllm.metrics import paired_estimate
from userllm.tasks.scoring import per_example, random_order, score

RECORDS = "records.jsonl"  # one line per scored test example: user_id, history_len, truth, ranked, greedy


PARTIAL = "records.partial.jsonl"  # the records of an unfinished scoring, appended batch by batch (resumed)


def recorded_shortlist(record: dict) -> list[str] | None:
    """The whole shortlist a next_item record's run ranked, in the run's order (its ``shortlist_scores``);
    None for a record scored without them (a beam search keeps only its top titles)."""
    return [t for t, *_ in record["shortlist_scores"]] if "shortlist_scores" in record else None


def load_partial(run_dir: Path, model_id: str) -> tuple[Path, dict[str, dict]]:
    """The partial records file of ``run_dir`` and the records it holds by user id: those of an interrupted
    scoring of the same trained model and scoring (its first line names them, :func:`scoring_id`; a file from
    an earlier training or another scoring is discarded)."""
    path = Path(run_dir) / PARTIAL
    done: dict[str, dict] = {}
    if path.exists():
        lines = path.read_text().splitlines()
        if lines and json.loads(lines[0]).get("model") == model_id:
            for line in lines[1:]:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # the line a kill cut short: scored again
                    continue
                done[r["user_id"]] = r
    if not done:
        path.write_text(json.dumps({"model": model_id}) + "\n")
    return path, done


def finished_records(run_dir: Path, wanted: set[str]) -> dict[str, dict]:
    """The records of ``run_dir``'s finished scoring by user id (checked :func:`extendable`), to be kept by a
    scoring that extends it to more users (``evaluate(..., extend=True)``), only if every user it holds is in
    ``wanted``."""
    records = {r["user_id"]: r for r in read_records(run_dir)}
    if outside := set(records) - wanted:
        raise InputError(
            f"{run_dir}/{RECORDS}: {len(outside)} scored users are not in the users asked for; "
            "--extend only adds users (score a smaller set with --force)"
        )
    return records


def scored_users(run_dir: Path) -> set[str]:
    """The user ids a scored run's ``records.jsonl`` holds."""
    return {json.loads(line)["user_id"] for line in (Path(run_dir) / RECORDS).read_text().splitlines()}


def rescore(run_dir: Path, user_ids: set[str], seed: int = 0) -> dict[str, dict]:
    """A scored run's metrics on some of its test users only (from ``records.jsonl``), e.g. the users another
    run was scored on, so that both are compared on the same users."""
    records = read_records(run_dir, user_ids)
    if len({r["user_id"] for r in records}) != len(user_ids):
        raise InputError(f"{run_dir}: scored {len(records)} of the {len(user_ids)} users asked for")
    task, catalogue, beams = saved_scoring(run_dir)
    return score(task, records, catalogue, beams, seed)


def saved_scoring(run_dir: Path) -> tuple[str, set[str], int]:
    """What :func:`score` needs of a scored run, from its saved config: the task, the catalogue's titles
    (next_item) and the ranked answers' depth (``beams``; 1 for favorite_genre)."""
    cfg = json.loads((Path(run_dir) / "config.json").read_text())
    if cfg["task"] != "next_item":
        return cfg["task"], set(), 1
    return cfg["task"], set(PreparedDataset(cfg["dataset"]).item_titles[2:]), cfg["beams"]


def read_records(run_dir: Path, user_ids: set[str] | None = None) -> list[dict]:
    """A scored run's ``records.jsonl`` (of ``user_ids`` only, when given)."""
    path = Path(run_dir) / RECORDS
    if not path.exists():
        raise InputError(f"{run_dir} has no {RECORDS} (scored before userllm kept them): score it again with --force")
    records = list(map(json.loads, path.read_text().splitlines()))
    return records if user_ids is None else [r for r in records if r["user_id"] in user_ids]


def answer_summary(run_dir: Path, user_ids: set[str] | None = None) -> str:
    """How varied a scored run's answers are (its top answer per user: the greedy text, else the first
    ranked one): ``"N distinct; top 'X' P%"``. A model that writes one answer for everyone shows it here,
    whatever its metrics; '-' without records."""
    try:
        records = read_records(run_dir, user_ids)
    except InputError:
        return "-"
    answers = Counter(r["greedy"] if r.get("greedy") is not None else (r["ranked"] or [""])[0] for r in records)
    if not answers:
        return "-"
    top, n = answers.most_common(1)[0]
    return f"{len(answers)} distinct; top '{top[:40]}' {n / len(records):.0%}"


def paired_difference(run_a: Path | list[Path], run_b: Path | list[Path], seed: int = 0) -> tuple[int, dict[str, dict]]:
    """Run A minus run B on the test users both were scored on: the number of users and, per metric, the mean
    per-user difference with its 95% bootstrap interval (users resampled with both runs' answers together,
    so the interval is that of the difference itself, narrower than two separate intervals suggest).

    Either side may be several runs of one recipe (e.g. its training seeds): each user's metric is then the
    mean over that side's runs, over the users all runs were scored on, and the interval also resamples the
    runs (:func:`~userllm.metrics.paired_estimate`), so it includes the spread between training runs that
    a single pair of runs cannot show."""
    sides = [[Path(r) for r in ([run] if isinstance(run, (str, Path)) else run)] for run in (run_a, run_b)]
    if not all(sides):
        raise InputError("compare needs at least one run on each side")
    records = [[{r["user_id"]: r for r in read_records(run)} for run in side] for side in sides]
    tasks = {json.loads((r / "config.json").read_text())["task"] for side in sides for r in side}
    if len(tasks) > 1:
        raise InputError(f"the runs compared are of different tasks ({sorted(tasks)}): compare runs of one task")
    users = sorted(set.intersection(*(set(recs) for side in records for recs in side)))
    if not users:
        raise InputError(f"{' / '.join(str(r) for side in sides for r in side)} were scored on no common test user")
    return len(users), _paired(sides[0][0], *([[recs[u] for u in users] for recs in side] for side in records), seed)


def paired_vs_encoder(run: Path, seed: int = 0) -> tuple[int, dict[str, dict]]:
    """A next_item run minus the stage-1 encoder alone (its own top titles, kept in the run's records as
    ``encoder_ranked``), per user, over the run's users: does the LLM rank better than the encoder it read?"""
    records = [r for r in read_records(run) if r.get("encoder_ranked") is not None]
    if not records:
        raise InputError(
            f"{run}: its records hold no encoder answers (no stage-1 encoder, or scored before "
            "userllm kept them): score it again with --force"
        )
    alone = [{"ranked": r["encoder_ranked"], "truth": r["truth"]} for r in records]
    return len(records), _paired(run, [records], [alone], seed)


def paired_vs_random_order(run: Path, seed: int = 0) -> tuple[int, dict[str, dict]]:
    """A next_item run minus its shortlist in random order (:func:`random_order`, from the whole list its
    records keep as ``shortlist_scores``), per user, over the run's users: does the LLM's order of the list
    find the next item more often than no order at all?"""
    records = [r for r in read_records(run) if recorded_shortlist(r) is not None]
    if not records:
        raise InputError(
            f"{run}: its records hold no whole shortlist (shortlist_scores: a next_item run scored "
            "with a shortlist); score it so, with --force"
        )
    lists = [recorded_shortlist(r) for r in records]
    beams = json.loads((Path(run) / "config.json").read_text())["beams"]
    return len(records), _paired_values(
        [per_example("next_item", records, set(), beams)],
        [random_order(lists, [r["truth"] for r in records], beams)],
        seed,
    )


def _paired(run: Path, a: list[list[dict]], b: list[list[dict]], seed: int) -> dict[str, dict]:
    """Per metric (both sides' records have), the mean per-user difference a - b with its bootstrap interval;
    ``a`` and ``b`` hold one record list per run, each over the same users in the same order."""
    task, catalogue, beams = saved_scoring(run)
    va, vb = ([per_example(task, recs, catalogue, beams) for recs in side] for side in (a, b))
    return _paired_values(va, vb, seed)


def _paired_values(va: list[dict[str, list[float]]], vb: list[dict[str, list[float]]], seed: int) -> dict[str, dict]:
    """Per metric both sides have, :func:`~userllm.metrics.paired_estimate` of the per-example values of
    ``va`` minus ``vb`` (one {metric: values} per run, each over the same users in the same order)."""
    return {
        m: paired_estimate([v[m] for v in va], [v[m] for v in vb], seed=seed)
        for m in va[0]
        if all(m in v for v in va + vb)
    }
