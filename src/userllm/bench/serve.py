"""``userllm bench serve``: User-LLM and TP served over HTTP to concurrent clients, users with 200-event
histories.

Each method's run is served by its own ``userllm serve`` process (uvicorn, a fresh SQLite store holding the
dataset's timelines). Clients (asyncio + httpx2, streaming) ask the users with at least ``history`` events a
question; every answer is ``max_tokens`` tokens (``ignore_eos``), so the methods decode the same amount and
differ only in what the LLM reads (TP: the history written into the prompt; User-LLM: the question, with
the user's cached context). Per concurrency level: requests/s, p50/p99 latency and time to first token.
User-LLM's cache is warm (one request per user first). Also: the bare backbone answering the same question
(the User-LLM server without ``user``) at concurrency 1, and appends by 16 clients (single events, then
10 per request; each client a minimal keep-alive HTTP/1.1 connection, :class:`KeepAlive`, so the load
generator leaves the shared cores to the server) with the cached contexts kept current: every appended
event is its user's newest, and one chat per client afterwards counts how many found their context
already refreshed. Every server holds its backbone the same way (``weights``, default ``int4``: the decoder
layers as 4-bit weights, exact for SmolLM2 Q4_1, :mod:`userllm.llm.quant`; ``float32``: as trained).

Targets: User-LLM >= 10X TP's requests/s; its p50 at concurrency 1 within 1.2X of the bare
backbone; appends >= 1,000 events/s on SQLite.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from userllm.bench.plots import plot_serve
from userllm.config import TrainConfig, UserLLMConfig
from userllm.data.dataset import PreparedDataset
from userllm.errors import OutputExistsError
from userllm.io import write_json, write_text_atomically
from userllm.serve.protocol import check_weights
from userllm.serve.store import EventStore, import_dataset

QUESTION = "Which movie should I watch next? Answer with its title only."
TARGETS = {"throughput_ratio": 10.0, "bare_ratio": 1.2, "appends_per_s": 1000.0}


def train_runs(
    out: Path, dataset: Path, history: int, backbone: str, methods: tuple[str, ...] = ("userllm", "textprompt")
) -> dict[str, Path]:
    """A User-LLM and a TP run (``methods``) at ``history`` events, in ``out/runs/METHOD`` unless already
    there (a few steps: serving cost does not depend on the weights, and ``ignore_eos`` fixes the answer
    length)."""
    from userllm.tasks.train import train

    runs = {}
    for method in methods:
        run = out / "runs" / method
        if not (run / "model" / "userllm.safetensors").exists():
            llm = UserLLMConfig(backbone=backbone, strategy="lora" if method == "textprompt" else "enc")
            train(
                TrainConfig(
                    dataset=dataset,
                    out=run,
                    task="next_item",
                    method=method,
                    llm=llm,
                    max_history=history,
                    encoder="random" if method == "userllm" else None,
                    train_examples=4,
                    batch_size=4,
                    micro_batch_size=1,
                    force=True,
                )
            )
        runs[method] = run
    return runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    run: Path, db: str, port: int, max_batch: int, weights: str = "float32", extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    """``userllm serve`` in its own process (``extra``: more flags), once it answers /healthz."""
    import httpx2

    cmd = [
        sys.executable,
        "-m",
        "userllm.cli",
        "serve",
        str(run),
        "--db",
        db,
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--allow-unknown-users",
        "--weights",
        weights,
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"userllm serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx2.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("userllm serve did not start within 2 minutes")


async def one_chat(client, model: str, user: str | None, max_tokens: int) -> tuple[float, float]:
    """(latency, time to first token) of one streamed chat request."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        **({"user": user} if user else {}),
    }
    start, first = time.perf_counter(), None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"chat request failed ({r.status_code}): {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                first = time.perf_counter() - start
    return time.perf_counter() - start, first if first is not None else float("nan")


async def level(
    base: str, model: str, users: list[str | None], concurrency: int, requests: int, max_tokens: int
) -> dict:
    """``requests`` chat requests from ``concurrency`` clients (users in turn): throughput and latencies."""
    import httpx2

    lat, ttft, queue = [], [], list(range(requests))
    async with httpx2.AsyncClient(base_url=base, timeout=600) as client:

        async def worker():
            while queue:
                i = queue.pop()
                a, b = await one_chat(client, model, users[i % len(users)], max_tokens)
                lat.append(a)
                ttft.append(b)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": requests,
        "seconds": seconds,
        "requests_per_s": requests / seconds,
        "p50_s": float(np.percentile(lat, 50)),
        "p99_s": float(np.percentile(lat, 99)),
        "ttft_p50_s": float(np.nanpercentile(ttft, 50)),
        "ttft_p99_s": float(np.nanpercentile(ttft, 99)),
    }


