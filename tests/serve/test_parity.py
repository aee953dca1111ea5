"""Serving reads a user exactly as training and evaluation do: after `userllm store import`, the encoder inputs
the server builds from the store equal the task data's for the same window of history, and the served greedy
answer equals the loaded run's (``userllm.load(RUN).generate``) for the same instruction."""

from __future__ import annotations

import openai
import pytest
import torch
from starlette.testclient import TestClient

import userllm
from userllm.serve.app import create_app
from userllm.serve.engine import Engine
from userllm.serve.protocol import ServeConfig
from userllm.serve.store import EventStore, import_dataset

INSTRUCTION = "Which item will this user choose next?"


@pytest.fixture
def served(tmp_path, synthetic_ds, ul_run):
    store = EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    import_dataset(store, synthetic_ds)
    engine = Engine(ul_run, store)
    with TestClient(create_app(engine, ServeConfig())) as http:
        yield engine, openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=http, max_retries=0)
    store.close()


def test_every_user_is_read_as_training_reads_them(served, ul_run, synthetic_ds):
    engine, _ = served
    run = userllm.load(ul_run)
    longer = 0
    for user_id in synthetic_ds.sequences.get_column("user_id").to_list():
        example = run.request(user_id, INSTRUCTION)  # the last max_history events, as `userllm answer` reads them
        want = run.data.user_batch([example])
        _, rows, before = engine.window(user_id)
        got = engine.vocab.encoder_inputs(rows, before)
        for key in ("item", "rating", "time_gap"):
            assert torch.equal(got[key], want[key]), f"user {user_id}: {key} differs"
        longer += before is not None
    assert longer  # some users' windows start after their first event (the case a window's first gap tests)


def test_the_served_greedy_answer_is_the_runs(served, ul_run, synthetic_ds):
    engine, client = served
    run = userllm.load(ul_run)
    for user_id in synthetic_ds.sequences.get_column("user_id").to_list()[:4]:
        reply = client.chat.completions.create(
            model=engine.name,
            user=user_id,
            temperature=0,
            max_tokens=6,
            messages=[{"role": "user", "content": INSTRUCTION}],
            extra_body={"ignore_eos": False},
        )
        assert reply.choices[0].message.content.strip() == run.generate(user_id, INSTRUCTION, max_new_tokens=6)
