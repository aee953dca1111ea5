"""Trained tiny runs to serve (User-LLM and TP on the synthetic dataset) and event stores: a SQLite file and
a real PostgreSQL 16 started from PyPI (pgserver; as root it runs the server as its own system user)."""

from __future__ import annotations

from pathlib import Path

import pytest

from userllm.config import TrainConfig, UserLLMConfig
from userllm.serve.store import EventStore
from userllm.tasks.train import train


def trained_run(root: Path, ds, lm_dir: Path, method: str) -> Path:
    llm = UserLLMConfig(
        backbone=str(lm_dir), strategy="lora" if method == "textprompt" else "enc", cross_attention_every=1
    )
    cfg = TrainConfig(
        dataset=ds.root,
        out=root / method,
        task="next_item",
        method=method,
        llm=llm,
        encoder="random" if method == "userllm" else None,
        max_history=6,
        train_examples=8,
        batch_size=4,
        lr=3e-3,
    )
    train(cfg)
    return root / method


@pytest.fixture(scope="session")
def ul_run(tmp_path_factory, synthetic_ds, text_lm_dir) -> Path:
    return trained_run(tmp_path_factory.mktemp("runs"), synthetic_ds, text_lm_dir, "userllm")


@pytest.fixture(scope="session")
def tp_run(tmp_path_factory, synthetic_ds, text_lm_dir) -> Path:
    return trained_run(tmp_path_factory.mktemp("runs"), synthetic_ds, text_lm_dir, "textprompt")


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    pgserver = pytest.importorskip("pgserver")
    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    yield server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    server.cleanup()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> EventStore:
    """An empty event store on each database (PostgreSQL: a fresh schema in the session's server)."""
    if request.param == "sqlite":
        s = EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    else:
        s = EventStore(request.getfixturevalue("postgres_url"))
        with s.engine.begin() as conn:
            from userllm.serve.store import events

            conn.execute(events.delete())
    yield s
    s.close()
