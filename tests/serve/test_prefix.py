"""A TP run served on its users' cached history prefixes answers exactly as without them, reusing the whole
prefix while the history is unchanged; User-LLM's contexts keep to the same byte budget."""

from __future__ import annotations

import pytest

from userllm.serve.engine import Engine
from userllm.serve.jobs import Job
from userllm.serve.store import EventStore, import_dataset


@pytest.fixture
def store(tmp_path, synthetic_ds):
    store = EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    import_dataset(store, synthetic_ds)
    yield store
    store.close()


def ask(engine: Engine, user: str) -> str:
    got = []
    job = Job(
        user=user,
        messages=[{"role": "user", "content": "Which item next?"}],
        max_tokens=8,
        temperature=0.0,
        emit=lambda kind, payload: got.append((kind, payload)),
    )
    engine.run_batch([job])
    assert got[-1][0] == "done", got[-1]
    return "".join(payload for kind, payload in got if kind == "delta")


def counted(engine: Engine, result: str) -> int:
    line = f'userllm_prefix_cache_total{{result="{result}"}} '
    return next((int(float(x.split()[-1])) for x in engine.metrics.render().splitlines() if x.startswith(line)), 0)


def test_tp_on_cached_prefixes_answers_as_without_them(tp_run, store, synthetic_ds):
    plain, cached = Engine(tp_run, store), Engine(tp_run, store, cache_bytes=2**30)
    assert plain.prefix_cache is None and cached.prefix_cache is not None
    users = synthetic_ds.sequences.get_column("user_id").to_list()[:3]
    for user in users:
        first, again = ask(cached, user), ask(cached, user)
        assert first == again == ask(plain, user)
    assert counted(cached, "miss") == 3 and counted(cached, "hit") == 3
    assert cached.prefix_cache.bytes == sum(e.nbytes for e in cached.prefix_cache.entries.values()) > 0
    item = synthetic_ds.items.get_column("item_id")[0]
    store.append(users[0], [{"item_id": item, "rating": 5, "timestamp": 2**31}])  # the window slides
    assert ask(cached, users[0]) == ask(plain, users[0])
    assert counted(cached, "extend") + counted(cached, "miss") == 4  # recomputed past the shared opening
    small = Engine(tp_run, store, cache_bytes=1)  # no prefix fits: every request a miss, nothing kept
    assert ask(small, users[1]) == ask(plain, users[1]) and not small.prefix_cache.entries


def test_user_llm_contexts_keep_to_the_budget(ul_run, store, synthetic_ds):
    users = synthetic_ds.sequences.get_column("user_id").to_list()[:4]
    probe = Engine(ul_run, store)
    ask(probe, users[0])
    one = probe.cache.bytes
    engine = Engine(ul_run, store, cache_bytes=int(2.5 * one))
    for user in users:
        ask(engine, user)
    assert len(engine.cache.entries) == 2 and engine.cache.bytes <= 2.5 * one
    assert list(engine.cache.entries) == users[2:] and engine.cache.stats["evicted"] == 2


def test_the_prefix_is_everything_before_the_question(tp_run):
    import userllm
    from userllm.tasks import prompts

    run = userllm.load(tp_run)
    lines, words = ["A (1990); 5; Drama", "B (1991); 3; Comedy"], run.data.words
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which item next?"}]
    prefix, rest = prompts.render_chat_split(run.tokenizer, messages, lines, words)
    assert prefix + rest == prompts.render_chat(run.tokenizer, messages, lines, words)
    assert lines[-1] in prefix and rest.startswith("Which item next?")
    tokens = (
        run.tokenizer(prefix, add_special_tokens=False).input_ids
        + run.tokenizer(rest, add_special_tokens=False).input_ids
    )
    assert tokens == run.tokenizer(prefix + rest, add_special_tokens=False).input_ids  # cut between tokens
