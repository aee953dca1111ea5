"""What keeping a user warm costs each method: TP with its history's KV prefix cached, as vLLM's automatic
prefix caching or SGLang's RadixAttention serve a text prompt, against User-LLM's cached user context.

For TP the prompt is split where the question starts: everything before it (the chat template's opening and
the history written out) is the user's prefix, kept as the backbone's keys and values; a request for the
same history then prefills only the question. Per history length:

- ``bytes_per_user``: the prefix's keys and values as cached (float32), against the bytes of User-LLM's
  :class:`~userllm.llm.cache.UserContextCache` entry (encoder state, context, cross-attention keys/values);
- a request on a **miss** (the whole prompt prefilled) and on a **hit** (the question over the cached
  prefix): prefill FLOPs (analytic, :func:`~userllm.llm.flops.llm_forward_flops`) and latency;
- one **appended event**: while the user's history is shorter than the window, TP extends its prefix by the
  new line; once the window is full every new event shifts every line, so the whole prefix is prefilled
  again. User-LLM's cache appends one encoder step, or recomputes its (small) context when the window slides.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from userllm.llm.cache import UserContextCache, entry_bytes
from userllm.llm.flops import backbone_shape, llm_forward_flops
from userllm.llm.prefix_cache import kv_bytes
from userllm.tasks import prompts


def median_s(fn, repeats: int, setup=None) -> float:
    """Median seconds of ``fn(setup())`` over ``repeats`` warm runs (``setup`` outside the clock)."""
    fn(setup() if setup else None)
    times = []
    for _ in range(repeats):
        arg = setup() if setup else None
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure_text_prompt(llm, tokenizer, data, user: int, length: int, repeats: int) -> dict:
    """The prefix-cached TP's row at ``length`` events for timeline ``user`` of ``data`` (TP task data)."""
    question = prompts.instruction("next_item", data.words)
    end = int(data.tl.lengths[user])
    lines = data.history_lines(user, end - length, end)
    before, after = prompts.render_chat_split(tokenizer, [{"role": "user", "content": question}], lines, data.words)

    def ids(text):
        return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(llm.device)

    prefix, rest, new_line = ids(before), ids(after), ids("\n" + lines[-1])  # the prefix as `userllm serve` caches
    p, q, e = prefix.shape[1], rest.shape[1], new_line.shape[1]

    def run(ids, kv=None):  # the last position's logits only, as a server needs (and the analytic count assumes)
        return llm(input_ids=ids, cache=kv, use_cache=True, logits_to_keep=1)

    cached = run(prefix).cache
    c = backbone_shape(llm.config)
    return {
        "method": "text_prompt+prefix_cache",
        "history": length,
        "prefix_tokens": p,
        "question_tokens": q,
        "bytes_per_user": kv_bytes(cached),
        "miss_prefill_flops": llm_forward_flops(c, p + q, p + q),
        "hit_prefill_flops": llm_forward_flops(c, q, p + q),
        "append_extend_flops": llm_forward_flops(c, e, p + e),
        "append_slide_flops": llm_forward_flops(c, p, p),
        "miss_prefill_s": median_s(lambda _: run(torch.cat([prefix, rest], 1)), repeats),
        "hit_prefill_s": median_s(lambda kv: run(rest, kv), repeats, lambda: copy.deepcopy(cached)),
        "append_extend_s": median_s(lambda kv: run(new_line, kv), repeats, lambda: copy.deepcopy(cached)),
        "append_slide_s": median_s(lambda _: run(prefix), repeats),
    }


@torch.no_grad()
def measure_user_llm(name: str, model, data, user: int, length: int, repeats: int) -> dict:
    """User-LLM's row: the bytes of the user's cached context, and the request's and an append's cost."""
    question = prompts.instruction("next_item", data.words)
    end = int(data.tl.lengths[user])
    ex = data.request(user, end - length, end, question)
    ids, mask, _ = data.batch([ex], with_answers=False)
    events = data.user_batch([ex])
    shorter = {k: v[:, :-1] for k, v in events.items()}
    cache = UserContextCache(model)
    context = cache.get("u", events)

    def fresh(timeline):
        def make():
            c = UserContextCache(model)
            c.get("u", timeline)
            return c

        return make

    def prefill(ctx):
        with model.conditioned(None, ids, mask, context=ctx) as (embeds, prefix_mask):
            model.llm(inputs_embeds=embeds, attention_mask=prefix_mask, use_cache=True, logits_to_keep=1)

    return {
        "method": name,
        "history": length,
        "prefix_tokens": 0,
        "question_tokens": int(mask.sum()),
        "bytes_per_user": entry_bytes(cache.entries["u"]),
        "hit_prefill_s": median_s(lambda _: prefill(context), repeats),
        "miss_prefill_s": median_s(lambda _: prefill(UserContextCache(model).get("u", events)), repeats),
        "append_extend_s": median_s(lambda c: c.get("u", events), repeats, fresh(shorter)),
    }


