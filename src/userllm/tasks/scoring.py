"""The task metrics of a list of scored records, and the reference rows scored on the same users.

A record is one test example's answers (``records.jsonl``): ``truth``, ``ranked`` (the constrained search's
answers, best first), ``greedy`` (free generation; None for favorite_genre and reference rows). Each
metric is the mean over the records with its 95% bootstrap interval (:func:`~userllm.metrics.estimate`).
"""

from __future__ import annotations

from collections import Counter

from userllm.metrics import estimate, list_ranks, random_order_recall, recall_values, rouge_per_example
from userllm.tasks.data import TaskData, TaskExample
from userllm.tasks.pipeline import shortlist_titles

HISTORY_BUCKETS = (10, 25, 50, 100, 200)  # upper edges of the history-length buckets; the last is open


def history_bucket(length: int) -> str:
    low = 0
    for high in HISTORY_BUCKETS:
        if length <= high:
            return f"{low + 1}-{high}"
        low = high
    return f">{HISTORY_BUCKETS[-1]}"


def per_example(task: str, records: list[dict], catalogue: set[str], beams: int) -> dict[str, list[float]]:
    """Each metric of the task, per record (see the module table); records without a greedy answer (reference
    rows) have no exact_match / valid_title."""
    if task == "review":
        return rouge_per_example([r["greedy"] for r in records], [r["truth"] for r in records])
    ranks = list_ranks([r["ranked"] for r in records], [r["truth"] for r in records])
    if task == "favorite_genre":
        return {"accuracy": recall_values(ranks, 1).tolist()}
    out = {f"recall@{k}": recall_values(ranks, k).tolist() for k in (1, 5, 10) if k <= beams}
    if all(r.get("greedy") is not None for r in records):
        out["exact_match"] = [float(r["greedy"] == r["truth"]) for r in records]
        out["valid_title"] = [float(r["greedy"] in catalogue) for r in records]
    return out


def score(task: str, records: list[dict], catalogue: set[str], beams: int, seed: int = 0) -> dict[str, dict]:
    """``{metric: {"value", "low", "high"}}``: mean over the records and 95% bootstrap interval (seeded)."""
    return {name: estimate(v, seed=seed) for name, v in per_example(task, records, catalogue, beams).items()}


def review_key(text: str) -> str:
    """A review as ROUGE sees it: lowercased, whitespace collapsed, end punctuation dropped."""
    return " ".join(text.lower().split()).strip(".!?,;: ")


def label_prior(data: TaskData, users: list[int] | None, beams: int, seed: int = 0) -> dict[str, dict]:
    """The task's metrics for answers that ignore the user, on the test examples of ``users`` (None: all):
    the train split's most frequent answers, most frequent first (next_item: popularity, the ``beams`` most
    frequent target titles; favorite_genre: always the most frequent genre; review: the most common review,
    compared as :func:`review_key` writes it), scored by :func:`score`. What a model learns first."""
    answers = data.answers("train")
    if data.task == "review":
        answers = [review_key(a) for a in answers]
    ranked = [answer for answer, _ in Counter(answers).most_common(beams)]
    records = [{"ranked": ranked, "greedy": ranked[0], "truth": truth} for truth in data.answers("test", users)]
    return score(data.task, records, set(data.ds.item_titles[2:]), beams, seed)


def encoder_records(encoder, data: TaskData, examples: list[TaskExample], beams: int) -> list[dict]:
    """next_item as the stage-1 encoder answers it: per example the titles of its ``beams`` highest-scoring
    items (:meth:`TaskData.encoder_top`) and the truth."""
    top = data.encoder_top(encoder, examples, beams)
    return [
        {"user_id": ex.user_id, "ranked": [data.ds.item_titles[i] for i in row], "truth": ex.answer}
        for row, ex in zip(top, examples)
    ]


def random_order(lists: list[list[str]], truths: list[str], beams: int) -> dict[str, list[float]]:
    """next_item's Recall@{1,5,10} (those <= ``beams``) of each shortlist of distinct titles in uniformly random
    order, expected (:func:`~userllm.metrics.random_order_recall`), per example: what a reranker that
    ignores the user gets from the list alone."""
    return {f"recall@{k}": random_order_recall(lists, truths, k).tolist() for k in (1, 5, 10) if k <= beams}


def references(
    cfg,
    data: TaskData,
    examples: list[TaskExample],
    users: list[int] | None,
    seed: int,
    records: list[dict] | None = None,
    encoder=None,
    shortlist: dict[str, list[int]] | None = None,
) -> dict[str, dict]:
    """The reference rows of a run's table on the same test users: ``label prior`` (review: ``most common
    review``) and, for next_item, ``encoder alone`` (``encoder``: the run's stage-1 encoder,
    :func:`stage1_encoder`, None without one; each of ``records``, the run's own, gets the encoder's answers
    as ``encoder_ranked``, for paired differences) and with ``shortlist`` ({user_id: item indices},
    :func:`shortlists`) ``shortlist in random order`` (:func:`random_order`)."""
    out = {}
    out["most common review" if data.task == "review" else "label prior"] = label_prior(
        data, users, cfg.beams if data.task == "next_item" else 1, seed
    )
    if encoder is not None and data.task == "next_item":
        alone = encoder_records(encoder, data, examples, cfg.beams)
        out["encoder alone"] = score("next_item", alone, set(), cfg.beams, seed)
        by_user = {r["user_id"]: r["ranked"] for r in alone}
        for r in records or []:
            r["encoder_ranked"] = by_user[r["user_id"]]
    if shortlist is not None and data.task == "next_item":
        lists = [shortlist_titles(data.ds.item_titles, shortlist[ex.user_id]) for ex in examples]
        values = random_order(lists, [ex.answer for ex in examples], cfg.beams)
        out["shortlist in random order"] = {m: estimate(v, seed=seed) for m, v in values.items()}
    return out