class KeepAlive:
    """A minimal HTTP/1.1 client on one keep-alive connection (asyncio streams, one request at a time): the
    append load generator. It costs the 2 shared cores a fraction of what httpx2 does per request, so the
    appends figure is the server's rather than the client's."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, base: str) -> KeepAlive:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    async def post_json(self, path: str, body: dict) -> tuple[int, bytes]:
        data = json.dumps(body).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def appends(
    base: str,
    users: list[str],
    item_ids: list[str],
    seconds: float,
    clients: int = 16,
    per_request: int = 1,
    first_timestamp: int = 2_000_000_000,
    settle: float = 1.5,
) -> dict:
    """Appends of ``per_request`` events per request from ``clients`` clients (each its own keep-alive
    connection, :class:`KeepAlive`) for ``seconds``, then, ``settle`` seconds later (longer than the server's
    refresh interval, 1 s by default: a user's context is refreshed at most that often), one chat per user:
    how many of those found their context already current (a cache hit; the others recompute it at request
    time). Timestamps count up from ``first_timestamp``: give each run a start above the last one's, so
    every appended event is the user's newest (inside the history window)."""
    import httpx2

    acked = 0

    async def worker(k: int):
        nonlocal acked
        conn = await KeepAlive.connect(base)
        i, stop = 0, time.perf_counter() + seconds
        while time.perf_counter() < stop:
            events = [
                {
                    "item_id": item_ids[(k * 7 + i + j) % len(item_ids)],
                    "rating": 4,
                    "timestamp": first_timestamp + i + j,
                }
                for j in range(per_request)
            ]
            status, body = await conn.post_json(f"/v1/users/{users[k]}/events", {"events": events})
            if status != 200:
                raise RuntimeError(f"append failed ({status}): {body[:300].decode(errors='replace')}")
            acked, i = acked + per_request, i + per_request
        await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(clients)))
    elapsed = time.perf_counter() - start
    await asyncio.sleep(settle)
    async with httpx2.AsyncClient(base_url=base, timeout=60) as client:
        before = (await client.get("/metrics")).text
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        for k in range(clients):
            await one_chat(client, model, users[k], 1)
        after = (await client.get("/metrics")).text
    hits = count(after, 'userllm_context_total{result="hit"}') - count(before, 'userllm_context_total{result="hit"}')
    return {
        "clients": clients,
        "events_per_request": per_request,
        "events": acked,
        "seconds": elapsed,
        "events_per_s": acked / elapsed,
        "requests_per_s": acked / per_request / elapsed,
        "chats_after": clients,
        "chats_after_s": settle,
        "chats_after_with_current_context": int(hits),
    }


def settled(a: dict) -> str:
    return f" {a['chats_after_s']:g} s later" if a.get("chats_after_s") else ""


def count(metrics: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(prefix))


