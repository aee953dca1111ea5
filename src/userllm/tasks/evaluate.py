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
from collections import Counter
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from userllm.config import TrainConfig, dump_config, with_overrides
from userllm.data.dataset import PreparedDataset
from userllm.errors import InputError, OutputExistsError
from userllm.metrics import estimate, list_ranks, paired_estimate, random_order_recall, recall_values, rouge_per_example
from userllm.io import sha256, write_json, write_text_atomically
from userllm.llm.backbone import load_backbone
from userllm.llm.decoding import constrained_beam_search, generate_tokens, prefill, rank_sequences
from userllm.precision import autocast
from userllm.progress import progress_bar
from userllm.tasks.data import TaskData, TaskExample
from userllm.tasks.pipeline import Pipeline, answer_space, answer_trie, shortlist_titles, shortlists, stage1_encoder

HISTORY_BUCKETS = (10, 25, 50, 100, 200)  # upper edges of the history-length buckets; the last is open
GENERAL_TEXT = "general_english.txt"
RECORDS = "records.jsonl"  # one line per scored test example: user_id, history_len, truth, ranked, greedy
PARTIAL = "records.partial.jsonl"  # the records of an unfinished scoring, appended batch by batch (resumed)


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


def history_bucket(length: int) -> str:
    low = 0
    for high in HISTORY_BUCKETS:
        if length <= high:
            return f"{low + 1}-{high}"
        low = high
    return f">{HISTORY_BUCKETS[-1]}"


def recorded_shortlist(record: dict) -> list[str] | None:
    """The whole shortlist a next_item record's run ranked, in the run's order (its ``shortlist_scores``);
    None for a record scored without them (a beam search keeps only its top titles)."""
    return [t for t, *_ in record["shortlist_scores"]] if "shortlist_scores" in record else None


def scoring_id(run_dir: Path, scoring: str = "") -> str:
    """What makes two scorings of ``run_dir`` the same: its trained model (the sha256 of ``summary.json``) plus
    ``scoring`` (e.g. the shortlist and the precision). Partial records and ``metrics.json`` carry it."""
    return sha256(Path(run_dir) / "summary.json") + scoring


def load_partial(run_dir: Path, model_id: str) -> tuple[Path, dict[str, dict]]:
    """The partial records file of ``run_dir`` and the records it holds by user id: those of an interrupted
    scoring of the same trained model and scoring (its first line names them, :func:`scoring_id`; a file from
    an earlier training or another scoring is discarded)."""
    path = Path(run_dir) / PARTIAL
    done: dict[str, dict] = {}
    if path.exists():
        lines = path.read_text().splitlines()
        if lines and json.loads(lines[0]).get("model") == model_id:
            for line in lines[1:]:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # the line a kill cut short: scored again
                    continue
                done[r["user_id"]] = r
    if not done:
        path.write_text(json.dumps({"model": model_id}) + "\n")
    return path, done


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
        raise InputError(f"{out}: scored by another trained model or scoring (shortlist, precision), or before "
                         "userllm recorded which; score every user again with --force instead of --extend")  # fmt: skip


def finished_records(run_dir: Path, wanted: set[str]) -> dict[str, dict]:
    """The records of ``run_dir``'s finished scoring by user id (checked :func:`extendable`), to be kept by a
    scoring that extends it to more users (``evaluate(..., extend=True)``), only if every user it holds is in
    ``wanted``."""
    records = {r["user_id"]: r for r in read_records(run_dir)}
    if outside := set(records) - wanted:
        raise InputError(f"{run_dir}/{RECORDS}: {len(outside)} scored users are not in the users asked for; "
                         "--extend only adds users (score a smaller set with --force)")  # fmt: skip
    return records


