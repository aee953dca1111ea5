"""Scale benchmark for ``userllm prepare --source movielens`` on a MovieLens-20M-shaped input.

Generates (once, cached under ``benchmarks/.cache/``) a ``ratings.csv`` + ``movies.csv`` pair with the
shape of MovieLens-20M: 20,000,000 ratings, 138,000 users (each with at least 20 ratings, heavy-tailed
activity), 27,000 movies (Zipf popularity), half-star ratings, increasing timestamps per user, rows of a
user in shuffled order. Then runs the real CLI in a subprocess and reports wall time, peak RSS of that
process, and events/s against the targets (under 120 s and under 6 GB on 2 cores).

    python -m userllm.bench.prepare_scale [--ratings 20000000 --users 138000 --movies 27000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

HERE = Path("benchmarks")  # run from the repository root: writes benchmarks/.cache and benchmarks/results
TARGET_S, TARGET_GB = 120.0, 6.0


def generate(out: Path, n_ratings: int, n_users: int, n_movies: int, seed: int = 0) -> None:
    """Write ``ratings.csv`` and ``movies.csv`` shaped like MovieLens-20M (vectorized, ~1 minute)."""
    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0.0, 1.2, n_users)
    extra = n_ratings - 20 * n_users
    per_user = 20 + np.floor(activity / activity.sum() * extra).astype(np.int64)
    per_user[: n_ratings - per_user.sum()] += 1  # exact total
    user = np.repeat(np.arange(1, n_users + 1, dtype=np.int32), per_user)
    popularity = 1.0 / np.arange(1, n_movies + 1) ** 0.9
    movie_ids = rng.permutation(n_movies).astype(np.int32) + 1
    movie = movie_ids[np.searchsorted(np.cumsum(popularity) / popularity.sum(), rng.random(n_ratings))]
    rating = (rng.integers(1, 11, n_ratings) / 2.0).astype(np.float32)
    start = rng.integers(789_652_000, 1_420_000_000, n_users)  # 1995 .. 2015
    gaps = rng.exponential(3 * 86400, n_ratings).astype(np.int64)
    first = np.cumsum(per_user) - per_user
    csum = np.cumsum(gaps)
    ts = np.repeat(start, per_user) + csum - np.repeat(csum[first], per_user)
    shuffle = np.lexsort((rng.random(n_ratings), user))  # keep users together, shuffle within a user
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "ratings.csv.tmp"
    pl.DataFrame(
        {"userId": user[shuffle], "movieId": movie[shuffle], "rating": rating[shuffle], "timestamp": ts[shuffle]}
    ).write_csv(tmp)
    genres = np.array(
        [
            "Action",
            "Adventure",
            "Animation",
            "Children",
            "Comedy",
            "Crime",
            "Documentary",
            "Drama",
            "Fantasy",
            "Film-Noir",
            "Horror",
            "Musical",
            "Mystery",
            "Romance",
            "Sci-Fi",
            "Thriller",
        ]
    )
    g1, g2 = rng.integers(0, len(genres), n_movies), rng.integers(0, len(genres), n_movies)
    years = rng.integers(1920, 2015, n_movies)
    titles = [f'"Movie {i}, The ({y})"' for i, y in zip(range(1, n_movies + 1), years)]
    lines = [f"{i},{t},{genres[a]}|{genres[b]}" for i, t, a, b in zip(range(1, n_movies + 1), titles, g1, g2)]
    (out / "movies.csv").write_text("movieId,title,genres\n" + "\n".join(lines) + "\n")
    tmp.rename(out / "ratings.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=20_000_000)
    parser.add_argument("--users", type=int, default=138_000)
    parser.add_argument("--movies", type=int, default=27_000)
    args = parser.parse_args()

    data = HERE / ".cache" / f"ml-shaped-{args.ratings}-{args.users}-{args.movies}"
    if not (data / "ratings.csv").exists():
        t = time.perf_counter()
        print(f"generating {args.ratings:,} ratings into {data} (cached for later runs) ...", flush=True)
        generate(data, args.ratings, args.users, args.movies)
        print(f"generated in {time.perf_counter() - t:.0f} s", flush=True)
    out = HERE / ".cache" / "prepared-scale"
    cmd = [
        sys.executable,
        "-m",
        "userllm.cli",
        "prepare",
        "--source",
        "movielens",
        str(data),
        "--out",
        str(out),
        "--force",
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"prepare failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux
    manifest = json.loads((out / "manifest.json").read_text())
    events = manifest["input_counts"]["events"]
    result = {
        "input": {
            "ratings": args.ratings,
            "users": args.users,
            "movies": args.movies,
            "bytes": sum(i["bytes"] for i in manifest["inputs"]),
        },
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(peak_gb, 2),
        "events_per_s": round(events / wall),
        "targets": {"wall_s": TARGET_S, "peak_rss_gb": TARGET_GB},
        "final_counts": manifest["final_counts"],
        "examples": manifest["split"]["examples"],
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "prepare_scale.json").write_text(json.dumps(result, indent=2))
    print(f"\nprepare --source movielens on {events:,} ratings ({result['input']['bytes'] / 1e6:.0f} MB)")
    print("| measure | value | target | ratio to target |")
    print("|---|---|---|---|")
    print(f"| wall time | {wall:.1f} s | < {TARGET_S:.0f} s | {wall / TARGET_S:.2f} |")
    print(f"| peak RSS | {peak_gb:.2f} GB | < {TARGET_GB:.0f} GB | {peak_gb / TARGET_GB:.2f} |")
    print(f"| throughput | {events / wall / 1e6:.2f} M events/s | | |")
    ok = wall < TARGET_S and peak_gb < TARGET_GB
    print("targets met" if ok else "TARGETS MISSED")


if __name__ == "__main__":
    main()
