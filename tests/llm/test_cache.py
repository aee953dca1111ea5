"""UserContextCache: exact generations from cache, incremental == recompute, persistence, stale/corrupt entries."""

import pytest
import torch

from tests.encoder.conftest import random_batch
from tests.llm.test_model import build, prompts
from userllm.llm.base import UserContext
from userllm.llm.cache import UserContextCache

SETUPS = [
    dict(mode="cross_attention"),
    dict(mode="cross_attention", perceiver_latents=3),
    dict(mode="soft_prompt"),
    dict(mode="cross_attention", item_words=["title", "category"]),
    dict(mode="cross_attention", candidates=3),
]
IDS = ["xattn", "xattn-perceiver", "soft", "xattn-words", "xattn-candidates"]


def open_gates(model):
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.fill_(0.8), block.ff_gate.fill_(0.5)
    return model.eval()


def timeline(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_batch(1, n, seed=seed)


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_cached_generation_equals_uncached(setup):
    model = open_gates(build(**setup))
    cache = UserContextCache(model)
    users = {"a": timeline(5, 1), "b": timeline(3, 2)}
    ids, mask = prompts(lengths=[6, 4])
    for _ in range(2):  # a miss, then a hit
        ctx = UserContext.stack([cache.get(u, ev) for u, ev in users.items()])
        cached = model.generate(None, ids, mask, context=ctx, max_new_tokens=6)
    # uncached: each user alone (the batched uncached path pads timelines; compare per user)
    for i, ev in enumerate(users.values()):
        n = int(mask[i].sum())
        plain = model.generate(ev, ids[i : i + 1, -n:], mask[i : i + 1, -n:], max_new_tokens=6)
        assert torch.equal(plain[0], cached[i])
    assert cache.stats["miss"] == 2 and cache.stats["hit"] == 2


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_incremental_update_equals_recompute(setup):
    model = open_gates(build(**setup))
    cache = UserContextCache(model)
    full = timeline(9, 3)
    cache.get("u", {k: v[:, :5] for k, v in full.items()})
    for n in range(6, 10):
        got = cache.get("u", {k: v[:, :n] for k, v in full.items()})
    assert cache.stats["append"] == 4 and cache.stats["miss"] == 1
    fresh = UserContextCache(model).get("u", full)
    torch.testing.assert_close(got.ctx, fresh.ctx, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.mask, fresh.mask) and got.kv.keys() == fresh.kv.keys()
    for key in got.kv:
        for a, b in zip(got.kv[key], fresh.kv[key]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setup", SETUPS, ids=IDS)
def test_get_many_computes_each_user_as_get_alone_does(setup):
    """Users computed together (one batch per timeline length: a burst of refreshes) get the entries each
    would get alone; a hit and an incremental append in the same call stay per user."""
    model = open_gates(build(**setup))
    users = {"a": timeline(6, 1), "b": timeline(6, 2), "c": timeline(4, 3), "d": timeline(6, 4)}
    together = UserContextCache(model)
    together.get("d", {k: v[:, :5] for k, v in users["d"].items()})  # d: an append of one event below
    got = together.get_many(users)
    assert together.stats == {"miss": 4, "append": 1}
    for user, events in users.items():
        alone = UserContextCache(model).get(user, events)
        torch.testing.assert_close(got[user].ctx, alone.ctx, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[user].mask, alone.mask) and got[user].kv.keys() == alone.kv.keys()
        for key in alone.kv:
            for a, b in zip(got[user].kv[key], alone.kv[key]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert together.entries["a"]["h"].shape[0] == 1  # its own tensors, not a view of the batch
    assert (
        together.entries["a"]["h"].untyped_storage().data_ptr()
        != together.entries["b"]["h"].untyped_storage().data_ptr()
    )
    again = together.get_many({u: users[u] for u in ("a", "b")})
    assert together.stats["hit"] == 2 and torch.equal(again["a"].ctx, got["a"].ctx)


def test_changed_history_is_recomputed_not_served():
    model = open_gates(build())
    cache = UserContextCache(model)
    a = cache.get("u", timeline(5, 1))
    b = cache.get("u", timeline(5, 2))  # same user, different events: not a prefix
    assert cache.stats["miss"] == 2 and not torch.equal(a.ctx, b.ctx)


def test_persisted_cache_survives_restart_and_rejects_stale_or_corrupt(tmp_path):
    model = open_gates(build())
    cache = UserContextCache(model, tmp_path / "cache")
    ev = {"a": timeline(5, 1), "b": timeline(4, 2)}
    expected = {u: cache.get(u, e) for u, e in ev.items()}
    cache.flush()
    assert (tmp_path / "cache" / "index.json").exists()

    restarted = UserContextCache(model, tmp_path / "cache")
    got = restarted.get("a", ev["a"])
    assert restarted.stats["hit"] == 1 and torch.equal(got.ctx, expected["a"].ctx)

    other = open_gates(build())  # another checkpoint: same shapes, different encoder weights
    with torch.no_grad():
        other.encoder.embed.item.weight.add_(0.1)
    stale = UserContextCache(other, tmp_path / "cache")
    ctx = stale.get("a", ev["a"])
    assert stale.stats["stale"] == 1 and stale.stats["hit"] == 0
    torch.testing.assert_close(ctx.ctx, UserContextCache(other).get("a", ev["a"]).ctx)

    shard = next((tmp_path / "cache").glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-8:] = b"\x00\x01\x02\x03\x04\x05\x06\x07"  # flip bytes inside the tensor data
    shard.write_bytes(bytes(data))
    corrupt = UserContextCache(model, tmp_path / "cache")
    ctxs = [corrupt.get(u, e) for u, e in ev.items()]
    assert corrupt.stats["corrupt"] >= 1 and corrupt.stats["hit"] + corrupt.stats["corrupt"] == 2
    for u, c in zip(ev, ctxs):
        torch.testing.assert_close(c.ctx, expected[u].ctx)
    shard.unlink()
    missing = UserContextCache(model, tmp_path / "cache")
    missing.get("a", ev["a"])
    assert missing.stats["corrupt"] == 1


def test_bf16_entries_are_computed_in_bf16_and_kept_apart_from_float32(tmp_path):
    """``bf16``: contexts computed under bf16 autocast (close to float32's), persisted under a fingerprint of
    their own, so a cache directory written in one precision is recomputed, never served, in the other."""
    model = open_gates(build())
    ev = timeline(5, 1)
    fp32 = UserContextCache(model, tmp_path / "cache")
    want = fp32.get("a", ev)
    fp32.flush()
    bf16 = UserContextCache(model, tmp_path / "cache", bf16=True)
    got = bf16.get("a", ev)
    assert bf16.stats["stale"] == 1 and bf16.stats["hit"] == 0
    assert got.ctx.dtype == torch.bfloat16 and want.ctx.dtype == torch.float32
    torch.testing.assert_close(got.ctx.float(), want.ctx, atol=0.05, rtol=0.05)
    bf16.flush()
    again = UserContextCache(model, tmp_path / "cache", bf16=True)
    assert torch.equal(again.get("a", ev).ctx, got.ctx) and again.stats["hit"] == 1
    back = UserContextCache(model, tmp_path / "cache")
    assert back.get("a", ev).ctx.dtype == torch.float32 and back.stats["stale"] == 1