@torch.no_grad()
def predict(model, data: TaskData, examples: list[TaskExample], cfg, device: str, partial: Path | None = None,
            done: dict[str, dict] | None = None, shortlist: dict[str, list[int]] | None = None) -> list[dict]:  # fmt: skip
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
    resumed = f" ({len(examples) - len(todo)} resumed)" if len(todo) < len(examples) else ""
    with progress_bar("examples") as progress:
        task = progress.add_task(f"evaluating {data.task}{resumed}", total=len(todo))
        for c in range(0, len(todo), cfg.eval_batch_size):
            batch = todo[c : c + cfg.eval_batch_size]
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
                    new = generate_tokens(model, embeds, prefix_mask, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                                          pad_token_id=pad, prefilled=prefixes.pop())  # fmt: skip
                    greedy = [tok.decode([t for t in row if t not in (eos, pad)], skip_special_tokens=True).strip()
                              for row in new.tolist()]  # fmt: skip
                if rank:
                    tries, names = answer_space(data, trie, batch, shortlist)
                    if shortlist is not None:
                        sequences = [t.sequences for t in tries]
                        found = rank_sequences(model, embeds, prefix_mask, sequences, eos_token_id=eos, prefilled=prefixes.pop())
                        tokens = [[len(s) + 1 for s in row] for row in sequences]  # each title's tokens + eos
                        # every title's [title, log p(title + eos), tokens], best first
                        scores = [[[names[r][i], round(lp, 4), tokens[r][i]] for i, lp in row] for r, row in enumerate(found)]
                    else:
                        found = constrained_beam_search(model, embeds, prefix_mask, tries, beams=beams, prefilled=prefixes.pop())
                    ranked = [[names[r][i] for i, _ in row[:beams]] for r, row in enumerate(found)]
            scored = [{"user_id": ex.user_id, "history_len": ex.history_len, "truth": ex.answer, "ranked": ranked[i],
                       "greedy": greedy[i] if greedy else None, "llm_input_tokens": int(input_tokens[i])}
                      for i, ex in enumerate(batch)]  # fmt: skip
            for record, row in zip(scored, scores or []):
                record["shortlist_scores"] = row
            if partial is not None:
                with open(partial, "a") as f:
                    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored))
            records += scored
            progress.advance(task, len(batch))
    by_user = {**done, **{r["user_id"]: r for r in records}}
    return [by_user[ex.user_id] for ex in examples]


def per_example(task: str, records: list[dict], catalogue: set[str], beams: int) -> dict[str, list[float]]:
    """Each metric of the task, per record (see the module table); records without a greedy answer (reference
    rows) have no exact_match / valid_title."""
    if task == "review":
        return rouge_per_example([r["greedy"] for r in records], [r["truth"] for r in records])
    ranks = list_ranks([r["ranked"] for r in records], [r["truth"] for r in records])
    if task == "favorite_genre":
        return {"accuracy": recall_values(ranks, 1).tolist()}
    out = {f"recall@{k}": recall_values(ranks, k).tolist() for k in (1, 5, 10) if k <= beams}
    if all(r.get("greedy") is not None for r in records):
        out["exact_match"] = [float(r["greedy"] == r["truth"]) for r in records]
        out["valid_title"] = [float(r["greedy"] in catalogue) for r in records]
    return out


def score(task: str, records: list[dict], catalogue: set[str], beams: int, seed: int = 0) -> dict[str, dict]:
    """``{metric: {"value", "low", "high"}}``: mean over the records and 95% bootstrap interval (seeded)."""
    return {name: estimate(v, seed=seed) for name, v in per_example(task, records, catalogue, beams).items()}


def review_key(text: str) -> str:
    """A review as ROUGE sees it: lowercased, whitespace collapsed, end punctuation dropped."""
    return " ".join(text.lower().split()).strip(".!?,;: ")


def label_prior(data: TaskData, users: list[int] | None, beams: int, seed: int = 0) -> dict[str, dict]:
    """The task's metrics for answers that ignore the user, on the test examples of ``users`` (None: all):
    the train split's most frequent answers, most frequent first (next_item: popularity, the ``beams`` most
    frequent target titles; favorite_genre: always the most frequent genre; review: the most common review,
    compared as :func:`review_key` writes it), scored by :func:`score`. What a model learns first."""
    answers = data.answers("train")
    if data.task == "review":
        answers = [review_key(a) for a in answers]
    ranked = [answer for answer, _ in Counter(answers).most_common(beams)]
    records = [{"ranked": ranked, "greedy": ranked[0], "truth": truth} for truth in data.answers("test", users)]
    return score(data.task, records, set(data.ds.item_titles[2:]), beams, seed)


