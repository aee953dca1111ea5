"""``userllm evaluate`` and ``userllm generate``: score a trained run on its task's test split.

===============  =========================================================================================
task             metrics (test split; all users, or a seeded subset of N users)
===============  =========================================================================================
next_item        Recall@{1,5,10} of the titles from a beam search constrained to the catalogue's titles
                 (token trie; beams = the largest K), a hit when the target's title is in the top K; with
                 ``shortlist`` N, of the titles of the stage-1 encoder's top N items per user (the LLM
                 reranks the encoder's shortlist; the encoder alone ranks the same list), all N ranked
                 exactly by log p(title + eos);
                 ``exact_match`` and ``valid_title``: unconstrained greedy generation equals the target's
                 title / equals some catalogue title
favorite_genre   accuracy of the top answer of a beam search constrained to the category vocabulary
review           ROUGE-1/2/Lsum F-measures of greedy generation against the user's review
===============  =========================================================================================

Every metric is the mean over the test users (one example each) with its 95% bootstrap interval, seeded
(:func:`~userllm.metrics.estimate`): ``{"value", "low", "high"}``. Beside the run's own metrics,
``metrics.json`` holds reference rows on the same users (``references``): the label prior and, for
next_item, the stage-1 encoder alone (its own top-K items as titles: what the LLM is given to read) and,
with a shortlist, the shortlist in random order (its expected Recall@K: what a reranker that ignores the
user gets from the list alone); for review, the most common review of the train split.
``records.jsonl`` keeps every example's answers (:func:`rescore` scores a subset of users from it); while
scoring they are appended batch by batch to ``records.partial.jsonl``, so an interrupted scoring resumes
where it stopped (rerun the same command; see :func:`load_partial`). A finished scoring is carried on to
more users with ``--extend`` (its records kept, the other users scored; see :func:`finished_records`).
``metrics.json`` also holds ``llm_input_tokens`` (mean tokens the LLM reads per request, soft-prompt
embeddings included), a breakdown by history length, examples of predictions and the resolved config.
``--general`` adds the backbone's perplexity on a small general English text (shipped with userllm)
before and after fine-tuning.
"""

from __future__ import annotations

import json
import math
import shutil
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from userllm.config import TrainConfig, dump_config, with_overrides
from userllm.errors import InputError, OutputExistsError
from userllm.io import sha256, write_json, write_text_atomically
from userllm.llm.backbone import load_backbone
from userllm.llm.budget import batch_for
from userllm.llm.decoding import constrained_beam_search, generate_tokens, prefill, rank_sequences
from userllm.memory import memory_budget
from userllm.precision import autocast
from userllm.progress import progress_bar
from userllm.tasks.data import TaskData, TaskExample
from userllm.tasks.pipeline import Pipeline, answer_space, answer_trie, shortlists, stage1_encoder
from userllm.tasks.records import RECORDS, finished_records, load_partial
from userllm.tasks.scoring import history_bucket, references, score

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


def scoring_order(examples: list[TaskExample]) -> list[TaskExample]:
    """Longest prompts first, the order :func:`predict` scores in: a batch pads to its longest prompt (TP's: up
    to ~4,300 tokens at 200 events), so prompts of like length are batched together."""
    return sorted(examples, key=lambda ex: (-len(ex.prompt), -ex.history_len))


def scoring_id(run_dir: Path, scoring: str = "") -> str:
    """What makes two scorings of ``run_dir`` the same: its trained model (the sha256 of ``summary.json``) plus
    ``scoring`` (e.g. the shortlist and the precision). Partial records and ``metrics.json`` carry it."""
    return sha256(Path(run_dir) / "summary.json") + scoring


def scoring(cfg: TrainConfig) -> str:
    """How a run is scored, as :func:`scoring_id` appends it: next_item's shortlist and the precision (e.g.
    ``+shortlist20+bf16``)."""
    listed = f"+shortlist{cfg.shortlist}" if cfg.task == "next_item" and cfg.shortlist else ""
    return listed + ("+bf16" if cfg.bf16 else "")


def extendable(run_dir: Path, **overrides) -> None:
    """Refuses to extend ``run_dir``'s scoring (``evaluate(..., extend=True)``) unless ``metrics.json`` was
    scored by the same trained model and scoring as the run's config with ``overrides`` (:func:`scoring_id`);
    checked before the model loads."""
    out = Path(run_dir) / "metrics.json"
    if not out.exists():
        raise InputError(f"{run_dir}: nothing to extend (no metrics.json); score it without --extend")
    cfg = with_overrides(TrainConfig.from_saved(json.loads((Path(run_dir) / "config.json").read_text())), **overrides)
    if json.loads(out.read_text()).get("scoring_id") != scoring_id(run_dir, scoring(cfg)):
        raise InputError(
            f"{out}: scored by another trained model or scoring (shortlist, precision), or before "
            "userllm recorded which; score every user again with --force instead of --extend"
        )


