import numpy as np
import polars as pl

from userllm.config import SyntheticConfig
from userllm.data.readers.synthetic import generate_synthetic


def test_sized_by_config_and_seeded():
    cfg = SyntheticConfig(num_users=40, num_items=50, num_genres=4, mean_events=20, seed=1)
    a, b = generate_synthetic(cfg), generate_synthetic(cfg)
    assert a.events.equals(b.events) and a.items.equals(b.items)
    assert a.events["user_id"].n_unique() == 40 and a.items.height == 50
    assert not generate_synthetic(cfg.model_copy(update={"seed": 2})).events.equals(a.events)
    per_user = a.events.group_by("user_id").agg(pl.col("item_id").n_unique() == pl.len())
    assert per_user["item_id"].all()  # no repeated items within a user


def test_planted_structure_next_genre_follows_history():
    """The genre of the next item matches the history's most frequent genre far above chance."""
    cfg = SyntheticConfig(num_users=200, num_items=200, num_genres=8, mean_events=30, seed=0)
    raw = generate_synthetic(cfg)
    genre = dict(zip(raw.items["item_id"], raw.items["categories"].list.first()))
    hits = total = 0
    for _, group in raw.events.group_by("user_id"):
        g = [genre[i] for i in group["item_id"]]
        for t in range(10, len(g)):
            window = g[t - 10 : t]
            hits += max(set(window), key=window.count) == g[t]
            total += 1
    assert hits / total > 2 / cfg.num_genres  # chance is about 1/8


def test_ratings_track_preference():
    raw = generate_synthetic(SyntheticConfig(num_users=100, seed=0))
    assert set(np.unique(raw.events["rating"].to_numpy())) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert raw.events["rating"].std() > 0.5
    assert raw.events["text"].str.contains("loved|enjoyed|watched|did not enjoy|disliked").all()