def encoder_records(encoder, data: TaskData, examples: list[TaskExample], beams: int) -> list[dict]:
    """next_item as the stage-1 encoder answers it: per example the titles of its ``beams`` highest-scoring
    items (:meth:`TaskData.encoder_top`) and the truth."""
    top = data.encoder_top(encoder, examples, beams)
    return [{"user_id": ex.user_id, "ranked": [data.ds.item_titles[i] for i in row], "truth": ex.answer}
            for row, ex in zip(top, examples)]  # fmt: skip


def random_order(lists: list[list[str]], truths: list[str], beams: int) -> dict[str, list[float]]:
    """next_item's Recall@{1,5,10} (those <= ``beams``) of each shortlist of distinct titles in uniformly random
    order, expected (:func:`~userllm.metrics.random_order_recall`), per example: what a reranker that
    ignores the user gets from the list alone."""
    return {f"recall@{k}": random_order_recall(lists, truths, k).tolist() for k in (1, 5, 10) if k <= beams}


def references(cfg, data: TaskData, examples: list[TaskExample], users: list[int] | None, seed: int,
               records: list[dict] | None = None, encoder=None, shortlist: dict[str, list[int]] | None = None
               ) -> dict[str, dict]:  # fmt: skip
    """The reference rows of a run's table on the same test users: ``label prior`` (review: ``most common
    review``) and, for next_item, ``encoder alone`` (``encoder``: the run's stage-1 encoder,
    :func:`stage1_encoder`, None without one; each of ``records``, the run's own, gets the encoder's answers
    as ``encoder_ranked``, for paired differences) and with ``shortlist`` ({user_id: item indices},
    :func:`shortlists`) ``shortlist in random order`` (:func:`random_order`)."""
    out = {}
    out["most common review" if data.task == "review" else "label prior"] = label_prior(
        data, users, cfg.beams if data.task == "next_item" else 1, seed)
    if encoder is not None and data.task == "next_item":
        alone = encoder_records(encoder, data, examples, cfg.beams)
        out["encoder alone"] = score("next_item", alone, set(), cfg.beams, seed)
        by_user = {r["user_id"]: r["ranked"] for r in alone}
        for r in records or []:
            r["encoder_ranked"] = by_user[r["user_id"]]
    if shortlist is not None and data.task == "next_item":
        lists = [shortlist_titles(data.ds.item_titles, shortlist[ex.user_id]) for ex in examples]
        values = random_order(lists, [ex.answer for ex in examples], cfg.beams)
        out["shortlist in random order"] = {m: estimate(v, seed=seed) for m, v in values.items()}
    return out


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
             force: bool = False, device: str | None = None, shortlist: int | None = None,
             bf16: bool | None = None, extend: bool = False) -> dict:  # fmt: skip
    """Score ``run_dir`` on its task's test split; writes and returns ``metrics.json``. ``shortlist``
    overrides the run's (next_item); ``bf16`` scores under bf16 autocast (default: as the run trained), with
    log-probabilities moved by bf16's rounding; faster or slower than float32 depending on the CPU (README). ``extend``
    keeps the records of the run's finished scoring (the same model and scoring, :func:`finished_records`) and
    scores only the users they lack, e.g. to carry a seeded subset on to every user; metrics.json is rewritten
    over all."""
    run_dir = Path(run_dir)
    out = run_dir / "metrics.json"
    if out.exists() and not (force or extend):
        raise OutputExistsError(f"{out} already exists; pass --force to score the run again (or --extend to add users)")
    overrides = dict(shortlist=shortlist, bf16=bf16)
    if extend:
        extendable(run_dir, **overrides)
    run = Pipeline.from_pretrained(run_dir, device=device or "cpu")
    cfg, model, data = with_overrides(run.cfg, **overrides), run.model, run.data
    device = device or cfg.device
    model.to(device)
    subset = eval_users(run_dir, data.tl.num_users, users, seed) if users else None
    examples = data.examples("test", subset)
    encoder = stage1_encoder(cfg, data) if cfg.task == "next_item" else None  # loaded once: shortlist and reference
    listed = shortlists(cfg, data, examples, encoder)
    # an interrupted scoring of this model (and shortlist) resumes
    model_id = scoring_id(run_dir, scoring(cfg))
    partial, done = load_partial(run_dir, model_id)
    if extend:
        done = {**finished_records(run_dir, {ex.user_id for ex in examples}), **done}
    records = predict(model, data, examples, cfg, device, partial, done, listed)
    catalogue = set(data.ds.item_titles[2:])
    beams = cfg.beams if cfg.task == "next_item" else 1
    buckets = {}
    for name in sorted({history_bucket(r["history_len"]) for r in records}, key=lambda b: int(b.strip(">").split("-")[0])):
        part = [r for r in records if history_bucket(r["history_len"]) == name]
        buckets[name] = {"examples": len(part), **score(cfg.task, part, catalogue, beams, seed)}
    metrics = {
        "task": cfg.task, "method": cfg.method, "examples": len(records), "precision": "bf16" if cfg.bf16 else "fp32",
        "users": {"subset": users, "seed": seed} if users else "all", "scoring_id": model_id,
        "metrics": score(cfg.task, records, catalogue, beams, seed),
        "references": references(cfg, data, examples, subset, seed, records, encoder, listed),
        "llm_input_tokens": float(np.mean([r["llm_input_tokens"] for r in records])),
        "by_history_length": buckets, "predictions": records[:10], "config": dump_config(cfg),
    }  # fmt: skip
    if general:
        metrics["general"] = general_retention(cfg, model, device)
    write_text_atomically(run_dir / RECORDS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_json(out, metrics)
    partial.unlink()
    return metrics


def scored_users(run_dir: Path) -> set[str]:
    """The user ids a scored run's ``records.jsonl`` holds."""
    return {json.loads(line)["user_id"] for line in (Path(run_dir) / RECORDS).read_text().splitlines()}


def rescore(run_dir: Path, user_ids: set[str], seed: int = 0) -> dict[str, dict]:
    """A scored run's metrics on some of its test users only (from ``records.jsonl``), e.g. the users another
    run was scored on, so that both are compared on the same users."""
    records = read_records(run_dir, user_ids)
    if len({r["user_id"] for r in records}) != len(user_ids):
        raise InputError(f"{run_dir}: scored {len(records)} of the {len(user_ids)} users asked for")
    task, catalogue, beams = saved_scoring(run_dir)
    return score(task, records, catalogue, beams, seed)


def saved_scoring(run_dir: Path) -> tuple[str, set[str], int]:
    """What :func:`score` needs of a scored run, from its saved config: the task, the catalogue's titles
    (next_item) and the ranked answers' depth (``beams``; 1 for favorite_genre)."""
    cfg = json.loads((Path(run_dir) / "config.json").read_text())
    if cfg["task"] != "next_item":
        return cfg["task"], set(), 1
    return cfg["task"], set(PreparedDataset(cfg["dataset"]).item_titles[2:]), cfg["beams"]


def read_records(run_dir: Path, user_ids: set[str] | None = None) -> list[dict]:
    """A scored run's ``records.jsonl`` (of ``user_ids`` only, when given)."""
    path = Path(run_dir) / RECORDS
    if not path.exists():
        raise InputError(f"{run_dir} has no {RECORDS} (scored before userllm kept them): score it again with --force")
    records = list(map(json.loads, path.read_text().splitlines()))
    return records if user_ids is None else [r for r in records if r["user_id"] in user_ids]


def answer_summary(run_dir: Path, user_ids: set[str] | None = None) -> str:
    """How varied a scored run's answers are (its top answer per user: the greedy text, else the first
    ranked one): ``"N distinct; top 'X' P%"``. A model that writes one answer for everyone shows it here,
    whatever its metrics; '-' without records."""
    try:
        records = read_records(run_dir, user_ids)
    except InputError:
        return "-"
    answers = Counter(r["greedy"] if r.get("greedy") is not None else (r["ranked"] or [""])[0] for r in records)
    if not answers:
        return "-"
    top, n = answers.most_common(1)[0]
    return f"{len(answers)} distinct; top '{top[:40]}' {n / len(records):.0%}"


def paired_difference(run_a: Path | list[Path], run_b: Path | list[Path], seed: int = 0) -> tuple[int, dict[str, dict]]:
    """Run A minus run B on the test users both were scored on: the number of users and, per metric, the mean
    per-user difference with its 95% bootstrap interval (users resampled with both runs' answers together,
    so the interval is that of the difference itself, narrower than two separate intervals suggest).

    Either side may be several runs of one recipe (e.g. its training seeds): each user's metric is then the
    mean over that side's runs, over the users all runs were scored on, and the interval also resamples the
    runs (:func:`~userllm.metrics.paired_estimate`), so it includes the spread between training runs that
    a single pair of runs cannot show."""
    sides = [[Path(r) for r in ([run] if isinstance(run, (str, Path)) else run)] for run in (run_a, run_b)]
    if not all(sides):
        raise InputError("compare needs at least one run on each side")
    records = [[{r["user_id"]: r for r in read_records(run)} for run in side] for side in sides]
    tasks = {json.loads((r / "config.json").read_text())["task"] for side in sides for r in side}
    if len(tasks) > 1:
        raise InputError(f"the runs compared are of different tasks ({sorted(tasks)}): compare runs of one task")
    users = sorted(set.intersection(*(set(recs) for side in records for recs in side)))
    if not users:
        raise InputError(f"{' / '.join(str(r) for side in sides for r in side)} were scored on no common test user")
    return len(users), _paired(sides[0][0], *([[recs[u] for u in users] for recs in side] for side in records), seed)


def paired_vs_encoder(run: Path, seed: int = 0) -> tuple[int, dict[str, dict]]:
    """A next_item run minus the stage-1 encoder alone (its own top titles, kept in the run's records as
    ``encoder_ranked``), per user, over the run's users: does the LLM rank better than the encoder it read?"""
    records = [r for r in read_records(run) if r.get("encoder_ranked") is not None]
    if not records:
        raise InputError(f"{run}: its records hold no encoder answers (no stage-1 encoder, or scored before "
                         "userllm kept them): score it again with --force")  # fmt: skip
    alone = [{"ranked": r["encoder_ranked"], "truth": r["truth"]} for r in records]
    return len(records), _paired(run, [records], [alone], seed)


def paired_vs_random_order(run: Path, seed: int = 0) -> tuple[int, dict[str, dict]]:
    """A next_item run minus its shortlist in random order (:func:`random_order`, from the whole list its
    records keep as ``shortlist_scores``), per user, over the run's users: does the LLM's order of the list
    find the next item more often than no order at all?"""
    records = [r for r in read_records(run) if recorded_shortlist(r) is not None]
    if not records:
        raise InputError(f"{run}: its records hold no whole shortlist (shortlist_scores: a next_item run scored "
                         "with a shortlist); score it so, with --force")  # fmt: skip
    lists = [recorded_shortlist(r) for r in records]
    beams = json.loads((Path(run) / "config.json").read_text())["beams"]
    return len(records), _paired_values([per_example("next_item", records, set(), beams)],
                                        [random_order(lists, [r["truth"] for r in records], beams)], seed)  # fmt: skip


def _paired(run: Path, a: list[list[dict]], b: list[list[dict]], seed: int) -> dict[str, dict]:
    """Per metric (both sides' records have), the mean per-user difference a - b with its bootstrap interval;
    ``a`` and ``b`` hold one record list per run, each over the same users in the same order."""
    task, catalogue, beams = saved_scoring(run)
    va, vb = ([per_example(task, recs, catalogue, beams) for recs in side] for side in (a, b))
    return _paired_values(va, vb, seed)


def _paired_values(va: list[dict[str, list[float]]], vb: list[dict[str, list[float]]], seed: int) -> dict[str, dict]:
    """Per metric both sides have, :func:`~userllm.metrics.paired_estimate` of the per-example values of
    ``va`` minus ``vb`` (one {metric: values} per run, each over the same users in the same order)."""
    return {m: paired_estimate([v[m] for v in va], [v[m] for v in vb], seed=seed)
            for m in va[0] if all(m in v for v in va + vb)}  # fmt: skip


