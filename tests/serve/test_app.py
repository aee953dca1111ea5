"""``userllm serve`` through the official ``openai`` client (in-process, over the ASGI app) and plain HTTP:
personalized and streamed answers, contexts that follow the store, errors in OpenAI's shape."""

from __future__ import annotations

import time

import openai
import pytest
import torch
from starlette.testclient import TestClient

from userllm.errors import InputError
from userllm.llm.cache import UserContextCache
from userllm.serve.app import ServeConfig, create_app
from userllm.serve.engine import Engine
from userllm.serve.store import EventStore, import_dataset

KEY = "test-key"


def eventually(condition, polls: int = 400) -> bool:
    """Whether ``condition()`` holds within ``polls`` checks 50 ms apart (work on the engine's threads)."""
    for _ in range(polls):
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def serve(tmp_path, synthetic_ds):
    """``serve(run, **config)`` -> (engine, TestClient, openai client), the store holding the dataset's users."""
    made = []

    def make(run, weights="float32", bf16=None, **kw):
        store = EventStore(f"sqlite:///{tmp_path / f'events-{len(made)}.db'}")
        import_dataset(store, synthetic_ds)
        engine = Engine(run, store, weights=weights, bf16=bf16)
        http = TestClient(
            create_app(engine, ServeConfig(api_key=KEY, **kw)), headers={"Authorization": f"Bearer {KEY}"}
        )
        http.__enter__()
        made.append(http)
        client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)
        return engine, http, client

    yield make
    for http in made:
        http.__exit__(None, None, None)


def ask(client, engine, user, **kw):
    return client.chat.completions.create(
        model=engine.name,
        user=user,
        temperature=0,
        max_tokens=6,
        messages=[{"role": "user", "content": "Which item next?"}],
        **kw,
    )


