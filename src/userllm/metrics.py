"""Ranking metrics for next-item prediction with full ranking over the catalogue.

All take the 0-based ``rank`` of the target item among the scored items (0 = ranked first) and average over
examples. Ties are broken by item index (a stable sort), so a model that scores everything equally gets
the rank of the target's index, never an optimistic 0.

- ``Recall@K  = 1[rank < K]`` (the hit rate: one target per example)
- ``NDCG@K    = 1[rank < K] / log2(rank + 2)`` (one relevant item, so the ideal DCG is 1)
- ``MRR@K     = 1[rank < K] / (rank + 1)``

Generated answers: a ranked list of answers (e.g. titles from a constrained beam search) gives the rank of
the target's position in the list (:func:`list_ranks`; absent = never ranked), so the same formulas apply;
``accuracy = mean 1[top answer == truth]`` is Recall@1 of that list; ROUGE-1/2/Lsum are rouge-score's F-measures
(:func:`rouge_scores`), in 0..1, averaged over examples. A reranker of a shortlist L is compared with L in
uniformly random order, whose expected ``Recall@K = 1[target in L] * min(1, K / |L|)`` (|L| distinct
answers; :func:`random_order_recall`).

Uncertainty (:func:`estimate`): a metric is the mean of per-example values x_1..x_N (one test example per
user), reported with its 95% percentile-bootstrap interval: the 2.5th and 97.5th percentiles of the mean
over ``resamples`` seeded resamples of the N users with replacement.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

RECALL_KS, NDCG_KS, MRR_KS = (1, 5, 10, 20), (5, 10, 20), (10,)
NOT_RANKED = 1 << 30  # rank of a target missing from a ranked list


def target_ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """scores (b, V), targets (b,) -> 0-based rank of each target (b,), ties broken by item index."""
    t = scores.gather(1, targets[:, None])
    index = torch.arange(scores.shape[1], device=scores.device)[None, :]
    ahead = (scores > t) | ((scores == t) & (index < targets[:, None]))
    return ahead.sum(1)


def recall_values(ranks: Tensor, k: int) -> Tensor:
    """Recall@K of each example: (b,) ranks -> (b,) values (their mean is :func:`recall_at`)."""
    return (ranks < k).float()


def ndcg_values(ranks: Tensor, k: int) -> Tensor:
    """NDCG@K of each example: (b,) ranks -> (b,) values (their mean is :func:`ndcg_at`)."""
    return (ranks < k).float() / torch.log2(ranks.float() + 2)


def recall_at(ranks: Tensor, k: int) -> float:
    return recall_values(ranks, k).mean().item()


def ndcg_at(ranks: Tensor, k: int) -> float:
    return ndcg_values(ranks, k).mean().item()


def mrr_at(ranks: Tensor, k: int) -> float:
    return ((ranks < k).float() / (ranks.float() + 1)).mean().item()


def ranking_metrics(ranks: Tensor) -> dict[str, float]:
    """Recall@{1,5,10,20}, NDCG@{5,10,20}, MRR@10 of the given ranks."""
    out = {f"recall@{k}": recall_at(ranks, k) for k in RECALL_KS}
    out |= {f"ndcg@{k}": ndcg_at(ranks, k) for k in NDCG_KS}
    out |= {f"mrr@{k}": mrr_at(ranks, k) for k in MRR_KS}
    return out


def list_ranks(ranked: list[list[int]], targets: list[int]) -> Tensor:
    """0-based position of each target in its ranked list of answers, :data:`NOT_RANKED` when absent."""
    return torch.tensor([r.index(t) if t in r else NOT_RANKED for r, t in zip(ranked, targets)])


def random_order_recall(lists: list[list], targets: list, k: int) -> np.ndarray:
    """Expected Recall@K of each list of distinct answers in uniformly random order: 1[target in list] *
    min(1, K / len(list)), (b,) values. What a reranker that ignores the user gets from the list alone.

    Example::

        random_order_recall([["a", "b", "c", "d"]], ["c"], 2)   # array([0.5])
    """
    return np.array([float(t in row) * min(1.0, k / len(row)) if row else 0.0 for row, t in zip(lists, targets)])


def rouge_per_example(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measures of each example (rouge-score, Porter stemming); Lsum
    splits sentences on newlines."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    out: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeLsum": []}
    for p, r in zip(predictions, references):
        for name, score in scorer.score(r, p).items():
            out[name].append(score.fmeasure)
    return out


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measures (:func:`rouge_per_example`)."""
    return {name: sum(v) / max(1, len(v)) for name, v in rouge_per_example(predictions, references).items()}


def bootstrap_interval(values, *, seed: int = 0, resamples: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (resampled with replacement, seeded)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    means = x[np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))].mean(1)
    return percentile_interval(means, level)


def percentile_interval(resampled: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` range of bootstrap-resampled statistics (the percentile method)."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(low), float(high)


def estimate(values, *, seed: int = 0) -> dict[str, float]:
    """``{"value": mean, "low", "high"}``: the mean of per-example ``values`` and its 95% bootstrap interval."""
    low, high = bootstrap_interval(values, seed=seed)
    return {"value": float(np.mean(values)) if len(values) else float("nan"), "low": low, "high": high}


def paired_estimate(a, b=None, *, seed: int = 0, resamples: int = 1000, level: float = 0.95) -> dict[str, float]:
    """Recipe A minus recipe B over the same users: ``a`` is (runs of A, users) per-user values, one row per
    training run (e.g. seeds), ``b`` likewise for B, columns the same users in the same order; without ``b``,
    recipe A's own level (A minus zeros), its interval resampling users and runs alike.

    value = mean_u ( mean_i a[i, u] - mean_j b[j, u] ), and a percentile-bootstrap interval that resamples the
    users (both sides' values of a user together: a paired interval) and, on each side with more than one
    run, that side's runs (a hierarchical bootstrap), so the spread between training runs enters the
    interval as well. With one run a side it is :func:`estimate` of the per-user differences exactly; a side
    with one run adds no run-to-run spread, and with few runs the resampled spread is ~(k-1)/k of the true
    one (a percentile bootstrap over k values), so the interval stays a lower bound on the uncertainty."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.zeros((1, a.shape[1])) if b is None else np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must hold the same users: {a.shape[1]} vs {b.shape[1]} columns")
    n = a.shape[1]
    if n == 0:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan")}
    value = float((a.mean(0) - b.mean(0)).mean())
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n, size=(resamples, n))  # first, as bootstrap_interval draws them

    def side(x: np.ndarray) -> np.ndarray:  # (resamples, n): each user's mean over this resample's runs
        if len(x) == 1:
            return np.broadcast_to(x, (resamples, n))
        counts = np.eye(len(x))[rng.integers(0, len(x), size=(resamples, len(x)))].sum(1)  # times each run is drawn
        return counts @ x / len(x)

    low, high = percentile_interval(np.take_along_axis(side(a) - side(b), users, axis=1).mean(1), level)
    return {"value": value, "low": low, "high": high}
