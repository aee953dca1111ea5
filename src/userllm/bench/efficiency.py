"""``userllm bench efficiency``: what User-LLM saves against the text prompt, measured side by side.

For each history length and method (TP; cross-attention; cross-attention + Perceiver; soft prompt; soft
prompt + Perceiver) one next-item request is built from real MovieLens-100K timelines (the longest users,
cycled when shorter than the length) and measured on the real forward passes:

- LLM input tokens per request (prompt tokens, plus the context embeddings of a soft prompt);
- FLOPs per request for the prefill and for generating ``new_tokens`` tokens (prefill included), counted
  with ``torch.utils.flop_counter`` (matrix products and attention; the CPU attention kernel is registered
  with PyTorch's own SDPA formula), encoder and connectors included, beside :func:`analytic_flops`;
- prefill and end-to-end generation latency, median and p90 over warm repeats, at each batch size, and the
  peak memory above the loaded model;
- every figure's ratio to TP at the same history length;
- serving from a warm :class:`~userllm.llm.cache.UserContextCache` against the plain backbone generating
  the same prompt with no user context;
- TP as it is deployed, with each user's history prefix cached (``text_prompt+prefix_cache``,
  :func:`userllm.bench.prefix.measure_text_prompt`): a request's prefill on a hit and on a miss, one appended
  event, and the bytes a cached user holds.

The analytic count is :func:`userllm.llm.flops.analytic_flops` (its module gives the formula).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from userllm.bench.measure import PeakRSS, count_flops, paired_ratio, timed, timed_in_turn
from userllm.bench.plots import plot_efficiency
from userllm.config import EncoderConfig, PrepareConfig, UserLLMConfig
from userllm.data.dataset import PreparedDataset
from userllm.encoder.data import Timelines
from userllm.encoder.pretrained import build_encoder
from userllm.io import check_output, runtime, write_dir_atomically, write_json
from userllm.llm.backbone import load_backbone
from userllm.llm.base import ConditionedLM, UserContext
from userllm.llm.cache import UserContextCache
from userllm.llm.decoding import generate_tokens, llm_step
from userllm.llm.flops import analytic_flops
from userllm.llm.model import UserLLM
from userllm.llm.textprompt import TextPromptLM
from userllm.progress import progress_bar
from userllm.tasks import prompts
from userllm.tasks.data import TaskData

METHODS: dict[str, dict | None] = {
    "text_prompt": None,
    "cross_attention": {"mode": "cross_attention"},
    "cross_attention+perceiver16": {"mode": "cross_attention", "perceiver_latents": 16},
    # twice the default blocks: what each cross-attention block costs a decoded token (cached serving)
    "cross_attention+perceiver16 (every 4th layer)": {
        "mode": "cross_attention",
        "perceiver_latents": 16,
        "cross_attention_every": 4,
    },
    "soft_prompt": {"mode": "soft_prompt"},
    "soft_prompt+perceiver16": {"mode": "soft_prompt", "perceiver_latents": 16},
}


# ----------------------------------------------------------------- requests
def bench_dataset(dataset: Path | None, tmp: Path) -> PreparedDataset:
    """``dataset``, or MovieLens-100K prepared into ``tmp`` when none is given."""
    if dataset is None:
        from userllm.data.prepare import prepare_dataset

        dataset = tmp / "ml-100k"
        prepare_dataset(PrepareConfig(source="movielens-100k", out=dataset))
    return PreparedDataset(dataset)


def bench_timelines(ds: PreparedDataset, users: int, length: int) -> Timelines:
    """The ``users`` longest timelines of ``ds``, each cycled to exactly ``length`` events."""
    tl = Timelines.from_dataset(ds)
    longest = np.argsort(-tl.lengths, kind="stable")[:users]
    idx = np.concatenate([tl.offsets[u] + np.arange(length) % tl.lengths[u] for u in longest])
    return Timelines(
        item=tl.item[idx],
        rating=tl.rating[idx],
        time_gap=tl.time_gap[idx],
        lengths=np.full(len(longest), length),
        offsets=np.arange(len(longest)) * length,
        num_gap_buckets=tl.num_gap_buckets,
    )


def build_method(name: str, llm, encoder_cfg: EncoderConfig, ds: PreparedDataset, seed: int) -> ConditionedLM:
    """A model of the method on ``llm`` (weights do not change the cost; gates opened so nothing is skipped)."""
    if METHODS[name] is None:
        return TextPromptLM(UserLLMConfig(strategy="full"), llm=llm).eval()  # the plain backbone
    encoder = build_encoder(ds, encoder_cfg, seed)
    torch.manual_seed(seed)
    # the architectures as measured in benchmarks/README.md: no item words (they add 2 n d^2 FLOPs per feature)
    model = UserLLM(UserLLMConfig(strategy="enc", item_words=[], **METHODS[name]), encoder=encoder, llm=llm).eval()
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    return model


def run_efficiency(
    *,
    out: Path,
    backbone: str = "smollm2-135m",
    dataset: Path | None = None,
    lengths: tuple[int, ...] = (10, 25, 50, 100, 200, 500),
    batch_sizes: tuple[int, ...] = (1, 8),
    repeats: int = 5,
    new_tokens: int = 16,
    cache_length: int = 200,
    cache_repeats: int = 10,
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
) -> dict:
    """Measure every (method, history length) and write ``efficiency.json``/``.md``/``.png`` to ``out``."""
    out = Path(out)
    check_output(out, force, marker="efficiency.json")
    with tempfile.TemporaryDirectory() as tmp:
        ds = bench_dataset(dataset, Path(tmp))
        tl = bench_timelines(ds, max(batch_sizes), max(lengths))
        encoder_cfg = EncoderConfig(max_len=max(lengths), dropout=0.0)
        rows, cache_rows, prefix_rows = [], [], []
        with progress_bar("cells") as progress:
            task = progress.add_task("efficiency", total=(len(METHODS) + 1) * len(lengths))
            for name in METHODS:
                bb = load_backbone(backbone)  # a fresh backbone per method: no hooks of the previous one
                model = build_method(name, bb.model, encoder_cfg, ds, seed).to(device)
                method = "textprompt" if METHODS[name] is None else "userllm"
                data = TaskData(
                    ds, bb.tokenizer, task="next_item", method=method, max_history=max(lengths), timelines=tl
                )
                text = prompts.instruction("next_item", data.words)
                for length in lengths:
                    rows.append(measure(model, data, text, length, batch_sizes, repeats, new_tokens, device, name))
                    progress.update(task, advance=1, description=f"{name} @ {length}")
                if method == "textprompt":  # the same backbone, each user's history prefix cached
                    from userllm.bench.prefix import measure_text_prompt

                    for length in lengths:
                        prefix_rows.append(measure_text_prompt(bb.model.eval(), bb.tokenizer, data, 0, length, repeats))
                        progress.update(task, advance=1, description=f"{name}+prefix_cache @ {length}")
                if method == "userllm" and model.cfg.mode == "cross_attention" and cache_length in lengths:
                    cache_rows.append(
                        measure_cache(
                            model, data, text, cache_length, batch_sizes, cache_repeats, new_tokens, device, name
                        )
                    )
                del model
        add_ratios(rows)
        report = {
            "backbone": bb.label,
            "device": device,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "cache_repeats": cache_repeats,
            "batch_sizes": list(batch_sizes),
            "lengths": list(lengths),
            "rows": rows,
            "cache": cache_rows,
            "prefix_cache": prefix_rows,
            "runtime": runtime(),
        }

        def write(tmp_dir: Path) -> None:
            write_json(tmp_dir / "efficiency.json", report)
            (tmp_dir / "efficiency.md").write_text(markdown(report))
            plot_efficiency(report, tmp_dir / "efficiency.png")

        write_dir_atomically(out, write, force=True, marker="efficiency.json")
    return report


def requests(model, data: TaskData, text: str, length: int, b: int, device: str):
    examples = [data.request(u, int(data.tl.lengths[u]) - length, int(data.tl.lengths[u]), text) for u in range(b)]
    ids, mask, _ = data.batch(examples, with_answers=False, device=device)
    users = data.user_batch(examples, device) if isinstance(model, UserLLM) else None
    return users, ids, mask


def measure(model, data, text, length, batch_sizes, repeats, new_tokens, device, name) -> dict:
    """One row: tokens, FLOPs (counted and analytic), latency and memory of one (method, history length)."""
    row: dict = {"method": name, "history": length}
    users, ids, mask = requests(model, data, text, length, 1, device)

    def prefill(users=users, ids=ids, mask=mask):
        with torch.no_grad(), model.conditioned(users, ids, mask) as (embeds, m):
            return llm_step(model.llm, embeds, m, None)

    def generate(users=users, ids=ids, mask=mask):
        return model.generate(users, ids, mask, max_new_tokens=new_tokens, eos_token_id=None)

    with torch.no_grad(), model.conditioned(users, ids, mask) as (_, m):
        row["llm_input_tokens"] = int(m.sum())
    row["flops_prefill"] = count_flops(prefill)
    row["flops_generate"] = count_flops(generate)
    row["analytic"] = analytic_flops(model, n_events=length, prompt_tokens=int(mask.sum()), new_tokens=new_tokens)
    for b in batch_sizes:
        u, i, mk = requests(model, data, text, length, b, device)
        with PeakRSS(device) as mem:
            row[f"prefill_b{b}"] = timed(lambda: prefill(u, i, mk), repeats, device)
            row[f"generate_b{b}"] = timed(lambda: generate(u, i, mk), repeats, device)
        row[f"peak_mb_b{b}"] = mem.peak / 2**20
    return row


def measure_cache(model: UserLLM, data, text, length, batch_sizes, repeats, new_tokens, device, name) -> dict:
    """Generation with a warm UserContextCache vs uncached vs the plain backbone on the same prompt, run in
    turn ``repeats`` times; cached / backbone is the median of the per-repeat ratios."""
    row: dict = {"method": name, "history": length}
    plain = SimpleNamespace(llm=model.llm)  # the backbone alone: hooks are inactive outside a user context
    for b in batch_sizes:
        users, ids, mask = requests(model, data, text, length, b, device)
        cache = UserContextCache(model)
        one = [{k: v[r : r + 1] for k, v in users.items()} for r in range(b)]

        def cached():
            ctx = UserContext.stack([cache.get(str(r), one[r]) for r in range(b)])
            return model.generate(None, ids, mask, context=ctx, max_new_tokens=new_tokens, eos_token_id=None)

        def base():
            with torch.no_grad():
                return generate_tokens(plain, model.llm.get_input_embeddings()(ids), mask, max_new_tokens=new_tokens)

        def uncached():
            return model.generate(users, ids, mask, max_new_tokens=new_tokens, eos_token_id=None)

        t = timed_in_turn({"uncached": uncached, "cached": cached, "backbone": base}, repeats, device)
        for k, v in t.items():
            row[f"{k}_b{b}"] = v
        row[f"cached_over_backbone_b{b}"] = paired_ratio(t["cached"], t["backbone"])
        row[f"cache_stats_b{b}"] = dict(cache.stats)
    return row


def add_ratios(rows: list[dict]) -> None:
    """Each row's TP figure divided by its own, at the same history length (> 1: cheaper than TP)."""
    tp = {r["history"]: r for r in rows if r["method"] == "text_prompt"}
    for r in rows:
        base = tp.get(r["history"])
        if base is None:
            continue
        r["tp_over"] = {k: base[k] / r[k] for k in ("llm_input_tokens", "flops_prefill", "flops_generate")}
        for k in r:
            if k.startswith(("prefill_b", "generate_b")):
                r["tp_over"][k] = base[k]["median_s"] / r[k]["median_s"]


