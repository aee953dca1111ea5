"""PrefixCache: the longest shared run of tokens is reused, the rest recomputed, and the LRU keeps to its
byte budget; a cropped cache computes the same logits as a fresh prefill."""

import torch

from tests.llm.conftest import tiny_llama
from userllm.llm.prefix_cache import PrefixCache, common_prefix, kv_bytes


def run(llm, ids, cache=None):
    out = llm(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
    return out.logits[0, -1], out.cache


@torch.no_grad()
def test_reused_prefixes_give_the_logits_of_a_fresh_prefill():
    llm = tiny_llama().eval()
    prefix, question = list(range(3, 23)), [50, 51, 52]
    cache = PrefixCache(budget_bytes=10**9)
    kv, reused = cache.lookup("u", prefix)
    assert (kv, reused) == (None, 0) and cache.stats["miss"] == 1
    _, kv = run(llm, prefix + question)
    cache.store("u", prefix, kv)  # cropped back to the prefix
    assert cache.bytes == kv_bytes(kv) == len(prefix) * 4 * 2 * 2 * 8 * 4  # layers x (k, v) x kv heads x dims x 4
    kv, reused = cache.lookup("u", prefix)  # a hit: only the question is run
    assert reused == len(prefix) and cache.stats["hit"] == 1
    torch.testing.assert_close(run(llm, question, kv)[0], run(llm, prefix + question)[0])
    cache.store("u", prefix, kv)
    longer = prefix[:-2] + [90, 91, 92]  # the history changed near its end: the shared run is reused
    kv, reused = cache.lookup("u", longer)
    assert reused == len(prefix) - 2 and cache.stats["extend"] == 1
    torch.testing.assert_close(run(llm, longer[reused:] + question, kv)[0], run(llm, longer + question)[0])


@torch.no_grad()
def test_the_least_recently_used_prefixes_leave_first():
    llm = tiny_llama().eval()
    one = kv_bytes(run(llm, [5] * 10)[1])
    cache = PrefixCache(budget_bytes=2 * one)
    for user in ("a", "b", "c"):
        cache.store(user, [5] * 10, run(llm, [5] * 10)[1])
    assert list(cache.entries) == ["b", "c"] and cache.bytes == 2 * one and cache.stats["evicted"] == 1
    kv, _ = cache.lookup("b", [5] * 10)
    cache.store("b", [5] * 10, kv)  # used: now the most recent
    cache.store("d", [5] * 10, run(llm, [5] * 10)[1])
    assert list(cache.entries) == ["b", "d"]
    cache.store("big", [5] * 30, run(llm, [5] * 30)[1])  # larger than the whole budget: not kept
    assert "big" not in cache.entries and common_prefix([1, 2, 3], [1, 2, 4]) == 2