@pytest.mark.parametrize("method", ["userllm", "textprompt"])
def test_openai_client_personalized_and_streamed(serve, ul_run, tp_run, synthetic_ds, method):
    engine, http, client = serve(ul_run if method == "userllm" else tp_run)
    user = synthetic_ds.sequences.get_column("user_id")[0]
    events = min(synthetic_ds.sequences.get_column("length")[0], engine.max_history)
    answer = ask(client, engine, user)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.model == engine.name
    assert answer.usage.completion_tokens <= 6 and answer.usage.model_extra["user_events"] == events
    stream = ask(client, engine, user, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content  # greedy: the same answer, streamed
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    raw = http.post(
        "/v1/chat/completions",
        json={
            "model": engine.name,
            "user": user,
            "stream": True,
            "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert raw.text.rstrip().endswith("data: [DONE]")
    assert [m.id for m in client.models.list()] == [engine.name]


@pytest.mark.parametrize("method", ["userllm", "textprompt"])
def test_int4_weights_serve_the_same_users(serve, ul_run, tp_run, synthetic_ds, method):
    run = ul_run if method == "userllm" else tp_run
    engine, _, client = serve(run, weights="int4")
    assert engine.quantized["layers"] == 2 * 7  # q, k, v, o, gate, up, down of both decoder layers (LoRA left float)
    layer = engine.model.llm.get_base_model() if method == "textprompt" else engine.model.llm
    assert type(layer.model.layers[0].mlp.up_proj).__name__ == "Int4Linear"
    user = synthetic_ds.sequences.get_column("user_id")[0]
    answer = ask(client, engine, user)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens <= 6
    float_engine, _, _ = serve(run)
    ids = torch.randint(3, 20, (1, 8))
    with torch.no_grad():  # the backbone's own logits: close to float32's, not identical (bfloat16 arithmetic)
        got, want = engine.model.llm(input_ids=ids).logits, float_engine.model.llm(input_ids=ids).logits
    assert (got - want).abs().max() < 0.1 * want.abs().max() and not torch.equal(got, want)
    with pytest.raises(InputError, match="weights 'int3'"):
        Engine(run, engine.store, weights="int3")


@pytest.mark.parametrize("method", ["userllm", "textprompt"])
def test_bf16_serves_every_model_call_under_autocast(serve, ul_run, tp_run, synthetic_ds, method):
    """--bf16: the LLM runs under bf16 autocast for every request, and User-LLM's cached contexts are computed
    so (bf16 tensors, a fingerprint of their own); by default a run trained in float32 is served in float32."""
    run = ul_run if method == "userllm" else tp_run
    user = synthetic_ds.sequences.get_column("user_id")[0]
    for bf16 in (True, None):
        engine, _, client = serve(run, bf16=bf16)
        assert engine.bf16 is (bf16 is True)
        seen = []
        hook = engine.model.llm.register_forward_pre_hook(
            lambda module, args: seen.append(torch.is_autocast_enabled("cpu"))
        )
        answer = ask(client, engine, user)
        hook.remove()
        assert answer.choices[0].finish_reason in ("stop", "length") and seen and set(seen) == {engine.bf16}
        if method == "userllm":
            ctx = engine.cache.cached(user).ctx
            assert (ctx.dtype == torch.bfloat16) is engine.bf16 and engine.cache.fingerprint.endswith(
                "+bf16"
            ) is engine.bf16


def test_user_reaches_the_server_and_errors_are_openai_errors(serve, ul_run):
    engine, http, client = serve(ul_run)
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, engine, "nobody-here")
    assert e.value.code == "user_not_found" and "nobody-here" in e.value.message and e.value.param == "user"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", user="x", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "hi"}])  # no user
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=http, max_retries=0).models.list()
    assert e.value.code == "invalid_api_key" and KEY not in e.value.message


def test_contexts_follow_the_store(serve, ul_run, synthetic_ds):
    """Two users' contexts differ; an appended event changes the context exactly as a fresh recompute from
    the store would; DELETE forgets the user."""
    engine, http, client = serve(ul_run)
    a, b = synthetic_ds.sequences.get_column("user_id")[:2]
    ctx_a = engine.context(a).context
    ctx_b = engine.context(b).context
    assert not torch.equal(ctx_a.ctx[:, : ctx_b.ctx.shape[1]], ctx_b.ctx[:, : ctx_a.ctx.shape[1]])
    item = synthetic_ds.items.get_column("item_id")[3]
    r = http.post(
        f"/v1/users/{a}/events", json={"events": [{"item_id": item, "rating": 5, "timestamp": 2_000_000_000}]}
    )
    assert r.status_code == 200 and r.json()["events"] == synthetic_ds.sequences.get_column("length")[0] + 1
    answer = ask(client, engine, a)
    assert answer.usage.model_extra["user_events"] == engine.max_history
    cached = engine.context(a).context
    _, rows, before = engine.window(a)
    fresh = UserContextCache(engine.model).get(a, engine.vocab.encoder_inputs(rows, before))
    assert rows[-1]["item_id"] == item and torch.allclose(cached.ctx, fresh.ctx, atol=1e-5)
    assert all(torch.allclose(cached.kv[k].k, fresh.kv[k].k, atol=1e-5) for k in fresh.kv)
    listed = http.get(f"/v1/users/{a}/events", params={"limit": 2}).json()
    assert listed["object"] == "list" and [e["item_id"] for e in listed["data"]][-1] == item
    assert http.delete(f"/v1/users/{a}").json()["deleted"] is True
    assert http.get(f"/v1/users/{a}/events").json()["data"] == [] and a not in engine.cache.entries
    with pytest.raises(openai.NotFoundError):
        ask(client, engine, a)


def test_bad_requests_are_clear_4xx(serve, ul_run, synthetic_ds):
    engine, http, _ = serve(ul_run, max_body_bytes=4096, max_events_per_request=5)
    item = synthetic_ds.items.get_column("item_id")[0]
    post = lambda body, **kw: http.post("/v1/users/u-new/events", json=body, **kw)  # noqa: E731
    cases = [
        (
            post({"events": [{"item_id": item, "timestamp": 1}, {"item_id": "no-such-item", "timestamp": 2}]}),
            422,
            "events[1].item_id",
            "unknown item",
        ),
        (post({"events": [{"item_id": item, "rating": 50, "timestamp": 1}]}), 422, "events[0].rating", "outside"),
        (post({"events": [{"item_id": item, "timestamp": "yesterday"}]}), 422, "events[0].timestamp", "integer"),
        (post({"events": [{"item_id": item, "timestamp": 1}] * 6}), 413, "events", "at most 5 events"),
        (post({"events": [{"item_id": item, "timestamp": 1, "text": "x" * 5000}]}), 413, None, "over 4,096 bytes"),
        (
            http.post("/v1/users/u-new/events", content=b"{not json", headers={"content-type": "application/json"}),
            400,
            None,
            "not valid JSON",
        ),
        (
            http.post("/v1/users/bad%20id!/events", json={"events": [{"item_id": item, "timestamp": 1}]}),
            422,
            "user_id",
            "letters",
        ),
        (http.get("/v1/users/u-new/events", headers={"Authorization": "Bearer nope"}), 401, None, "API key"),
    ]
    for response, status, param, message in cases:
        body = response.json()
        assert response.status_code == status, body
        assert set(body["error"]) == {"message", "type", "param", "code"} and message in body["error"]["message"], body
        assert body["error"]["param"] == param and "Traceback" not in response.text
    assert engine.store.fingerprint("u-new").count == 0  # nothing of a rejected request was stored
    assert http.get("/healthz", headers={"Authorization": ""}).json()["status"] == "ok"  # no key needed
    metrics = http.get("/metrics").text
    assert (
        'userllm_requests_total{endpoint="/v1/users/{user_id}/events",status="422"} 4' in metrics
    )  # item, rating, timestamp, user id


def test_retried_event_ids_are_stored_once(serve, ul_run, synthetic_ds):
    engine, http, _ = serve(ul_run)
    item = synthetic_ds.items.get_column("item_id")[0]
    body = {"events": [{"item_id": item, "timestamp": 5, "event_id": "once"}]}
    assert [http.post("/v1/users/u9/events", json=body).json()["events"] for _ in range(3)] == [1, 1, 1]


def test_delayed_refreshes_of_many_users_share_one_timer_thread(tmp_path, ul_run, synthetic_ds):
    """Users appending within their refresh interval wait on one timer thread (not a thread each), and every
    one of them is refreshed to their newest events."""
    import threading

    store = EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    engine = Engine(ul_run, store, refresh_interval=0.3)
    item = synthetic_ds.items.get_column("item_id")[0]
    users = [f"s{i}" for i in range(20)]

    def wait_current():
        return eventually(lambda: all(engine.fingerprints.get(u) == store.fingerprint(u) for u in users))

    for t in range(2):  # the first appends refresh at once; the second ones, within the interval, later
        before = threading.active_count()
        for u in users:
            store.append(u, [{"item_id": item, "rating": 4, "timestamp": t}])
            engine.schedule_refresh(u)
        assert threading.active_count() <= before + 1
        assert wait_current()
    assert all(engine.fingerprints[u].count == 2 for u in users)
    # a refresh is not a request: none of them counts as a request's cache hit, whatever it found
    for u in users[:3]:
        engine.schedule_refresh(u)  # nothing new: the refresh finds the context current
    time.sleep(0.6)
    assert engine.metrics.counters["userllm_context_total"].get('{result="hit"}', 0) == 0
    engine.context(users[0])  # a request's read of a current context is a hit
    assert engine.metrics.counters["userllm_context_total"]['{result="hit"}'] == 1
    engine.close()


def test_refreshes_due_together_are_computed_in_one_batch(tmp_path, ul_run, synthetic_ds):
    """Refreshes that fall due while the model thread is busy wait as one job and are computed together
    (one batch), each user's context then what a request computes for that user alone."""
    import threading

    store = EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    engine = Engine(ul_run, store, refresh_interval=0.0)
    items = synthetic_ds.items.get_column("item_id").to_list()
    users = [f"b{i}" for i in range(6)]
    gate = threading.Event()
    engine.executor.submit(gate.wait)  # the model thread is busy decoding
    for i, u in enumerate(users):
        store.append(u, [{"item_id": items[(i + j) % len(items)], "rating": 4, "timestamp": j} for j in range(3)])
        engine.schedule_refresh(u)
    gate.set()
    engine.executor.submit(lambda: None).result()
    assert all(engine.fingerprints.get(u) == store.fingerprint(u) for u in users)
    sizes = engine.metrics.histograms["userllm_refresh_batch_size"][""]
    assert sizes[2] == 1 and sizes[1] == 6  # one batch of all six users
    assert engine.cache.stats["miss"] == 6
    alone = Engine(ul_run, store)
    for u in users:
        a, b = engine.cache.cached(u), alone.context(u).context
        torch.testing.assert_close(a.ctx, b.ctx, rtol=1e-5, atol=1e-6)
        for key in a.kv:
            torch.testing.assert_close(a.kv[key].k, b.kv[key].k, rtol=1e-5, atol=1e-6)
    engine.close(), alone.close()


def test_appends_refresh_the_cached_context_at_most_once_an_interval(tmp_path, ul_run, synthetic_ds):
    """The first append refreshes at once; appends within the interval wait for it and coalesce into one
    refresh. The engine's clock is the test's, advanced by hand: nothing depends on how fast this machine is."""
    now = [100.0]
    store = EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    engine = Engine(ul_run, store, refresh_interval=0.5, clock=lambda: now[0])
    item = synthetic_ds.items.get_column("item_id")[0]

    def refreshed_to(count):
        current = eventually(lambda: engine.fingerprints.get("streamer") == store.fingerprint("streamer"))
        return current and engine.fingerprints["streamer"].count == count

    def append(t):
        store.append("streamer", [{"item_id": item, "rating": 4, "timestamp": t}])
        engine.schedule_refresh("streamer")

    append(0)
    assert refreshed_to(1)
    append(1), append(2)  # within the interval: one refresh, due half a second after the first
    engine.executor.submit(lambda: None).result()  # nothing was queued on the model thread meanwhile
    with engine.lock:
        assert engine.fingerprints["streamer"].count == 1 and engine.due == [(100.5, "streamer")]
        now[0] = 100.5
        engine.lock.notify_all()
    assert refreshed_to(3)
    assert engine.cache.stats["miss"] + engine.cache.stats["append"] == 2
    engine.close()


@pytest.mark.parametrize("exclude_history", [False, True])
def test_a_tp_run_trained_with_candidates_is_served_its_training_prompt(
    serve, tmp_path, synthetic_ds, text_lm_dir, exclude_history
):
    """A TP run trained with ``llm.candidates`` lists the stage-1 encoder's top titles in its prompt; served, it
    reads the very prompt its task data renders for the same events (history and the same titles, best first),
    without the history's own titles when trained with ``llm.exclude_history``."""
    from userllm.config import EncoderConfig, PretrainConfig, TrainConfig, UserLLMConfig
    from userllm.encoder.train import pretrain
    from userllm.tasks import prompts
    from userllm.tasks.train import train

    enc = EncoderConfig(d_model=32, d_feature=16, n_layers=1, n_heads=2, max_len=8, time_gap_buckets=8)
    pretrain(PretrainConfig(dataset=synthetic_ds.root, out=tmp_path / "enc", encoder=enc, epochs=1, batch_size=16))
    llm = UserLLMConfig(backbone=str(text_lm_dir), strategy="lora", candidates=3, exclude_history=exclude_history)
    train(
        TrainConfig(
            dataset=synthetic_ds.root,
            out=tmp_path / "tp",
            task="next_item",
            method="textprompt",
            llm=llm,
            encoder=str(tmp_path / "enc"),
            max_history=5,
            train_examples=4,
            batch_size=4,
        )
    )
    engine, _, client = serve(tmp_path / "tp")
    rated = 0  # users whose encoder ranks an item of their history among its top 3
    for user in synthetic_ds.sequences["user_id"]:
        _, rows, before = engine.window(user)
        inputs = engine.listing_vocab.encoder_inputs(rows, before)
        ranked, window = engine.listing.next_items(inputs, 20)[0].tolist(), set(inputs["item"][0].tolist())
        expected = [i for i in ranked if i not in window][:3] if exclude_history else ranked[:3]
        assert engine.context(user).candidates == [synthetic_ds.item_titles[i] for i in expected]
        rated += bool(set(ranked[:3]) & window)
    assert rated > 0
    seq = synthetic_ds.sequences.row(0, named=True)
    served = engine.context(seq["user_id"])
    assert served.candidates is not None and len(served.candidates) == 3
    question = "Which item next?"
    trained = engine.data.request(seq["user_idx"], seq["length"] - 5, seq["length"], question).prompt
    chat = [{"role": "user", "content": question}]
    assert prompts.render_chat(engine.tokenizer, chat, served.lines, engine.data.words, served.candidates) == trained
    answer = ask(client, engine, seq["user_id"])
    assert answer.usage.prompt_tokens == len(engine.tokenizer(trained, add_special_tokens=False).input_ids)