def markdown(report: dict) -> str:
    lines = [
        f"Backbone {report['backbone']}, {report['device']}, {report['new_tokens']} new tokens, median of "
        f"{report['repeats']} warm runs. `xTP` = TP's figure / this method's (higher = cheaper).",
        "",
        "| method | history | LLM input tokens | prefill GFLOPs | generate GFLOPs | analytic / counted | FLOPs xTP (prefill) | "
        + " | ".join(
            f"prefill b{b} ms | generate b{b} ms | xTP latency b{b} (prefill) | peak MB b{b}"
            for b in report["batch_sizes"]
        )
        + " |",
        "|" + "---|" * (7 + 4 * len(report["batch_sizes"])),
    ]
    for r in report["rows"]:
        an = f"{r['analytic']['prefill'] / r['flops_prefill']:.3f}" if r["analytic"] else "-"
        cells = [
            r["method"],
            str(r["history"]),
            str(r["llm_input_tokens"]),
            f"{r['flops_prefill'] / 1e9:.2f}",
            f"{r['flops_generate'] / 1e9:.2f}",
            an,
            f"{r['tp_over']['flops_prefill']:.1f}x",
        ]
        for b in report["batch_sizes"]:
            cells += [
                f"{r[f'prefill_b{b}']['median_s'] * 1e3:.0f} (p90 {r[f'prefill_b{b}']['p90_s'] * 1e3:.0f})",
                f"{r[f'generate_b{b}']['median_s'] * 1e3:.0f} (p90 {r[f'generate_b{b}']['p90_s'] * 1e3:.0f})",
                f"{r['tp_over'][f'prefill_b{b}']:.1f}x",
                f"{r[f'peak_mb_b{b}']:.0f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    if report["cache"]:
        lines += [
            "",
            f"Serving from a warm UserContextCache (generation of {report['new_tokens']} tokens, median ms; the three "
            f"run in turn {report['cache_repeats']} times, cached / backbone is the median "
            "of the per-run ratios):",
            "",
            "| method | history | batch | uncached | cached | plain backbone, same prompt | cached / backbone |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["cache"]:
            for b in report["batch_sizes"]:
                lines.append(
                    f"| {r['method']} | {r['history']} | {b} | {r[f'uncached_b{b}']['median_s'] * 1e3:.0f} | "
                    f"{r[f'cached_b{b}']['median_s'] * 1e3:.0f} | {r[f'backbone_b{b}']['median_s'] * 1e3:.0f} | "
                    f"{r[f'cached_over_backbone_b{b}']:.3f} |"
                )
    if report.get("prefix_cache"):
        from userllm.bench.prefix import rows_table

        lines += [
            "",
            "TP as deployed, each user's history prefix kept as KV cache (`userllm serve --cache-bytes`, as vLLM's "
            "prefix caching): a hit prefills only the question over the cached prefix, a miss the whole prompt; an "
            "appended event extends the prefix by its line while the window is not full, and shifts every line "
            f"(the whole prefix again) once it is. Median of {report['repeats']} warm runs, FLOPs analytic:",
            "",
            *rows_table(report["prefix_cache"]),
        ]
        hits = {r["history"]: r["hit_prefill_flops"] for r in report["prefix_cache"]}
        ours = [r for r in report["rows"] if r["method"] != "text_prompt" and r["history"] in hits]
        if ours:
            lines += [
                "",
                "Prefill FLOPs of each User-LLM request over the prefix-cached TP's on a hit (> 1: User-LLM costs "
                "more). User-LLM's figure also computes its user context, as on a miss of its own cache; TP's hit "
                "reuses a prefix that costs the bytes of the table above:",
                "",
                "| method | " + " | ".join(f"{h} events" for h in hits) + " |",
                "|---|" + "---|" * len(hits),
            ]
            for name in dict.fromkeys(r["method"] for r in ours):
                by = {r["history"]: r["flops_prefill"] for r in ours if r["method"] == name}
                lines.append(
                    f"| {name} | " + " | ".join(f"{by[h] / hits[h]:.2f}" if h in by else "-" for h in hits) + " |"
                )
    return "\n".join(lines) + "\n"
