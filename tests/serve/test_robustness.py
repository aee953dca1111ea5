"""A server that one request cannot stall: an over-long prompt is refused before any model work, a request
whose client has gone or whose time is up leaves its batch while the others decode on, and SIGTERM during a
decode ends the server cleanly (exit 0, the store closed)."""

from __future__ import annotations

import json
import signal
import socket
import threading

import httpx2
import pytest
from starlette.testclient import TestClient

from userllm.bench.serve import free_port, start
from userllm.serve.app import create_app
from userllm.serve.engine import Engine
from userllm.serve.jobs import Job
from userllm.serve.protocol import APIError, ServeConfig
from userllm.serve.store import EventStore, import_dataset


@pytest.fixture
def engine(tmp_path, ul_run, synthetic_ds):
    store = EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    import_dataset(store, synthetic_ds)
    engine = Engine(ul_run, store)
    yield engine
    engine.close()


def user_of(synthetic_ds) -> str:
    return synthetic_ds.sequences.get_column("user_id")[0]


def test_a_prompt_longer_than_the_context_is_refused_before_any_model_work(engine, synthetic_ds):
    with TestClient(create_app(engine)) as http:
        body = {"model": engine.name, "user": user_of(synthetic_ds), "messages": [{"role": "user", "content": ""}]}
        body["messages"][0]["content"] = "tell me everything " * 16_000  # ~300 KB
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert "the prompt is" in error["message"] and "at most 1,024" in error["message"]  # both lengths
        assert "userllm_batch_size" not in engine.metrics.histograms  # the model never saw it
        limited = create_app(engine, ServeConfig(max_prompt_tokens=10))
    with TestClient(limited) as http:
        body["messages"][0]["content"] = "Which item next?"
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and "--max-prompt-tokens" in r.json()["error"]["message"]


def jobs(engine, user: str, *, first_delta=None) -> tuple[Job, Job, dict]:
    """Two long chats of one user decoded in one batch; ``first_delta(job)`` runs when the first one's first
    token arrives. Returns the jobs and what each received."""
    got = {"a": [], "b": []}

    def emit(name):
        def receive(kind, payload):
            got[name].append((kind, payload))
            if name == "a" and kind == "delta" and len(got["a"]) == 1 and first_delta:
                first_delta(a)

        return receive

    common = dict(user=user, messages=[{"role": "user", "content": "talk"}], max_tokens=40, ignore_eos=True)
    a, b = Job(emit=emit("a"), **common), Job(emit=emit("b"), **common)
    return a, b, got


def test_a_request_whose_client_went_away_leaves_its_batch(engine, synthetic_ds):
    a, b, got = jobs(engine, user_of(synthetic_ds), first_delta=lambda job: job.cancel("client"))
    engine.run_batch([a, b])
    assert [k for k, _ in got["a"]] == ["delta"]  # nothing after the client left, not even "done"
    assert got["b"][-1][0] == "done" and got["b"][-1][1]["usage"]["completion_tokens"] == 40  # the other decodes on
    assert engine.metrics.counters["userllm_requests_abandoned_total"][""] == 1
    gone, _, seen = jobs(engine, user_of(synthetic_ds))
    gone.cancel("client")  # gone before its batch started: never decoded
    engine.run_batch([gone])
    assert seen["a"] == [] and engine.metrics.counters["userllm_requests_abandoned_total"][""] == 2


def test_a_request_past_its_time_limit_ends_with_a_504_and_the_batch_goes_on(engine, synthetic_ds):
    now = [0.0]
    engine.clock = lambda: now[0]

    def late(job):
        now[0] = 100.0  # the first token came after the deadline of job a

    a, b, got = jobs(engine, user_of(synthetic_ds), first_delta=late)
    a.deadline, b.deadline = 10.0, 1000.0
    engine.run_batch([a, b])
    kind, error = got["a"][-1]
    assert kind == "error" and isinstance(error, APIError) and error.status == 504 and error.code == "timeout"
    assert got["b"][-1][0] == "done"
    assert engine.metrics.counters["userllm_requests_timed_out_total"][""] == 1


