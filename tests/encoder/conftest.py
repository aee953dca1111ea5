import pytest
import torch

from userllm.config import EncoderConfig
from userllm.encoder.model import UserEncoder

V, R, C = 30, 7, 6


def tiny_encoder(**kw) -> UserEncoder:
    """A tiny randomly initialised encoder over V items with 1-2 categories each."""
    torch.manual_seed(0)
    cats = torch.zeros(V, 2, dtype=torch.long)
    cats[2:, 0] = 2 + torch.arange(V - 2) % (C - 2)
    cats[2::3, 1] = 2 + (torch.arange(2, V, 3) + 1) % (C - 2)
    text = torch.randn(V, 5) if "text" in kw.get("features", []) else None
    base = dict(
        num_items=V,
        num_ratings=R,
        num_categories=C,
        d_model=16,
        d_feature=8,
        n_heads=2,
        max_len=12,
        dropout=0.0,
        text_dim=5 if text is not None else 0,
    )
    cfg = EncoderConfig(**(base | kw))
    return UserEncoder(cfg, item_categories=cats, item_text=text).eval()


def random_batch(b: int, n: int, lengths: list[int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {
        "item": torch.randint(2, V, (b, n), generator=g),
        "rating": torch.randint(2, R, (b, n), generator=g),
        "time_gap": torch.randint(1, 24, (b, n), generator=g),
    }
    if lengths is not None:
        for i, length in enumerate(lengths):
            for v in batch.values():
                v[i, length:] = 0
    return batch


ALL = ["item", "rating", "category", "time_gap", "text"]
CONFIGS = [
    dict(fusion="early"),
    dict(fusion="late"),
    dict(fusion="early", features=ALL),
    dict(fusion="late", features=ALL),
    dict(features=["item"]),
    dict(d_model=8),  # no item head
    dict(positions="alibi"),
    dict(fusion="late", positions="alibi"),
]


@pytest.fixture(
    params=CONFIGS,
    ids=lambda c: (
        f"{c.get('fusion', 'early')}-{len(c.get('features', [1, 2, 3]))}f-d{c.get('d_model', 16)}"
        f"-{c.get('positions', 'learned')}"
    ),
)
def encoder(request) -> UserEncoder:
    return tiny_encoder(**request.param)
