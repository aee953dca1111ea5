"""The service under concurrency, across processes sharing PostgreSQL, and killed with SIGKILL mid-stream."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx2
import pytest
import torch
from sqlalchemy import text

from userllm.bench.serve import free_port, start
from userllm.errors import OutputExistsError
from userllm.llm.cache import UserContextCache
from userllm.serve.app import ServeConfig, create_app
from userllm.serve.engine import Engine
from userllm.serve.store import EventStore


def items(ds, n):
    return ds.items.get_column("item_id").to_list()[:n]


def test_fifty_concurrent_clients_lose_no_event_and_never_see_a_stale_context(tmp_path, ul_run, synthetic_ds):
    store = EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    engine = Engine(ul_run, store)
    app = create_app(engine, ServeConfig(max_batch=8, max_wait_ms=20))
    item = items(synthetic_ds, 3)

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx2.ASGITransport(app=app)
            async with httpx2.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:

                async def client(k: int) -> list[int]:
                    seen = []
                    for i in range(3):
                        event = {"item_id": item[i], "rating": 4, "timestamp": 1000 + i, "event_id": f"{k}-{i}"}
                        r = await c.post(f"/v1/users/load-{k}/events", json={"events": [event]})
                        assert r.status_code == 200 and r.json()["events"] == i + 1
                        chat = await c.post(
                            "/v1/chat/completions",
                            json={
                                "model": engine.name,
                                "user": f"load-{k}",
                                "max_tokens": 2,
                                "temperature": 0,
                                "messages": [{"role": "user", "content": "next?"}],
                            },
                        )
                        assert chat.status_code == 200, chat.text
                        seen.append(chat.json()["usage"]["user_events"])
                    return seen

                return await asyncio.gather(*(client(k) for k in range(50)))

    seen = asyncio.run(scenario())
    assert all(s == [1, 2, 3] for s in seen)  # each answer read every event its client had appended
    assert sum(store.fingerprint(f"load-{k}").count for k in range(50)) == 150
    metrics = engine.metrics.render()
    batched = [line for line in metrics.splitlines() if line.startswith('userllm_batch_size_bucket{le="1"}')]
    total = [line for line in metrics.splitlines() if line.startswith("userllm_batch_size_count")]
    assert int(batched[0].split()[-1]) < int(total[0].split()[-1])  # some requests were decoded together


def test_another_process_appending_to_postgresql_is_seen(postgres_url, ul_run, synthetic_ds):
    """Two servers share PostgreSQL: events appended through one reach the other's next context."""
    mine, theirs = EventStore(postgres_url), EventStore(postgres_url)
    engine = Engine(ul_run, mine)
    item = items(synthetic_ds, 3)
    theirs.append("shared-user", [{"item_id": item[0], "rating": 3, "timestamp": 10}])
    assert engine.context("shared-user").events == 1
    theirs.append("shared-user", [{"item_id": item[1], "rating": 5, "timestamp": 20}])
    now = engine.context("shared-user")
    _, rows = mine.timeline("shared-user")
    fresh = UserContextCache(engine.model).get("x", engine.vocab.encoder_inputs(rows))
    assert now.events == 2 and torch.allclose(now.context.ctx, fresh.ctx, atol=1e-5)
    mine.delete_user("shared-user")