def run_serve_bench(
    out: Path,
    *,
    dataset: Path,
    backbone: str = "smollm2-135m",
    history: int = 200,
    levels: tuple[int, ...] = (1, 4, 16),
    max_tokens: int = 16,
    max_batch: int = 8,
    append_seconds: float = 10.0,
    runs: dict[str, Path] | None = None,
    weights: str = "int4",
    force: bool = False,
) -> dict:
    """Run the benchmark (see module docstring); writes ``serve.json``, ``serve.md``, ``serve.png`` in ``out``.
    ``runs`` (``{"userllm": RUN, "textprompt": RUN}``): serve these instead of training two at ``history``;
    ``weights``: every server's ``--weights`` (the same for User-LLM, TP and the bare backbone)."""
    check_weights(weights)  # before training the two runs, not when the first server fails to start
    if (out / "serve.json").exists() and not force:
        raise OutputExistsError(f"{out / 'serve.json'} already exists; pass --force to measure again")
    out.mkdir(parents=True, exist_ok=True)
    ds = PreparedDataset(dataset)
    seq = ds.sequences.filter(ds.sequences.get_column("length") >= history)
    users = seq.get_column("user_id").to_list()
    runs = runs or train_runs(out, Path(dataset), history, backbone)
    report = {
        "dataset": str(dataset),
        "history": history,
        "users": len(users),
        "max_tokens": max_tokens,
        "max_batch": max_batch,
        "backbone": backbone,
        "weights": weights,
        "methods": {},
        "targets": TARGETS,
    }
    for method, run in runs.items():
        db = out / f"events-{method}.db"
        db.unlink(missing_ok=True)
        import_dataset(EventStore(f"sqlite:///{db}"), ds)
        port = free_port()
        # TP without a prefix cache, batched, as this benchmark's figures measure it (`userllm bench prefix` and
        # `userllm bench users` measure the prefix-cached TP)
        proc = start(
            run, f"sqlite:///{db}", port, max_batch, weights, ("--cache-bytes", "0") if method == "textprompt" else ()
        )
        base = f"http://127.0.0.1:{port}"
        try:
            model = f"userllm-{run.name}"
            rows = []
            if method == "userllm":  # warm cache: every user's context once
                asyncio.run(level(base, model, users, 4, len(users), 1))
                report["bare_backbone"] = asyncio.run(level(base, model, [None], 1, 24, max_tokens))
            for c in levels:
                # 24 at one client: the p50 against the bare backbone's is a ratio of two ~1.5 s medians
                requests = max(24, 3 * c) if method == "userllm" else max(4, c)  # TP reads ~3,400 tokens a request
                rows.append(asyncio.run(level(base, model, users, c, requests, max_tokens)))
                print(
                    f"{method}, {c} clients: {rows[-1]['requests']} requests in {rows[-1]['seconds']:.1f} s, "
                    f"{rows[-1]['requests_per_s']:.2f} requests/s, p50 {rows[-1]['p50_s']:.2f} s",
                    file=sys.stderr,
                )
            report["methods"][method] = rows
            if method == "userllm":
                item_ids = ds.items.get_column("item_id").to_list()
                report["appends"] = [
                    asyncio.run(
                        appends(
                            base,
                            users,
                            item_ids,
                            append_seconds,
                            per_request=n,
                            first_timestamp=2_000_000_000 + 10_000_000 * k,
                        )
                    )
                    for k, n in enumerate((1, 10))
                ]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    ul, tp = report["methods"]["userllm"], report["methods"]["textprompt"]
    report["throughput_ratio"] = {r["concurrency"]: r["requests_per_s"] / t["requests_per_s"] for r, t in zip(ul, tp)}
    report["bare_ratio"] = ul[0]["p50_s"] / report["bare_backbone"]["p50_s"]
    write_json(out / "serve.json", report)
    write_text_atomically(out / "serve.md", markdown(report))
    plot_serve(report, out / "serve.png")
    return report


def markdown(report: dict) -> str:
    t = report["targets"]
    lines = [
        f"## userllm serve: {report['users']} users with >= {report['history']} events, answers of "
        f"{report['max_tokens']} tokens, batches of up to {report['max_batch']}, {report.get('weights', 'float32')} weights",
        "",
        "| method | concurrency | requests | requests/s | p50 s | p99 s | TTFT p50 s | TTFT p99 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, rows in report["methods"].items():
        for r in rows:
            lines.append(
                f"| {method} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['p50_s']:.3f} | "
                f"{r['p99_s']:.3f} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} |"
            )
    b = report["bare_backbone"]
    ratios = ", ".join(f"{c}: {v:.1f}X" for c, v in report["throughput_ratio"].items())
    lines += [
        "",
        "| figure | measured | target |",
        "|---|---|---|",
        f"| User-LLM / TP requests/s, by concurrency | {ratios} | >= {t['throughput_ratio']:g}X |",
        f"| User-LLM p50 / bare backbone p50 at concurrency 1 (warm cache) | {report['bare_ratio']:.2f}X "
        f"({b['p50_s']:.3f} s bare) | <= {t['bare_ratio']:g}X |",
    ]
    for a in report["appends"]:
        lines += [
            f"| appends of {a['events_per_request']} event(s) per request, {a['clients']} clients, SQLite | "
            f"{a['events_per_s']:,.0f} events/s ({a['requests_per_s']:,.0f} requests/s) | >= {t['appends_per_s']:,.0f} events/s |",
            f"| ... then one chat per client{settled(a)}: contexts already current | "
            f"{a['chats_after_with_current_context']} of {a['chats_after']} | all |",
        ]
    lines.append("")
    return "\n".join(lines)