@torch.no_grad()
def decode_token_s(model, data, user: int, length: int, repeats: int) -> float:
    """Seconds of one decoded token after the request's prefill (the method's own cache), median of
    ``repeats`` warm runs: the clock runs over 8 steps after the prefill, which it leaves out (TP's prefill
    of a long prompt varies by more than the 8 steps take)."""
    from userllm.llm.decoding import generate_tokens, prefill

    question = prompts.instruction("next_item", data.words)
    end = int(data.tl.lengths[user])
    ex = data.request(user, end - length, end, question)
    ids, mask, _ = data.batch([ex], with_answers=False)
    users = data.user_batch([ex]) if hasattr(model, "encoder") else None
    eos = data.tokenizer.eos_token_id

    with model.conditioned(users, ids, mask) as (embeds, prefix_mask):  # the context stays as it is

        def prefilled():  # a fresh cache for each run, off the clock
            return prefill(model, embeds, prefix_mask)[0]

        def steps(p):  # step 0 reads the prefill's logits; 1 to 8 each run the backbone
            generate_tokens(model, embeds, prefix_mask, max_new_tokens=9, pad_token_id=eos, prefilled=p)

        return median_s(steps, repeats, prefilled) / 8


def zipf_trace(users: int, chats: int, seed: int) -> list[tuple[str, int]]:
    """``("chat" | "append", user index)`` in order: Zipf(1.0) over ``users`` (seeded), one appended event per
    ten chats."""
    import numpy as np

    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, users + 1)
    draws = rng.choice(users, size=chats + chats // 10, p=p / p.sum())
    appends = set(rng.choice(len(draws), size=chats // 10, replace=False).tolist())
    return [("append" if i in appends else "chat", int(u)) for i, u in enumerate(draws.tolist())]


def lru_replay(row: dict, steps: list[tuple[str, int]], budget_bytes: int, new_tokens: int) -> dict:
    """A request trace through one method's LRU cache of ``budget_bytes``: the hit rate and, from the row's
    measured hit and miss costs, the time to first token (mean, p50, p99) and the requests/s of a server
    decoding one request at a time. Windows are full (long-lived users), so an appended event leaves the
    user's cached state stale: TP's prefix, User-LLM's context, each recomputed at the next chat."""
    import numpy as np

    capacity = max(0, budget_bytes // row["bytes_per_user"])
    lru: dict[int, None] = {}
    ttft, hits = [], 0
    for kind, user in steps:
        if kind == "append":
            lru.pop(user, None)
            continue
        hit = user in lru
        hits += hit
        ttft.append(row["hit_prefill_s"] if hit else row["miss_prefill_s"])
        lru.pop(user, None)
        lru[user] = None
        if len(lru) > capacity:
            lru.pop(next(iter(lru)))
    seconds = np.array(ttft)
    return {
        "cached_users": int(capacity),
        "hit_rate": hits / len(ttft),
        "ttft_mean_s": float(seconds.mean()),
        "ttft_p50_s": float(np.percentile(seconds, 50)),
        "ttft_p99_s": float(np.percentile(seconds, 99)),
        "requests_per_s": 1.0 / (seconds.mean() + new_tokens * row.get("decode_token_s", 0.0)),
    }


def replay(rows: dict[str, dict], *, users: int, budget_bytes: int, chats: int, new_tokens: int, seed: int = 0):
    """:func:`lru_replay` of one :func:`zipf_trace` over ``users`` for each method's row."""
    steps = zipf_trace(users, chats, seed)
    out = {}
    for name, row in rows.items():
        result = lru_replay(row, steps, budget_bytes, new_tokens)
        out[name] = {**result, "users": users, "cached_users": min(users, result["cached_users"])}
    return out


def run_prefix(
    *,
    out,
    dataset=None,
    backbone: str = "smollm2-135m",
    lengths: tuple[int, ...] = (50, 200, 500),
    repeats: int = 3,
    budget_bytes: int = 1 << 30,
    users: tuple[int, ...] = (100, 1000, 10000),
    chats: int = 20000,
    new_tokens: int = 16,
    seed: int = 0,
    force: bool = False,
) -> dict:
    """Every method's row at each history length, the many-users replay at 200 events (or the longest
    length), and ``prefix.json`` / ``.md`` / ``.png`` in ``out``."""
    import tempfile
    from pathlib import Path

    from userllm.bench.efficiency import bench_dataset, bench_timelines, build_method
    from userllm.bench.plots import plot_prefix
    from userllm.config import EncoderConfig
    from userllm.io import check_output, runtime, write_dir_atomically, write_json
    from userllm.llm.backbone import load_backbone
    from userllm.progress import progress_bar
    from userllm.tasks.data import TaskData

    out = Path(out)
    check_output(out, force, marker="prefix.json")
    with tempfile.TemporaryDirectory() as tmp:
        ds = bench_dataset(dataset, Path(tmp))
        tl = bench_timelines(ds, 1, max(lengths))
        rows, decode = [], {}
        at = 200 if 200 in lengths else max(lengths)
        names = ("text_prompt+prefix_cache", "cross_attention", "cross_attention+perceiver16")
        with progress_bar("cells") as progress:
            task = progress.add_task("prefix cache", total=len(names) * len(lengths))
            for name in names:
                bb = load_backbone(backbone)
                tp = name.startswith("text_prompt")
                enc = EncoderConfig(max_len=max(lengths), dropout=0.0)
                model = build_method("text_prompt" if tp else name, bb.model, enc, ds, seed)
                data = TaskData(
                    ds,
                    bb.tokenizer,
                    task="next_item",
                    method="textprompt" if tp else "userllm",
                    max_history=max(lengths),
                    timelines=tl,
                )
                for length in lengths:
                    if tp:
                        rows.append(measure_text_prompt(bb.model.eval(), bb.tokenizer, data, 0, length, repeats))
                    else:
                        rows.append(measure_user_llm(name, model, data, 0, length, repeats))
                    progress.update(task, advance=1, description=f"{name} @ {length}")
                decode[name] = decode_token_s(model, data, 0, at, repeats)
        by_name = {r["method"]: {**r, "decode_token_s": decode[r["method"]]} for r in rows if r["history"] == at}
        report = {
            "backbone": bb.label,
            "lengths": list(lengths),
            "repeats": repeats,
            "rows": rows,
            "decode_token_s": decode,
            "replay": {
                "history": at,
                "budget_bytes": budget_bytes,
                "chats": chats,
                "new_tokens": new_tokens,
                "by_users": [
                    replay(by_name, users=n, budget_bytes=budget_bytes, chats=chats, new_tokens=new_tokens, seed=seed)
                    for n in users
                ],
            },
            "runtime": runtime(),
        }

        def write(tmp_dir: Path) -> None:
            write_json(tmp_dir / "prefix.json", report)
            (tmp_dir / "prefix.md").write_text(markdown(report))
            plot_prefix(report, tmp_dir / "prefix.png")

        write_dir_atomically(out, write, force=True, marker="prefix.json")
    return report


def rows_table(rows: list[dict]) -> list[str]:
    """Each method's row at each history length (:func:`measure_text_prompt`, :func:`measure_user_llm`) as the
    lines of a markdown table."""
    lines = [
        "| method | history | prefix tokens | cached bytes per user | miss prefill s | hit prefill s | "
        "appended event s (extend / slide) | hit prefill GFLOPs | miss prefill GFLOPs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        slide = f" / {r['append_slide_s']:.3f}" if "append_slide_s" in r else ""
        flops = (
            f"{r['hit_prefill_flops'] / 1e9:.1f} | {r['miss_prefill_flops'] / 1e9:.1f}"
            if "hit_prefill_flops" in r
            else "- | -"
        )
        lines.append(
            f"| {r['method']} | {r['history']} | {r['prefix_tokens']:,} | {r['bytes_per_user'] / 1e6:,.3f} MB | "
            f"{r['miss_prefill_s']:.3f} | {r['hit_prefill_s']:.3f} | {r['append_extend_s']:.3f}{slide} | {flops} |"
        )
    return lines


def markdown(report: dict) -> str:
    """The rows and the replay as markdown tables, each figure beside its target."""
    lines = rows_table(report["rows"])
    rp = report["replay"]
    lines += [
        "",
        f"Replay at {rp['history']} events, a cache of {rp['budget_bytes'] / 2**30:.0f} GiB per method, "
        f"{rp['chats']:,} chats drawn Zipf(1.0) over the users, one appended event per ten chats, "
        f"{rp['new_tokens']} new tokens a chat:",
        "",
        "| users | method | users cached | hit rate | TTFT p50 s | TTFT p99 s | requests/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for group in rp["by_users"]:
        for name, g in group.items():
            lines.append(
                f"| {g['users']:,} | {name} | {g['cached_users']:,} | {g['hit_rate']:.2f} | {g['ttft_p50_s']:.3f} | "
                f"{g['ttft_p99_s']:.3f} | {g['requests_per_s']:.2f} |"
            )
    last = rp["by_users"][-1]
    tp, ul = last["text_prompt+prefix_cache"], last["cross_attention+perceiver16"]
    tp_row = next(
        r for r in report["rows"] if r["method"] == "text_prompt+prefix_cache" and r["history"] == rp["history"]
    )
    ul_row = next(
        r for r in report["rows"] if r["method"] == "cross_attention+perceiver16" and r["history"] == rp["history"]
    )
    lines += [
        "",
        f"- at {last['text_prompt+prefix_cache']['users']:,} users, User-LLM (Perceiver-16) serves "
        f"**{ul['requests_per_s'] / tp['requests_per_s']:.1f}X** the prefix-cached TP's requests/s (target >= 5X)",
        f"- a cached user costs **{tp_row['bytes_per_user'] / ul_row['bytes_per_user']:,.0f}X** fewer bytes "
        f"(target >= 30X)",
    ]
    return "\n".join(lines) + "\n"