def test_sigkill_during_appends_loses_no_acknowledged_event(tmp_path, ul_run, synthetic_ds):
    db = f"sqlite:///{tmp_path / 'events.db'}"
    port = free_port()
    proc = start(ul_run, db, port, max_batch=8)
    acked, item, stop = [], items(synthetic_ds, 1)[0], threading.Event()

    def append_forever():
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
            for i in range(100_000):
                if stop.is_set():
                    return
                body = {
                    "events": [{"item_id": item, "rating": 4, "timestamp": i, "event_id": f"e{i}", "text": "x" * 200}]
                }
                try:
                    r = c.post("/v1/users/crash-user/events", json=body)
                except httpx2.TransportError:
                    return  # the server is gone
                if r.status_code == 200:
                    acked.append(f"e{i}")

    writer = threading.Thread(target=append_forever)
    writer.start()
    while len(acked) < 30:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stop.set()
    writer.join()
    store = EventStore(db)
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    _, rows = store.timeline("crash-user")
    stored = {r["event_id"] for r in rows}
    assert set(acked) <= stored and len(stored) == len(rows)  # every acknowledged event, none twice
    proc = start(ul_run, db, port, max_batch=8)  # and the server comes back on the same store
    try:
        listed = httpx2.get(f"http://127.0.0.1:{port}/v1/users/crash-user/events").json()["data"]
        assert len(listed) == len(rows)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_serve_bench_runs_end_to_end(tmp_path, ul_run, tp_run, synthetic_ds):
    """The benchmark's whole path on the tiny runs (two server processes, every phase); figures on the real
    model come from `userllm bench serve`."""
    from userllm.bench.serve import run_serve_bench

    report = run_serve_bench(
        tmp_path / "bench",
        dataset=synthetic_ds.root,
        history=6,
        levels=(1, 2),
        max_tokens=3,
        append_seconds=0.5,
        runs={"userllm": ul_run, "textprompt": tp_run},
    )
    assert {r["concurrency"] for r in report["methods"]["textprompt"]} == {1, 2}
    assert all(
        r["requests_per_s"] > 0 and r["p50_s"] <= r["p99_s"] for rows in report["methods"].values() for r in rows
    )
    assert [a["events_per_request"] for a in report["appends"]] == [1, 10] and report["appends"][1]["events"] % 10 == 0
    assert all(a["events"] > 0 for a in report["appends"]) and report["bare_ratio"] > 0
    assert all(
        a["chats_after_with_current_context"] <= a["chats_after"] for a in report["appends"]
    )  # requests' hits only
    assert (tmp_path / "bench" / "serve.png").stat().st_size > 0 and "events/s" in (
        tmp_path / "bench" / "serve.md"
    ).read_text()
    with pytest.raises(OutputExistsError):  # measured results are not replaced without --force
        run_serve_bench(tmp_path / "bench", dataset=synthetic_ds.root, runs={"userllm": ul_run, "textprompt": tp_run})


def test_health_checks_and_appends_answer_while_the_model_decodes(tmp_path, ul_run, synthetic_ds):
    store = EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    engine = Engine(ul_run, store)
    app = create_app(engine, ServeConfig(max_tokens=4000))
    item = items(synthetic_ds, 1)[0]
    store.append("busy", [{"item_id": item, "rating": 4, "timestamp": 1}])

    async def scenario():
        async with app.router.lifespan_context(app):
            async with httpx2.AsyncClient(
                transport=httpx2.ASGITransport(app=app), base_url="http://t", timeout=300
            ) as c:
                long = asyncio.create_task(
                    c.post(
                        "/v1/chat/completions",
                        json={
                            "model": engine.name,
                            "user": "busy",
                            "max_tokens": 3000,
                            "ignore_eos": True,
                            "messages": [{"role": "user", "content": "talk"}],
                        },
                    )
                )
                while not engine.metrics.counters.get("userllm_batch_size") and not engine.metrics.histograms.get(
                    "userllm_batch_size"
                ):
                    await asyncio.sleep(0.01)  # the decode has started on the model thread
                health = await c.get("/healthz")
                added = await c.post("/v1/users/other/events", json={"events": [{"item_id": item, "timestamp": 2}]})
                answered_first = not long.done()
                await long
                return health.status_code, added.status_code, answered_first, long.result().json()

    health, added, first, chat = asyncio.run(scenario())
    assert health == 200 and added == 200 and first  # answered while the 3,000-token decode was running
    assert chat["usage"]["completion_tokens"] == 3000 and chat["choices"][0]["finish_reason"] == "length"