@torch.no_grad()
def predict(
    model,
    data: TaskData,
    examples: list[TaskExample],
    cfg,
    device: str,
    partial: Path | None = None,
    done: dict[str, dict] | None = None,
    shortlist: dict[str, list[int]] | None = None,
) -> list[dict]:
    """One record per example: the prediction(s) of the task, the truth and the LLM's input length. With
    ``partial``, each batch's records are appended to that file as they are made, and the examples of users
    in ``done`` (records read back from it, see :func:`load_partial`) are not scored again. With
    ``shortlist`` ({user_id: item indices}) next_item ranks only each user's shortlisted titles: all of them
    exactly by log p(title + eos) (:func:`rank_sequences`; each record keeps every title's
    ``[title, log p, tokens]`` as ``shortlist_scores``)."""
    done = done or {}
    todo = scoring_order([ex for ex in examples if ex.user_id not in done])
    tok, eos = data.tokenizer, data.tokenizer.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    vocab = data.answer_vocabulary()
    trie = None
    if data.task != "review":
        trie = answer_trie(data)
    beams = cfg.beams if data.task == "next_item" else min(3, len(vocab) - 2)
    records = []
    amp = autocast(cfg.bf16, device)  # re-entered for each part of each batch
    # the KV caches a batch holds at once: the beams and the greedy answer, after a prefill kept twice
    copies = (beams if trie is not None and not (shortlist and data.task == "next_item") else 0) + 2
    budget = memory_budget(cfg.max_memory_gb)[0]
    resumed = f" ({len(examples) - len(todo)} resumed)" if len(todo) < len(examples) else ""
    with progress_bar("examples") as progress:
        task = progress.add_task(f"evaluating {data.task}{resumed}", total=len(todo))
        c = 0
        while c < len(todo):  # longest prompts first: each batch as large as eval_batch_size and the memory allow
            size = batch_for(model, len(data.tokens(todo[c].prompt)), budget, copies, cfg.eval_batch_size)
            batch, c = todo[c : c + size], c + size
            ids, mask, _ = data.batch(batch, with_answers=False, device=device)
            users = data.user_batch(batch, device) if cfg.method == "userllm" else None
            with amp:
                context = model.user_state(users) if users is not None else None  # once for both decodings
            ranked: list[list[str]] = [[] for _ in batch]
            greedy, scores = [], None
            with amp, model.conditioned(users, ids, mask, context=context) as (embeds, prefix_mask):
                input_tokens = prefix_mask.sum(1).tolist()
                # the prompt is run once for both decodings (TP's next_item prompts: ~20% of its scoring time)
                rank, write = trie is not None, data.task != "favorite_genre"
                prefixes = prefill(model, embeds, prefix_mask, copies=rank + write)
                if write:  # greedy first: the beam search repeats the user context for its beams
                    new = generate_tokens(
                        model,
                        embeds,
                        prefix_mask,
                        max_new_tokens=cfg.max_new_tokens,
                        eos_token_id=eos,
                        pad_token_id=pad,
                        prefilled=prefixes.pop(),
                    )
                    greedy = [
                        tok.decode([t for t in row if t not in (eos, pad)], skip_special_tokens=True).strip()
                        for row in new.tolist()
                    ]
                if rank:
                    tries, names = answer_space(data, trie, batch, shortlist)
                    if shortlist is not None:
                        sequences = [t.sequences for t in tries]
                        found = rank_sequences(
                            model, embeds, prefix_mask, sequences, eos_token_id=eos, prefilled=prefixes.pop()
                        )
                        tokens = [[len(s) + 1 for s in row] for row in sequences]  # each title's tokens + eos
                        # every title's [title, log p(title + eos), tokens], best first
                        scores = [
                            [[names[r][i], round(lp, 4), tokens[r][i]] for i, lp in row] for r, row in enumerate(found)
                        ]
                    else:
                        found = constrained_beam_search(
                            model, embeds, prefix_mask, tries, beams=beams, prefilled=prefixes.pop()
                        )
                    ranked = [[names[r][i] for i, _ in row[:beams]] for r, row in enumerate(found)]
            scored = [
                {
                    "user_id": ex.user_id,
                    "history_len": ex.history_len,
                    "truth": ex.answer,
                    "ranked": ranked[i],
                    "greedy": greedy[i] if greedy else None,
                    "llm_input_tokens": int(input_tokens[i]),
                }
                for i, ex in enumerate(batch)
            ]
            for record, row in zip(scored, scores or []):
                record["shortlist_scores"] = row
            if partial is not None:
                with open(partial, "a") as f:
                    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored))
            records += scored
            progress.advance(task, len(batch))
    by_user = {**done, **{r["user_id"]: r for r in records}}
    return [by_user[ex.user_id] for ex in examples]


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


