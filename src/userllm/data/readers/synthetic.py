"""A seeded generator of timelines with planted structure (``--source synthetic``), for tests and benchmarks.

What is planted, so that a model can be checked to recover it:

- each item has a primary genre and, with probability 0.3, a second one; item popularity is Zipf-like;
- each user has a start and an end preference over genres (Dirichlet, concentration 0.3) and drifts
  linearly from one to the other over the timeline (``drift`` = 0 keeps preferences fixed);
- each event draws a genre from the user's current preference, then an unseen item of that genre by
  popularity: the next item's genre is predictable from the recent history;
- the rating grows with the user's current preference for the item's genres (plus noise), and the review
  text and summary are templated from the rating, the title and the genre.

The same config (seed included) gives identical tables.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from userllm.config import SyntheticConfig
from userllm.data.readers.common import RawData, ReadContext, items_frame
from userllm.errors import InputError

GENRES = [
    "Action",
    "Comedy",
    "Drama",
    "Horror",
    "Romance",
    "Sci-Fi",
    "Documentary",
    "Western",
    "Mystery",
    "Fantasy",
    "Musical",
    "War",
    "Animation",
    "Crime",
    "Thriller",
    "Adventure",
]
ADJECTIVES = [
    "Silent",
    "Crimson",
    "Last",
    "Hidden",
    "Golden",
    "Broken",
    "Midnight",
    "Wild",
    "Distant",
    "Iron",
    "Secret",
    "Electric",
    "Frozen",
    "Lonely",
    "Burning",
    "Velvet",
]
NOUNS = [
    "Harbor",
    "Empire",
    "Garden",
    "Signal",
    "River",
    "Machine",
    "Promise",
    "Frontier",
    "Mirror",
    "Storm",
    "Orchard",
    "Station",
    "Kingdom",
    "Letter",
    "Circus",
    "Voyage",
]
PRAISE = ["a delight", "wonderful", "gripping from start to finish", "exactly my kind of story", "superb"]
MIDDLING = ["fine", "watchable", "uneven", "decent but forgettable", "okay"]
PAN = ["a letdown", "tedious", "hard to sit through", "not for me", "disappointing"]
SUMMARY = {1: "Disappointing", 2: "Not great", 3: "It was okay", 4: "Really good", 5: "Loved it"}


def genre_names(n: int) -> list[str]:
    return GENRES[:n] + [f"Genre {i + 1}" for i in range(len(GENRES), n)]


def _review(rng: np.random.Generator, title: str, genre: str, rating: int) -> str:
    words = PRAISE if rating >= 4 else MIDDLING if rating == 3 else PAN
    opener = {5: "I loved", 4: "I enjoyed", 3: "I watched", 2: "I did not enjoy", 1: "I disliked"}[rating]
    return f"{opener} {title}. As a {genre.lower()} it was {words[rng.integers(len(words))]}."


def generate_synthetic(cfg: SyntheticConfig) -> RawData:
    """Generate events and items for ``cfg`` (see module docstring)."""
    rng = np.random.default_rng(cfg.seed)
    g_names = genre_names(cfg.num_genres)
    n_items, n_genres = cfg.num_items, cfg.num_genres

    primary = rng.permutation(np.arange(n_items) % n_genres)
    secondary = np.where(rng.random(n_items) < 0.3, (primary + rng.integers(1, n_genres, n_items)) % n_genres, -1)
    popularity = 1.0 / (rng.permutation(n_items) + 1.0) ** 0.8
    item_genres = [[int(p)] + ([int(s)] if s >= 0 else []) for p, s in zip(primary, secondary)]
    by_genre = [np.flatnonzero((primary == g) | (secondary == g)) for g in range(n_genres)]
    cum_pop = [np.cumsum(popularity[idx]) / popularity[idx].sum() for idx in by_genre]

    titles = []
    for i in range(n_items):
        base = f"The {ADJECTIVES[i % len(ADJECTIVES)]} {NOUNS[(i // len(ADJECTIVES)) % len(NOUNS)]}"
        part = i // (len(ADJECTIVES) * len(NOUNS))
        titles.append(f"{base}{f' {part + 1}' if part else ''} ({1950 + int(rng.integers(0, 71))})")
    items, _ = items_frame(
        [
            (f"i{i:05d}", titles[i], [g_names[g] for g in item_genres[i]], f"A {g_names[primary[i]].lower()} film.")
            for i in range(n_items)
        ]
    )

    rows: dict[str, list] = {k: [] for k in ("user_id", "item_id", "timestamp", "rating", "text", "summary")}
    for u in range(cfg.num_users):
        n = int(min(max(5, rng.poisson(cfg.mean_events)), n_items))
        start, end = rng.dirichlet(np.full(n_genres, 0.3)), rng.dirichlet(np.full(n_genres, 0.3))
        t = 1_420_070_400 + int(rng.integers(0, 2 * 365 * 86400))
        seen: set[int] = set()
        for k in range(n):
            s = cfg.drift * k / max(n - 1, 1)
            pref = (1 - s) * start + s * end
            g = int(rng.choice(n_genres, p=pref / pref.sum()))
            item = -1
            for _ in range(10):
                cand = int(by_genre[g][np.searchsorted(cum_pop[g], rng.random())])
                if cand not in seen:
                    item = cand
                    break
            if item < 0:
                unseen = np.setdiff1d(np.arange(n_items), np.fromiter(seen, int))
                item = int(unseen[rng.integers(len(unseen))])
            seen.add(item)
            affinity = np.log(max(pref[item_genres[item]].max() * n_genres, 1e-3))
            rating = int(np.clip(np.rint(3.2 + 0.8 * affinity + rng.normal(0, 0.7)), 1, 5))
            t += int(rng.exponential(2 * 86400)) + 1
            rows["user_id"].append(f"u{u:05d}")
            rows["item_id"].append(f"i{item:05d}")
            rows["timestamp"].append(t)
            rows["rating"].append(float(rating))
            rows["text"].append(_review(rng, titles[item], g_names[item_genres[item][0]], rating))
            rows["summary"].append(SUMMARY[rating])
    return RawData(events=pl.DataFrame(rows), items=items, layout="synthetic")


def read_synthetic(paths: list, ctx: ReadContext, cfg: SyntheticConfig) -> RawData:
    if paths:
        raise InputError("--source synthetic generates its data and takes no input paths")
    advance = ctx.task("generating synthetic timelines", total=None)
    raw = generate_synthetic(cfg)
    advance(raw.events.height)
    return raw
