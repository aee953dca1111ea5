import math

import torch

from userllm.eval.metrics import mrr_at, ndcg_at, ranking_metrics, recall_at, target_ranks


def test_ranks_hand_computed():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.3, 0.3, 0.3], [0.0, 0.2, 0.2, 0.1]])
    targets = torch.tensor([2, 2, 2])
    # row 0: 0.9 and 0.7 beat 0.5 -> rank 2; row 1: all tie -> items 0, 1 come first -> rank 2;
    # row 2: item 1 ties at 0.2 and has a smaller index -> rank 1
    assert target_ranks(scores, targets).tolist() == [2, 2, 1]


def test_metric_formulas():
    ranks = torch.tensor([0, 1, 4, 9, 30])
    assert math.isclose(recall_at(ranks, 5), 3 / 5, rel_tol=1e-6)
    assert math.isclose(ndcg_at(ranks, 10), (1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 5, rel_tol=1e-6)
    assert math.isclose(mrr_at(ranks, 10), (1 + 1 / 2 + 1 / 5 + 1 / 10) / 5, rel_tol=1e-6)
    m = ranking_metrics(ranks)
    assert set(m) == {"recall@1", "recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr@10"}
    assert math.isclose(m["recall@1"], 0.2, rel_tol=1e-6) and math.isclose(m["recall@20"], 0.8, rel_tol=1e-6)
