"""Ranking metrics for next-item prediction with full ranking over the catalogue.

All take the 0-based ``rank`` of the target item among the scored items (0 = ranked first) and average over
examples. Ties are broken by item index (a stable sort), so a model that scores everything equally gets
the rank of the target's index, never an optimistic 0.

- ``Recall@K  = 1[rank < K]`` (the hit rate: one target per example)
- ``NDCG@K    = 1[rank < K] / log2(rank + 2)`` (one relevant item, so the ideal DCG is 1)
- ``MRR@K     = 1[rank < K] / (rank + 1)``
"""

from __future__ import annotations

import torch
from torch import Tensor

RECALL_KS, NDCG_KS, MRR_KS = (1, 5, 10, 20), (5, 10, 20), (10,)


def target_ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """scores (b, V), targets (b,) -> 0-based rank of each target (b,), ties broken by item index."""
    t = scores.gather(1, targets[:, None])
    index = torch.arange(scores.shape[1], device=scores.device)[None, :]
    ahead = (scores > t) | ((scores == t) & (index < targets[:, None]))
    return ahead.sum(1)


def recall_at(ranks: Tensor, k: int) -> float:
    return (ranks < k).float().mean().item()


def ndcg_at(ranks: Tensor, k: int) -> float:
    return ((ranks < k).float() / torch.log2(ranks.float() + 2)).mean().item()


def mrr_at(ranks: Tensor, k: int) -> float:
    return ((ranks < k).float() / (ranks.float() + 1)).mean().item()


def ranking_metrics(ranks: Tensor) -> dict[str, float]:
    """Recall@{1,5,10,20}, NDCG@{5,10,20}, MRR@10 of the given ranks."""
    out = {f"recall@{k}": recall_at(ranks, k) for k in RECALL_KS}
    out |= {f"ndcg@{k}": ndcg_at(ranks, k) for k in NDCG_KS}
    out |= {f"mrr@{k}": mrr_at(ranks, k) for k in MRR_KS}
    return out