def evaluate(
    run_dir: Path,
    *,
    users: int | None = None,
    seed: int = 0,
    general: bool = False,
    force: bool = False,
    device: str | None = None,
    shortlist: int | None = None,
    bf16: bool | None = None,
    extend: bool = False,
    shuffle_history: int | None = None,
    max_memory_gb: float | None = None,
) -> dict:
    """Score ``run_dir`` on its task's test split; writes and returns ``metrics.json``. ``shortlist``
    overrides the run's (next_item); ``bf16`` scores under bf16 autocast (default: as the run trained), with
    log-probabilities moved by bf16's rounding; faster or slower than float32 depending on the CPU (README). ``extend``
    keeps the records of the run's finished scoring (the same model and scoring, :func:`finished_records`) and
    scores only the users they lack, e.g. to carry a seeded subset on to every user; metrics.json is rewritten
    over all. ``shuffle_history`` (a seed): every test user's history window in a random order (the same
    events, :meth:`~userllm.tasks.data.TaskData.window_rows`), scored into ``RUN/shuffled-SEED/`` (its own
    metrics.json, records.jsonl and the run's config.json), so that ``userllm compare RUN RUN/shuffled-SEED``
    pairs the ordered history against the shuffled one per user."""
    run_dir = Path(run_dir)
    target = run_dir if shuffle_history is None else run_dir / f"shuffled-{shuffle_history}"
    if shuffle_history is not None and extend:
        raise InputError("--extend carries a scoring on to more users; score the shuffled history with --force")
    out = target / "metrics.json"
    if out.exists() and not (force or extend):
        raise OutputExistsError(f"{out} already exists; pass --force to score the run again (or --extend to add users)")
    overrides = dict(shortlist=shortlist, bf16=bf16)
    if extend:
        extendable(run_dir, **overrides)
    run = Pipeline.from_pretrained(run_dir, device=device or "cpu")
    cfg, model, data = with_overrides(run.cfg, **overrides, max_memory_gb=max_memory_gb), run.model, run.data
    device = device or cfg.device
    model.to(device)
    subset = eval_users(run_dir, data.tl.num_users, users, seed) if users else None
    data.shuffle_seed = shuffle_history
    examples = data.examples("test", subset)
    if shuffle_history is not None:
        target.mkdir(exist_ok=True)
        shutil.copyfile(run_dir / "config.json", target / "config.json")
    encoder = stage1_encoder(cfg, data) if cfg.task == "next_item" else None  # loaded once: shortlist and reference
    listed = shortlists(cfg, data, examples, encoder)
    # an interrupted scoring of this model (and shortlist) resumes
    model_id = scoring_id(run_dir, scoring(cfg) + ("" if shuffle_history is None else f"+shuffled{shuffle_history}"))
    partial, done = load_partial(target, model_id)
    if extend:
        done = {**finished_records(run_dir, {ex.user_id for ex in examples}), **done}
    records = predict(model, data, examples, cfg, device, partial, done, listed)
    catalogue = set(data.ds.item_titles[2:])
    beams = cfg.beams if cfg.task == "next_item" else 1
    buckets = {}
    for name in sorted(
        {history_bucket(r["history_len"]) for r in records}, key=lambda b: int(b.strip(">").split("-")[0])
    ):
        part = [r for r in records if history_bucket(r["history_len"]) == name]
        buckets[name] = {"examples": len(part), **score(cfg.task, part, catalogue, beams, seed)}
    metrics = {
        "task": cfg.task,
        "method": cfg.method,
        "examples": len(records),
        "precision": "bf16" if cfg.bf16 else "fp32",
        "users": {"subset": users, "seed": seed} if users else "all",
        "shuffled_history": shuffle_history,
        "scoring_id": model_id,
        "metrics": score(cfg.task, records, catalogue, beams, seed),
        "references": references(cfg, data, examples, subset, seed, records, encoder, listed),
        "llm_input_tokens": float(np.mean([r["llm_input_tokens"] for r in records])),
        "by_history_length": buckets,
        "predictions": records[:10],
        "config": dump_config(cfg),
    }
    if general:
        metrics["general"] = general_retention(cfg, model, device)
    write_text_atomically(target / RECORDS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_json(out, metrics)
    partial.unlink()
    return metrics
