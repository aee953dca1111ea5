"""``userllm bench users``: many active users served live, and the replay of ``userllm bench prefix`` checked
against it on the same request trace.

The store holds ``users`` users, each a copy of one of MovieLens-100K's timelines with at least ``history``
events (the served window is full, as for a long-lived user). One trace of requests is drawn Zipf(1.0) over
the users (seeded), with one appended event (the user's newest) per ten chats, and sent in order by one
client to each method's server, both run with the same ``--cache-bytes``: a User-LLM run, and a TP run
keeping each user's history prefix as KV cache. Per method: time to first token (p50, p99), requests/s,
and the cache's hit rate (from ``/metrics``); beside each, what the replay predicts for the same trace
from the hit and miss costs ``userllm bench prefix`` measured.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np

from userllm.bench.prefix import lru_replay, zipf_trace
from userllm.bench.serve import count, free_port, one_chat, start, train_runs
from userllm.data.dataset import PreparedDataset
from userllm.errors import InputError, OutputExistsError
from userllm.io import runtime, write_json, write_text_atomically
from userllm.serve.store import EventStore


def fill_store(db: str, ds: PreparedDataset, history: int, users: int) -> list[str]:
    """``users`` users, each a copy of one of the dataset's timelines with at least ``history`` events."""
    long = ds.sequences.filter(ds.sequences.get_column("length") >= history).get_column("user_id").to_list()
    if not long:
        raise InputError(f"{ds.root}: no user has {history} events")
    events = ds.events.select("user_id", "item_id", "rating", "timestamp")
    rows = {u: events.filter(events.get_column("user_id") == u).drop("user_id").to_dicts() for u in long}
    store = EventStore(db)
    ids = [f"v{i:05d}" for i in range(users)]
    store.append_many([(ids[i], rows[long[i % len(long)]]) for i in range(users)])
    store.close()
    return ids


async def drive(port: int, model: str, ids: list[str], steps: list[tuple[str, int]], item: str, max_tokens: int):
    import httpx2

    ttft, clock = [], [2**31]
    start = time.perf_counter()
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        for kind, u in steps:
            if kind == "append":
                clock[0] += 1
                event = {"item_id": item, "rating": 4, "timestamp": clock[0]}
                (await client.post(f"/v1/users/{ids[u]}/events", json={"events": [event]})).raise_for_status()
            else:
                ttft.append((await one_chat(client, model, ids[u], max_tokens))[1])
        metrics = (await client.get("/metrics")).text
    return np.array(ttft), time.perf_counter() - start, metrics


def run_users_bench(
    out: Path,
    *,
    dataset: Path,
    prefix: Path,
    backbone: str = "smollm2-135m",
    users: int = 100,
    chats: int = 40,
    history: int = 200,
    cache_bytes: int = 2**30,
    max_tokens: int = 16,
    seed: int = 0,
    runs: dict[str, Path] | None = None,
    force: bool = False,
) -> dict:
    """The live scenario and its replay (see module); writes ``users.json`` / ``users.md`` in ``out``."""
    if (out / "users.json").exists() and not force:
        raise OutputExistsError(f"{out / 'users.json'} already exists; pass --force to measure again")
    measured = json.loads(Path(prefix).read_text())
    decode = measured.get("decode_token_s", {})  # seconds a decoded token, at the replay's history length
    rows = {
        r["method"]: {**r, "decode_token_s": decode.get(r["method"], 0.0)}
        for r in measured["rows"]
        if r["history"] == history
    }
    if not rows:
        raise InputError(f"{prefix}: no rows at {history} events; run `userllm bench prefix` with that length")
    out.mkdir(parents=True, exist_ok=True)
    ds = PreparedDataset(dataset)
    runs = runs or train_runs(out, Path(dataset), history, backbone)
    steps = zipf_trace(users, chats, seed)
    item = ds.items.get_column("item_id")[2]
    report = {"users": users, "chats": chats, "history": history, "cache_bytes": cache_bytes, "methods": {}}
    names = {"textprompt": "text_prompt+prefix_cache", "userllm": "cross_attention"}
    for method, name in names.items():
        db = f"sqlite:///{out / f'events-{method}.db'}"
        Path(db.removeprefix("sqlite:///")).unlink(missing_ok=True)
        ids = fill_store(db, ds, history, users)
        port = free_port()
        server = start(runs[method], db, port, 1, "float32", ("--cache-bytes", str(cache_bytes)))
        try:
            ttft, seconds, metrics = asyncio.run(drive(port, f"userllm-{method}", ids, steps, item, max_tokens))
        finally:
            server.terminate()
            server.wait(timeout=120)
        family = "userllm_prefix_cache_total" if method == "textprompt" else "userllm_context_total"
        hits = count(metrics, f'{family}{{result="hit"}}')
        predicted = lru_replay(rows[name], steps, cache_bytes, max_tokens)
        report["methods"][method] = {
            "live": {
                "hit_rate": hits / len(ttft),
                "ttft_p50_s": float(np.percentile(ttft, 50)),
                "ttft_p99_s": float(np.percentile(ttft, 99)),
                "ttft_mean_s": float(ttft.mean()),
                "requests_per_s": len(ttft) / seconds,
            },
            "replay": predicted,
        }
    report["runtime"] = runtime()
    write_json(out / "users.json", report)
    write_text_atomically(out / "users.md", markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [
        f"{report['users']:,} users, {report['chats']} chats in one trace (Zipf(1.0), one appended event per ten "
        f"chats), {report['history']} events a user, a cache of {report['cache_bytes'] / 2**30:g} GiB per method:",
        "",
        "| method | | hit rate | TTFT mean s | TTFT p50 s | TTFT p99 s | requests/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, m in report["methods"].items():
        for kind in ("live", "replay"):
            r = m[kind]
            lines.append(
                f"| {method} | {kind} | {r['hit_rate']:.2f} | {r['ttft_mean_s']:.3f} | {r['ttft_p50_s']:.3f} | "
                f"{r['ttft_p99_s']:.3f} | {r['requests_per_s']:.3f} |"
            )
    return "\n".join(lines) + "\n"