def test_a_batch_that_would_not_fit_the_memory_is_decoded_in_parts(engine, synthetic_ds):
    """A batch whose KV caches exceed the memory budget is decoded in parts that fit (here one chat at a
    time), with the answers of the whole batch; a server whose longest accepted chat cannot fit refuses to
    start."""
    from userllm.errors import ConfigError
    from userllm.llm.budget import inference_bytes

    users = synthetic_ds.sequences.get_column("user_id").to_list()[:3]

    def answers() -> list[str]:
        got = {u: [] for u in users}
        batch = [
            Job(
                user=u,
                messages=[{"role": "user", "content": "Which item next?"}],
                max_tokens=6,
                temperature=0.0,
                emit=lambda kind, payload, u=u: got[u].append((kind, payload)),
            )
            for u in users
        ]
        engine.run_batch(batch)
        assert all(got[u][-1][0] == "done" for u in users), got
        return ["".join(p for k, p in got[u] if k == "delta") for u in users]

    whole = answers()
    assert "userllm_batches_split_total" not in engine.metrics.counters
    one = inference_bytes(engine.model, 64)  # a chat of 64 positions; these take more (prompt and answer)
    engine.max_memory_gb = one / 2**30
    assert answers() == whole
    assert engine.metrics.counters["userllm_batches_split_total"][""] == 1
    with pytest.raises(ConfigError, match="needs about .* MiB to decode; --max-memory-gb"):
        engine.check_memory(128)
    engine.check_memory(64)


def shows(client, line: str, polls: int = 600) -> bool:
    """Whether the server's /metrics shows ``line`` within ``polls`` checks 0.1 s apart."""
    for _ in range(polls):
        if line in client.get("/metrics").text:
            return True
        threading.Event().wait(0.1)
    return False


def test_disconnect_and_sigterm_on_a_real_server(tmp_path, ul_run, synthetic_ds):
    """Over HTTP: a streaming client that disconnects is dropped (counted in /metrics); then SIGTERM during a
    decode longer than the shutdown grace: the decode is ended, the server exits 0 (uvicorn alone dies by the
    signal), and the event appended before is in the store."""
    db = f"sqlite:///{tmp_path / 'events.db'}"
    store = EventStore(db)
    import_dataset(store, synthetic_ds)
    store.close()
    port = free_port()
    proc = start(ul_run, db, port, max_batch=4, extra=("--shutdown-grace", "1", "--max-tokens", "4000"))
    base = f"http://127.0.0.1:{port}"
    user, item = user_of(synthetic_ds), synthetic_ds.items.get_column("item_id")[0]
    long = {
        "model": f"userllm-{ul_run.name}",
        "user": user,
        "max_tokens": 256,
        "ignore_eos": True,
        "stream": True,
        "messages": [{"role": "user", "content": "talk"}],
    }
    try:
        with httpx2.Client(base_url=base, timeout=120) as c:
            with c.stream("POST", "/v1/chat/completions", json=long) as r:
                next(line for line in r.iter_lines() if '"content": "' in line and '"content": ""' not in line)
            # the connection is closed mid-stream: the server notices and drops the request
            assert shows(c, "userllm_requests_abandoned_total 1")
            # a non-streaming client that gives up: its request is dropped within a second as well
            body = json.dumps({**long, "stream": False, "max_tokens": 4000}).encode()
            with socket.create_connection(("127.0.0.1", port)) as raw:
                raw.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                threading.Event().wait(0.5)
            assert shows(c, "userllm_requests_abandoned_total 2")
            appended = c.post(f"/v1/users/{user}/events", json={"events": [{"item_id": item, "timestamp": 2**31}]})
            assert appended.status_code == 200
            lines = []
            with c.stream("POST", "/v1/chat/completions", json={**long, "max_tokens": 4000}) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    if len(lines) == 3:
                        proc.send_signal(signal.SIGTERM)  # during the decode
        code = proc.wait(timeout=120)
        stderr = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, stderr[-2000:]
    assert "Traceback" not in stderr and "stopped" in stderr
    # a decode longer than the grace is ended: its stream stops well before its 4,000 tokens, with a 503
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert len(events) < 4000 and events[-1]["error"]["code"] == "shutdown" and lines[-2:] == ["data: [DONE]", ""]
    store = EventStore(db)
    assert store.timeline(user)[1][-1]["timestamp"] == 2**31
    store.close()
