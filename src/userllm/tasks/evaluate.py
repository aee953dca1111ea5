"""``userllm evaluate`` and ``userllm generate``: score a trained run on its task's test split.

===============  =========================================================================================
task             metrics (test split; all users, or a seeded subset of N users)
===============  =========================================================================================
next_item        Recall@{1,5,10} of the titles from a beam search constrained to the catalogue's titles
                 (token trie; beams = the largest K), a hit when the target's title is in the top K;
                 ``exact_match`` and ``valid_title``: unconstrained greedy generation equals the target's
                 title / equals some catalogue title
favorite_genre   accuracy of the top answer of a beam search constrained to the category vocabulary
review           ROUGE-1/2/Lsum F-measures of greedy generation against the user's review
===============  =========================================================================================

``metrics.json`` holds the metrics, ``llm_input_tokens`` (mean tokens the LLM reads per request, soft-prompt
embeddings included), a breakdown by history length, examples of predictions and the resolved config.
``--general`` adds the backbone's perplexity on a small general English text (shipped with userllm)
before and after fine-tuning.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from userllm.config import dump_config
from userllm.errors import InputError, OutputExistsError
from userllm.eval.metrics import accuracy, list_ranks, recall_at, rouge_scores
from userllm.io import write_json
from userllm.llm.backbone import load_backbone
from userllm.llm.decoding import TokenTrie, constrained_beam_search
from userllm.progress import progress_bar
from userllm.tasks.data import TaskData, TaskExample
from userllm.tasks.train import load_run

HISTORY_BUCKETS = (10, 25, 50, 100, 200)  # upper edges of the history-length buckets; the last is open
GENERAL_TEXT = "general_english.txt"


def eval_users(run_dir: Path, num_users: int, n: int, seed: int) -> list[int]:
    """A seeded subset of ``n`` user indices, saved as ``run_dir/eval_users-N-seedS.json`` (reruns reuse it).
    The choice depends only on the number of users, ``n`` and ``seed``: every run of a dataset scores the
    same users."""
    path = Path(run_dir) / f"eval_users-{n}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    users = sorted(np.random.default_rng(seed).choice(num_users, size=min(n, num_users), replace=False).tolist())
    write_json(path, users)
    return users


def history_bucket(length: int) -> str:
    low = 0
    for high in HISTORY_BUCKETS:
        if length <= high:
            return f"{low + 1}-{high}"
        low = high
    return f">{HISTORY_BUCKETS[-1]}"


@torch.no_grad()
def predict(model, data: TaskData, examples: list[TaskExample], cfg, device: str) -> list[dict]:
    """One record per example: the prediction(s) of the task, the truth and the LLM's input length."""
    tok, eos = data.tokenizer, data.tokenizer.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    vocab = data.answer_vocabulary()
    trie = None
    if data.task != "review":
        trie = TokenTrie([data.tokens(v) for v in vocab[2:]], eos_token_id=eos)  # answers: vocabulary index - 2
    beams = cfg.beams if data.task == "next_item" else min(3, len(vocab) - 2)
    records = []
    with progress_bar("examples") as progress:
        task = progress.add_task(f"evaluating {data.task}", total=len(examples))
        for c in range(0, len(examples), cfg.eval_batch_size):
            batch = examples[c : c + cfg.eval_batch_size]
            ids, mask, _ = data.batch(batch, with_answers=False, device=device)
            users = data.user_batch(batch, device) if cfg.method == "userllm" else None
            context = model.user_state(users) if users is not None else None  # once for both decodings
            ranked: list[list[str]] = [[] for _ in batch]
            with model.conditioned(users, ids, mask, context=context) as (embeds, prefix_mask):
                input_tokens = prefix_mask.sum(1).tolist()
                if trie is not None:
                    found = constrained_beam_search(model, embeds, prefix_mask, trie, beams=beams)
                    ranked = [[vocab[i + 2] for i, _ in row] for row in found]
            greedy = []
            if data.task != "favorite_genre":
                new = model.generate(users, ids, mask, context=context, max_new_tokens=cfg.max_new_tokens,
                                     eos_token_id=eos, pad_token_id=pad)  # fmt: skip
                greedy = [tok.decode([t for t in row if t not in (eos, pad)], skip_special_tokens=True).strip() for row in new.tolist()]
            for i, ex in enumerate(batch):
                records.append({"user_id": ex.user_id, "history_len": ex.history_len, "truth": ex.answer,
                                "ranked": ranked[i], "greedy": greedy[i] if greedy else None,
                                "llm_input_tokens": int(input_tokens[i])})  # fmt: skip
            progress.advance(task, len(batch))
    return records


