import math

import numpy as np
import pytest
import torch

from userllm.metrics import (
    bootstrap_interval,
    estimate,
    mrr_at,
    ndcg_at,
    paired_estimate,
    random_order_recall,
    ranking_metrics,
    recall_at,
    target_ranks,
)


def test_ranks_hand_computed():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.3, 0.3, 0.3], [0.0, 0.2, 0.2, 0.1]])
    targets = torch.tensor([2, 2, 2])
    # row 0: 0.9 and 0.7 beat 0.5 -> rank 2; row 1: all tie -> items 0, 1 come first -> rank 2;
    # row 2: item 1 ties at 0.2 and has a smaller index -> rank 1
    assert target_ranks(scores, targets).tolist() == [2, 2, 1]


def test_metric_formulas():
    ranks = torch.tensor([0, 1, 4, 9, 30])
    assert math.isclose(recall_at(ranks, 5), 3 / 5, rel_tol=1e-6)
    assert math.isclose(
        ndcg_at(ranks, 10), (1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 5, rel_tol=1e-6
    )
    assert math.isclose(mrr_at(ranks, 10), (1 + 1 / 2 + 1 / 5 + 1 / 10) / 5, rel_tol=1e-6)
    m = ranking_metrics(ranks)
    assert set(m) == {"recall@1", "recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr@10"}
    assert math.isclose(m["recall@1"], 0.2, rel_tol=1e-6) and math.isclose(m["recall@20"], 0.8, rel_tol=1e-6)


def test_generated_answer_metrics_hand_computed():
    from userllm.metrics import NOT_RANKED, list_ranks, rouge_scores

    ranks = list_ranks([["a", "b", "c"], ["c", "a"], ["x"]], ["b", "c", "y"])
    assert ranks.tolist() == [1, 0, NOT_RANKED]
    assert math.isclose(recall_at(ranks, 1), 1 / 3, rel_tol=1e-6) and math.isclose(
        recall_at(ranks, 2), 2 / 3, rel_tol=1e-6
    )
    # accuracy is Recall@1 of the ranked answers: 2 of 3 top answers are right
    top = list_ranks([["Drama"], ["Comedy", "Horror"], ["War"]], ["Drama", "Horror", "War"])
    assert math.isclose(recall_at(top, 1), 2 / 3, rel_tol=1e-6)
    # "the cat sat" vs "the cat sat on the mat": unigrams P 3/3, R 3/6 -> F 2/3; bigrams P 2/2, R 2/5 -> F 4/7;
    # the longest common subsequence is the 3 words -> Lsum = unigram F
    r = rouge_scores(["the cat sat"], ["the cat sat on the mat"])
    assert math.isclose(r["rouge1"], 2 / 3, rel_tol=1e-6) and math.isclose(r["rouge2"], 4 / 7, rel_tol=1e-6)
    assert math.isclose(r["rougeLsum"], 2 / 3, rel_tol=1e-6)
    assert rouge_scores(["same words here"], ["same words here"])["rougeLsum"] == 1.0


def test_bootstrap_interval_is_seeded_and_shrinks_with_users():
    """The interval holds the mean, repeats under the same seed, and narrows ~1/sqrt(N) with more users."""
    small, large = [1.0, 0.0] * 50, [1.0, 0.0] * 800
    a = estimate(small, seed=3)
    assert a["low"] < a["value"] == 0.5 < a["high"] and estimate(small, seed=3) == a
    wide, narrow = (bootstrap_interval(v, seed=0) for v in (small, large))
    assert 3 < (wide[1] - wide[0]) / (narrow[1] - narrow[0]) < 5  # sqrt(16) = 4
    # binomial: half-width 1.96 sqrt(p (1 - p) / N) = 0.098 for N = 100
    assert abs((wide[1] - wide[0]) / 2 - 0.098) < 0.015
    assert bootstrap_interval([0.25] * 10) == (0.25, 0.25)


def test_paired_estimate_one_run_a_side_is_the_paired_bootstrap():
    """One run a side: exactly :func:`estimate` of the per-user differences (same draws, same interval)."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 300).astype(float), rng.integers(0, 2, 300).astype(float)
    assert paired_estimate(a, b, seed=4) == estimate(a - b, seed=4)
    assert paired_estimate([a, a, a], [b, b], seed=4) == estimate(a - b, seed=4)  # copies of a run add no spread
    assert paired_estimate(a, seed=4) == estimate(a, seed=4)  # no B: A's own level
    assert paired_estimate([a, b], seed=4) == paired_estimate([a, b], np.zeros(300), seed=4)


def test_paired_estimate_resamples_training_runs():
    """Several runs a side: the value is the mean of each side's mean over runs, and runs that disagree (the
    spread between training seeds) widen the interval beyond the one a single pair of runs gives."""
    rng = np.random.default_rng(1)
    b = rng.integers(0, 2, 400).astype(float)
    a = [np.clip(b + rng.integers(0, 2, 400) * s, 0, 1) for s in (0, 1, 1)]  # runs of A that differ by a lot
    got = paired_estimate(a, [b], seed=0)
    assert got["value"] == pytest.approx(np.mean(a) - np.mean(b))
    assert got["low"] <= got["value"] <= got["high"] and paired_estimate(a, [b], seed=0) == got
    single = paired_estimate(np.mean(a, 0), b, seed=0)  # the same mean, the runs' spread ignored
    assert single["value"] == pytest.approx(got["value"])
    assert got["high"] - got["low"] > 2 * (single["high"] - single["low"])
    with pytest.raises(ValueError, match="same users"):
        paired_estimate([a[0]], [b[:10]])


def test_random_order_recall_is_the_mean_over_every_order_of_the_list():
    """The expected Recall@K of a list in random order equals the average hit over all of its permutations:
    K / |L| when the target is listed and |L| > K, 1 when |L| <= K, 0 when the target is not listed."""
    from itertools import permutations

    lists = [["a", "b", "c", "d", "e"], ["a", "b"], ["a", "b", "c"], []]
    targets = ["c", "b", "z", "a"]
    for k in (1, 2, 4):
        got = random_order_recall(lists, targets, k)
        for row, t, g in zip(lists, targets, got):
            orders = list(permutations(row)) or [()]
            assert g == pytest.approx(np.mean([t in order[:k] for order in orders]))
    assert random_order_recall(lists, targets, 2).tolist() == pytest.approx([0.4, 1.0, 0.0, 0.0])
