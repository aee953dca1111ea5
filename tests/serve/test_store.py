"""The event store on SQLite and on a real PostgreSQL: the same suite on both URLs."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import update

from userllm.errors import InputError
from userllm.serve.store import EventStore, import_dataset, meta


def ev(item, t, **kw):
    return {"item_id": item, "rating": 4.0, "timestamp": t, **kw}


def test_append_orders_by_time_and_fingerprints(store):
    assert store.fingerprint("u1").count == 0 and store.timeline("u1")[1] == []
    assert store.append("u1", [ev("a", 300), ev("b", 100)]) == 2
    assert store.append("u1", [ev("c", 200, text="ok")]) == 3
    fp, rows = store.timeline("u1")
    assert [r["item_id"] for r in rows] == ["b", "c", "a"] and rows[1]["text"] == "ok"  # by timestamp
    assert fp.count == 3 and fp.last_id == max(r["id"] for r in rows) == store.fingerprint("u1").last_id
    _, last2 = store.timeline("u1", last=2)
    assert [r["item_id"] for r in last2] == ["c", "a"]  # the newest two, oldest first
    assert store.timeline("u2")[1] == []


def test_event_ids_make_retries_idempotent(store):
    assert store.append("u1", [ev("a", 1, event_id="e1"), ev("b", 2, event_id="e2")]) == 2
    assert store.append("u1", [ev("a", 1, event_id="e1"), ev("c", 3, event_id="e3")]) == 3  # e1 again: skipped
    assert store.append("u2", [ev("a", 1, event_id="e1")]) == 1  # event ids are per user
    assert store.append("u1", [ev("d", 4), ev("d", 4)]) == 5  # without ids every event counts


def test_delete_and_users(store):
    store.append("u1", [ev("a", 1), ev("b", 2)])
    store.append("u2", [ev("a", 1)])
    assert store.users() == 2 and store.delete_user("u1") == 2
    assert store.fingerprint("u1").count == 0 and store.users() == 1


def test_concurrent_appends_lose_nothing(store):
    def worker(k):
        for i in range(10):
            store.append(f"u{k % 3}", [ev(f"i{i}", i, event_id=f"{k}-{i}")])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sum(store.fingerprint(f"u{u}").count for u in range(3)) == 80


def test_schema_version_newer_than_ours_is_refused(store):
    with store.engine.begin() as conn:
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value="99"))
    with pytest.raises(InputError, match="schema version 99 is newer"):
        EventStore(store.url)
    with store.engine.begin() as conn:
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value="1"))


def test_import_dataset_is_idempotent(store, synthetic_ds):
    n = synthetic_ds.events.height
    assert import_dataset(store, synthetic_ds, chunk=50) == n
    assert import_dataset(store, synthetic_ds) == n
    user = synthetic_ds.sequences.row(0, named=True)
    _, rows = store.timeline(user["user_id"])
    items = synthetic_ds.items.select("item_idx", "item_id").to_dict(as_series=False)
    ids = dict(zip(items["item_idx"], items["item_id"]))
    assert [r["item_id"] for r in rows] == [ids[i] for i in user["item_idx"]]  # the prepared order


def test_bad_urls_are_messages(tmp_path):
    with pytest.raises(InputError, match="not a database URL|not nonsense"):
        EventStore("nonsense://x")
    with pytest.raises(InputError, match="sqlite or postgresql"):
        EventStore("mysql+pymysql://u@h/db")


def test_cli_store_import_and_serve_errors(tmp_path, synthetic_ds, tp_run, run_cli):
    db = f"sqlite:///{tmp_path / 'events.db'}"
    for _ in range(2):  # idempotent
        code, stdout, stderr = run_cli("store", "import", synthetic_ds.root, "--db", db)
        assert code == 0, stderr
        assert (
            f"the store holds {synthetic_ds.events.height:,} events of {synthetic_ds.sequences.height:,} users"
            in " ".join(stdout.split())
        )
    code, _, stderr = run_cli("store", "import", synthetic_ds.root, "--db", "redis://localhost")
    assert code == 2 and "runs on sqlite or postgresql" in " ".join(stderr.split())
    code, _, stderr = run_cli("serve", tmp_path / "no-run", "--db", db)
    assert code == 2 and "holds no trained model" in " ".join(stderr.split()) and "Traceback" not in stderr
    code, _, stderr = run_cli("serve", tp_run, "--db", db, "--max-memory-gb", "0.000001")  # before it listens
    assert code == 2 and "needs about" in " ".join(stderr.split()) and "--max-prompt-tokens" in stderr
    code, _, stderr = run_cli("serve", tp_run, "--db", db, "--max-memory-gb", "0")
    assert code == 2 and "expected GiB > 0" in stderr