def score(task: str, records: list[dict], catalogue: set[str], beams: int) -> dict[str, float]:
    if task == "review":
        return rouge_scores([r["greedy"] for r in records], [r["truth"] for r in records])
    ranks = list_ranks([r["ranked"] for r in records], [r["truth"] for r in records])
    if task == "favorite_genre":
        return {"accuracy": recall_at(ranks, 1)}
    out = {f"recall@{k}": recall_at(ranks, k) for k in (1, 5, 10) if k <= beams}
    out["exact_match"] = accuracy([r["greedy"] for r in records], [r["truth"] for r in records])
    out["valid_title"] = sum(r["greedy"] in catalogue for r in records) / max(1, len(records))
    return out


def label_prior(data: TaskData, users: list[int] | None, beams: int) -> dict[str, float]:
    """The task's metrics for answers that ignore the user, on the test examples of ``users`` (None: all):
    the train split's most frequent answers, most frequent first (next_item: popularity, the ``beams`` most
    frequent target titles; favorite_genre: always the most frequent genre), scored by :func:`score`.
    What a model learns first."""
    if data.task == "review":
        raise InputError("review has no label prior: every answer is free text")
    ranked = [answer for answer, _ in Counter(data.answers("train")).most_common(beams)]
    records = [{"ranked": ranked, "greedy": ranked[0], "truth": truth} for truth in data.answers("test", users)]
    return score(data.task, records, set(data.ds.item_titles[2:]), beams)


@torch.no_grad()
def perplexity(llm, tokenizer, text: str, *, chunk: int = 256, device: str = "cpu") -> float:
    """exp(mean next-token loss) of ``llm`` on ``text``, read in independent chunks of ``chunk`` tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    total, count = 0.0, 0
    for c in range(0, len(ids) - 1, chunk):
        piece = ids[c : c + chunk + 1][None].to(device)
        if piece.shape[1] < 2:
            break
        loss = llm(input_ids=piece, labels=piece).loss.item()
        total, count = total + loss * (piece.shape[1] - 1), count + piece.shape[1] - 1
    return math.exp(total / count)


def general_retention(cfg, model, device: str) -> dict[str, float]:
    """Perplexity of the base backbone and of the fine-tuned LLM (no user context) on the general text."""
    text = files("userllm.resources").joinpath(GENERAL_TEXT).read_text()
    base = load_backbone(cfg.llm.backbone)
    before = perplexity(base.model.to(device).eval(), base.tokenizer, text, device=device)
    after = perplexity(model.llm.eval(), base.tokenizer, text, device=device)
    return {"perplexity_before": before, "perplexity_after": after, "ratio": after / before}


def evaluate(run_dir: Path, *, users: int | None = None, seed: int = 0, general: bool = False,
             force: bool = False, device: str | None = None) -> dict:  # fmt: skip
    """Score ``run_dir`` on its task's test split; writes and returns ``metrics.json``."""
    run_dir = Path(run_dir)
    out = run_dir / "metrics.json"
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to score the run again")
    cfg, model, data = load_run(run_dir, device or "cpu")
    device = device or cfg.device
    model.to(device)
    subset = eval_users(run_dir, data.tl.num_users, users, seed) if users else None
    examples = data.examples("test", subset)
    records = predict(model, data, examples, cfg, device)
    catalogue = set(data.ds.item_titles[2:])
    beams = cfg.beams if cfg.task == "next_item" else 1
    buckets = {}
    for name in sorted({history_bucket(r["history_len"]) for r in records}, key=lambda b: int(b.strip(">").split("-")[0])):
        part = [r for r in records if history_bucket(r["history_len"]) == name]
        buckets[name] = {"examples": len(part), **score(cfg.task, part, catalogue, beams)}
    metrics = {
        "task": cfg.task, "method": cfg.method, "examples": len(records),
        "users": {"subset": users, "seed": seed} if users else "all",
        "metrics": score(cfg.task, records, catalogue, beams),
        "llm_input_tokens": float(np.mean([r["llm_input_tokens"] for r in records])),
        "by_history_length": buckets, "predictions": records[:10], "config": dump_config(cfg),
    }  # fmt: skip
    if general:
        metrics["general"] = general_retention(cfg, model, device)
    write_json(out, metrics)
    return metrics


@torch.no_grad()
def generate_for_user(run_dir: Path, user_id: str, instruction: str, *, max_new_tokens: int = 48) -> str:
    """A personalized answer of a trained run for one user of its dataset (history: their last events)."""
    cfg, model, data = load_run(run_dir)
    ids = data.ds.sequences.get_column("user_id").to_list()
    if user_id not in ids:
        raise InputError(f"user {user_id!r} is not in dataset {cfg.dataset} (user ids look like {ids[0]!r})")
    u = ids.index(user_id)
    end = int(data.tl.lengths[u])
    start = max(0, end - cfg.max_history)
    example = data.request(u, start, end, instruction, user_id)
    ids_t, mask, _ = data.batch([example], with_answers=False)
    users = data.user_batch([example]) if cfg.method == "userllm" else None
    eos = data.tokenizer.eos_token_id
    new = model.generate(users, ids_t, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos)
    return data.tokenizer.decode([t for t in new[0].tolist() if t != eos], skip_special_tokens=True).strip()
