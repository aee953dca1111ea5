"""Task construction, the title trie, TP serialization, and a tiny end-to-end train + evaluate per method."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import polars as pl
import pytest
import torch

import userllm
from tests.conftest import write
from userllm.config import PrepareConfig, TrainConfig, UserLLMConfig
from userllm.data.dataset import PreparedDataset
from userllm.data.prepare import prepare_dataset
from userllm.encoder.pretrained import load_encoder
from userllm.errors import EmptyResultError, InputError, OutputExistsError
from userllm.io import sha256
from userllm.llm.backbone import load_backbone
from userllm.llm.decoding import TokenTrie, constrained_beam_search, rank_sequences
from userllm.llm.textprompt import TextPromptLM
from userllm.tasks import prompts
from userllm.tasks.data import IGNORE, TaskData
from userllm.tasks.evaluate import eval_users, evaluate
from userllm.tasks.pipeline import Pipeline
from userllm.tasks.records import read_records
from userllm.tasks.train import train


@pytest.fixture(scope="module")
def backbone(text_lm_dir):
    return load_backbone(str(text_lm_dir))


def task_data(ds, backbone, task, method="userllm", max_history=5):
    return TaskData(ds, backbone.tokenizer, task=task, method=method, max_history=max_history)


def test_next_item_examples_and_labels(synthetic_ds, backbone):
    data = task_data(synthetic_ds, backbone, "next_item")
    ex = data.examples("test")
    assert len(ex) == synthetic_ds.sequences.height
    e = ex[0]
    seq = synthetic_ds.sequences.row(e.user_idx, named=True)
    assert e.end == seq["length"] - 1 and e.start == max(0, e.end - 5)
    assert e.answer == synthetic_ds.item_titles[seq["item_idx"][-1]]
    assert "history" not in e.prompt  # User-LLM: the instruction only
    ids, mask, labels = data.batch(ex[:3], with_answers=True)
    for r in range(3):  # labels score exactly the answer tokens + eos, at the end of the row
        answer = data.answer_tokens(ex[r].answer)
        scored = labels[r][labels[r] != IGNORE].tolist()
        assert scored == answer and ids[r, -len(answer) :].tolist() == answer
        assert mask[r].sum() == len(data.tokens(ex[r].prompt)) + len(answer)
    assert (mask[:, -1] == 1).all()  # left padding


def test_favorite_genre_is_most_frequent_then_most_recent(synthetic_ds, backbone):
    data = task_data(synthetic_ds, backbone, "favorite_genre", max_history=6)
    cats = synthetic_ds.item_categories
    for e in data.examples("test")[:10]:
        rows = data.tl.offsets[e.user_idx] + range(e.start, e.end)
        counts, last = Counter(), {}
        for pos, item in enumerate(data.tl.item[rows]):
            for c in cats[item]:
                counts[c] += 1
                last[c] = pos
        best = max(counts, key=lambda c: (counts[c], last[c], -c))
        assert e.label == best and e.answer == synthetic_ds.vocab["category"][best]


def test_review_examples_and_refusal_without_reviews(synthetic_ds, backbone, tmp_path):
    data = task_data(synthetic_ds, backbone, "review")
    e = data.examples("test")[0]
    title = synthetic_ds.item_titles[e.label]
    assert (
        f'"{title}"' in e.prompt and e.answer and e.answer in synthetic_ds.examples.get_column("review_text").to_list()
    )
    no_reviews = synthetic_ds.examples.with_columns(review_text=pl.lit(None, dtype=pl.String))
    data.ds.__dict__["examples"] = no_reviews
    try:
        with pytest.raises(EmptyResultError, match="review task needs a dataset with reviews"):
            data.examples("test")
    finally:
        del data.ds.__dict__["examples"]


def test_review_reference_is_the_most_common_review(backbone, tmp_path):
    """The review task's floor: the train split's most common review (as ROUGE compares it), scored against
    every test review."""
    from userllm.metrics import rouge_per_example
    from userllm.tasks.scoring import label_prior

    reviews = {
        "A": ["first", "great  gift card", "Great gift card!", "valid", "Slow delivery."],
        "B": ["first", "Great gift card.", "meh", "valid", "Nice"],
    }  # train targets: positions 1-2
    rows = [
        {"user_id": u, "item_id": f"i{k}", "timestamp": 100 * k, "rating": 5.0, "text": t}
        for u, texts in reviews.items()
        for k, t in enumerate(texts)
    ]
    write(
        tmp_path / "Gift_Cards.json",
        "".join(
            json.dumps(
                {
                    "reviewerID": r["user_id"],
                    "asin": r["item_id"],
                    "overall": r["rating"],
                    "unixReviewTime": r["timestamp"],
                    "reviewText": r["text"],
                }
            )
            + "\n"
            for r in rows
        ),
    )
    prepare_dataset(PrepareConfig(source="amazon", paths=[tmp_path / "Gift_Cards.json"], out=tmp_path / "ds"))
    data = task_data(PreparedDataset(tmp_path / "ds"), backbone, "review")
    got = label_prior(data, None, 1)
    want = rouge_per_example(["great gift card"] * 2, ["Nice", "Slow delivery."])  # the test reviews: last events
    assert set(got) == {"rouge1", "rouge2", "rougeLsum"}
    assert got["rouge1"]["value"] == pytest.approx(sum(want["rouge1"]) / 2)


def test_textprompt_history_respects_max_history(synthetic_ds, backbone):
    for L in (1, 3, 7):
        data = task_data(synthetic_ds, backbone, "next_item", method="textprompt", max_history=L)
        for e in data.examples("test")[:5]:
            lines = e.prompt.split(prompts.HISTORY_HEADER.format(**data.words))[1].strip().split("\n")
            history = [ln for ln in lines if ln.count(";") == 2]
            assert len(history) == min(L, e.end) == e.history_len
            rows = data.tl.offsets[e.user_idx] + e.end - 1  # the newest event is the last line
            assert history[-1].startswith(synthetic_ds.item_titles[data.tl.item[rows]] + ";")


def test_chat_template_wraps_prompt(backbone):
    tok = backbone.tokenizer
    plain = prompts.render(tok, "Q?", None, {"item": "item", "category": "category"})
    assert plain == "Q?" + prompts.PLAIN_ANSWER
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    try:
        assert prompts.render(tok, "Q?", ["a; 4; x"], {"item": "item", "category": "category"}).startswith(
            "<|user|>The user's"
        )
    finally:
        tok.chat_template = None


def test_trie_search_only_yields_vocabulary(synthetic_ds, backbone):
    """Even a random LM's constrained beam search returns only catalogue titles, best first, distinct."""
    data = task_data(synthetic_ds, backbone, "next_item")
    titles = synthetic_ds.item_titles[2:]
    trie = TokenTrie([data.tokens(t) for t in titles], eos_token_id=backbone.tokenizer.eos_token_id)
    model = TextPromptLM(UserLLMConfig(strategy="full"), llm=backbone.model).eval()
    ex = data.examples("test")[:3]
    ids, mask, _ = data.batch(ex, with_answers=False)
    with model.conditioned(None, ids, mask) as (embeds, m):
        found = constrained_beam_search(model, embeds, m, trie, beams=5)
    for row in found:
        assert len(row) == 5 and len({i for i, _ in row}) == 5
        assert all(0 <= i < len(titles) for i, _ in row)
        scores = [s for _, s in row]
        assert scores == sorted(scores, reverse=True)
    # the scores are the model's own log-probabilities of title + eos
    i, s = found[0][0]
    seq = data.tokens(titles[i]) + [backbone.tokenizer.eos_token_id]
    full = torch.cat([ids[:1], torch.tensor([seq])], 1)
    fmask = torch.cat([mask[:1], torch.ones(1, len(seq), dtype=torch.long)], 1)
    with torch.no_grad():
        logp = model(None, full, fmask).logits.log_softmax(-1)[0, -len(seq) - 1 : -1]
    assert abs(logp.gather(1, torch.tensor(seq)[:, None]).sum().item() - s) < 1e-3


def test_bf16_autocast_decoding_ranks_as_fp32_does(synthetic_ds, backbone):
    """Under bf16 autocast (``userllm evaluate --bf16``) the beam search and the exact ranking run (their
    float32 attention bias meets bf16 activations) and give log-probabilities within bf16's rounding of
    the float32 ones (|difference| <= 0.05 + 2% of the magnitude)."""
    data = task_data(synthetic_ds, backbone, "next_item")
    titles = synthetic_ds.item_titles[2:12]
    sequences = [[data.tokens(t) for t in titles]] * 2
    trie = TokenTrie(sequences[0], eos_token_id=backbone.tokenizer.eos_token_id)
    model = TextPromptLM(UserLLMConfig(strategy="full"), llm=backbone.model).eval()
    ids, mask, _ = data.batch(data.examples("test")[:2], with_answers=False)
    out = {}
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), model.conditioned(None, ids, mask) as (e, m):
            out[bf16] = (
                rank_sequences(model, e, m, sequences, eos_token_id=backbone.tokenizer.eos_token_id),
                constrained_beam_search(model, e, m, trie, beams=3),
            )
    assert out[False][0] != out[True][0]  # autocast took effect
    for kind in range(2):
        for exact, low in zip(out[False][kind], out[True][kind]):
            a, b = dict(exact), dict(low)
            assert all(abs(a[i] - b[i]) <= 0.05 + 0.02 * abs(a[i]) for i in set(a) & set(b))
            assert len(set(a) & set(b)) >= len(a) - 1  # at most the last place changes hands


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,mode", [("userllm", "cross_attention"), ("userllm", "soft_prompt"), ("textprompt", None)]
)
def test_train_and_evaluate_end_to_end(synthetic_ds, text_lm_dir, tmp_path, method, mode, monkeypatch):
    llm = UserLLMConfig(
        backbone=str(text_lm_dir),
        strategy="lora" if method == "textprompt" else "enc",
        cross_attention_every=1,
        **({"mode": mode} if mode else {}),
    )
    cfg = TrainConfig(
        dataset=synthetic_ds.root,
        out=tmp_path / "run",
        task="next_item",
        method=method,
        llm=llm,
        encoder="random" if method == "userllm" else None,
        max_history=5,
        train_examples=16,
        batch_size=4,
        lr=3e-3,
        checkpoint_every=2,
        beams=3,
        max_new_tokens=8,
    )
    summary = train(cfg)
    assert summary["steps"] == 4 and summary["last_loss"] < summary["first_loss"]
    run = tmp_path / "run"
    assert (run / "model" / "userllm.safetensors").exists() and (run / "checkpoint" / "train_state.pt").exists()
    m = evaluate(run, users=6, seed=1, general=True)
    assert m["examples"] == 6 and set(m["metrics"]) == {"recall@1", "exact_match", "valid_title"}
    r1 = m["metrics"]["recall@1"]
    assert 0 <= r1["low"] <= r1["value"] <= r1["high"] <= 1 and m["general"]["perplexity_before"] > 1
    assert set(m["references"]) == {"label prior"}  # a random encoder is no reference
    titles = set(synthetic_ds.item_titles)
    assert all(len(p["ranked"]) == 3 and set(p["ranked"]) <= titles for p in m["predictions"])
    assert json.loads((run / "metrics.json").read_text())["config"]["method"] == method
    assert eval_users(run, synthetic_ds.sequences.height, 6, 1) == json.loads(
        (run / "eval_users-6-seed1.json").read_text()
    )
    with pytest.raises(OutputExistsError):
        evaluate(run, users=6, seed=1)
    answer = userllm.load(run).generate(
        synthetic_ds.sequences.get_column("user_id")[0], "Which movie next?", max_new_tokens=4
    )
    assert isinstance(answer, str)
    # bf16 generates under autocast: the backbone's linear layers compute in bf16 (in float32 without it)
    for bf16, want in ((True, {torch.bfloat16}), (False, {torch.float32})):
        pipeline, dtypes = Pipeline.from_pretrained(run, bf16=bf16), set()
        for m in pipeline.model.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
        pipeline.generate(synthetic_ds.sequences.get_column("user_id")[0], "Which movie next?", max_new_tokens=4)
        assert dtypes == want


def test_shortlist_ranks_exactly_the_stage1_encoders_items(synthetic_ds, text_lm_dir, tmp_path, monkeypatch):
    """With ``shortlist`` N the LLM ranks only the titles of the stage-1 encoder's top N items per user:
    with beams >= N it returns all of them (the encoder alone ranks the same list), for User-LLM and for TP
    (whose timelines use the default time-gap buckets, not the encoder's 8); without a pretrained encoder a
    shortlist is refused by name."""
    from userllm.config import EncoderConfig, PretrainConfig
    from userllm.encoder.data import Timelines
    from userllm.encoder.pretrained import load_encoder
    from userllm.encoder.train import pretrain
    from userllm.errors import ConfigError

    enc = EncoderConfig(d_model=32, d_feature=16, n_layers=1, n_heads=2, max_len=8, time_gap_buckets=8)
    pretrain(PretrainConfig(dataset=synthetic_ds.root, out=tmp_path / "enc", encoder=enc, epochs=1, batch_size=16))
    llm = UserLLMConfig(backbone=str(text_lm_dir), strategy="enc", cross_attention_every=1)
    cfg = TrainConfig(
        dataset=synthetic_ds.root,
        out=tmp_path / "run",
        task="next_item",
        llm=llm,
        encoder=str(tmp_path / "enc"),
        max_history=5,
        train_examples=4,
        batch_size=4,
        beams=3,
        max_new_tokens=4,
        eval_batch_size=3,
    )
    train(cfg)
    m = evaluate(tmp_path / "run", users=6, seed=1, shortlist=3)
    assert m["config"]["shortlist"] == 3
    assert set(m["references"]) == {"label prior", "encoder alone", "shortlist in random order"}
    data = TaskData(
        synthetic_ds,
        load_backbone(str(text_lm_dir)).tokenizer,
        task="next_item",
        method="userllm",
        max_history=5,
        timelines=Timelines.from_dataset(synthetic_ds, 8),
    )
    examples = data.examples("test", eval_users(tmp_path / "run", synthetic_ds.sequences.height, 6, 1))
    top = data.encoder_top(load_encoder(tmp_path / "enc"), examples, 3)
    logp = data.encoder_logprobs(load_encoder(tmp_path / "enc"), examples)  # the distribution those are the top of
    assert logp.shape[0] == len(examples) and logp.topk(3, -1).indices.tolist() == top
    tp = TrainConfig(
        **{
            **cfg.model_dump(),
            "out": tmp_path / "tp",
            "method": "textprompt",
            "shortlist": 3,
            "llm": {**cfg.llm.model_dump(), "strategy": "lora", "candidates": 3},
        }
    )
    train(tp)
    evaluate(tmp_path / "tp", users=6, seed=1)
    # TP's prompt lists the same 3 titles, best first, between its history and the question
    tp_data = userllm.load(tmp_path / "tp").data
    for ex, row in zip(tp_data.examples("test", [e.user_idx for e in examples]), top):
        listed = "\n".join(
            [prompts.CANDIDATES_HEADER.format(**tp_data.words), *(synthetic_ds.item_titles[i] for i in row)]
        )
        assert listed + "\n\n" + prompts.instruction("next_item", tp_data.words) in ex.prompt
    with pytest.raises(ConfigError, match="a text prompt with candidates=3 lists a pretrained stage-1 encoder"):
        train(TrainConfig(**{**tp.model_dump(), "out": tmp_path / "tp2", "encoder": None}))
    for run in ("run", "tp"):
        records = {
            json.loads(line)["user_id"]: json.loads(line)
            for line in (tmp_path / run / "records.jsonl").read_text().splitlines()
        }
        for ex, row in zip(examples, top):
            assert sorted(records[ex.user_id]["ranked"]) == sorted({synthetic_ds.item_titles[i] for i in row})
    # the records keep the encoder's own answers: the run minus the encoder alone, paired per user
    from userllm.tasks.records import paired_vs_encoder, paired_vs_random_order, read_records
    from userllm.tasks.report import reference_difference_lines

    recs = read_records(tmp_path / "run")
    for ex, row in zip(examples, top):
        assert next(r for r in recs if r["user_id"] == ex.user_id)["encoder_ranked"] == [
            synthetic_ds.item_titles[i] for i in row
        ]
    users, diff = paired_vs_encoder(tmp_path / "run")
    want = m["metrics"]["recall@1"]["value"] - m["references"]["encoder alone"]["recall@1"]["value"]
    assert users == 6 and diff["recall@1"]["value"] == pytest.approx(want)
    # the shortlist in random order: each user's 3 titles (or fewer distinct), Recall@1 = 1/len if listed
    listed = [{synthetic_ds.item_titles[i] for i in row} for row in top]
    random = [(ex.answer in titles) / len(titles) for ex, titles in zip(examples, listed)]
    assert any(random) and m["references"]["shortlist in random order"]["recall@1"]["value"] == pytest.approx(
        sum(random) / 6
    )
    users, diff = paired_vs_random_order(tmp_path / "run")
    want = m["metrics"]["recall@1"]["value"] - m["references"]["shortlist in random order"]["recall@1"]["value"]
    assert users == 6 and diff["recall@1"]["value"] == pytest.approx(want) and set(diff) == {"recall@1"}  # beams = 3
    tables = "\n".join(reference_difference_lines([{"cell": "ul", "run": str(tmp_path / "run")}], "next_item", 0))
    assert tables.count("| ul | 6 | ") == 2 and "minus the shortlist in random order" in tables
    # the ranking keeps every title's [title, log p(title + eos), tokens], best first
    for r in recs:
        assert [t for t, _, _ in r["shortlist_scores"]] == r["ranked"] and all(
            n >= 2 for _, _, n in r["shortlist_scores"]
        )
        assert [lp for _, lp, _ in r["shortlist_scores"]] == sorted(
            (lp for _, lp, _ in r["shortlist_scores"]), reverse=True
        )
    full = evaluate(tmp_path / "run", users=6, seed=1, force=True, shortlist=0)  # the whole catalogue again
    assert full["config"]["shortlist"] == 0
    random = TrainConfig(**{**cfg.model_dump(), "out": tmp_path / "random", "encoder": "random", "shortlist": 3})
    train(random)
    with pytest.raises(InputError, match="shortlist=3 ranks the stage-1 encoder's items"):
        evaluate(tmp_path / "random", users=6, seed=1)


@pytest.fixture(scope="module")
def stage1(synthetic_ds, tmp_path_factory):
    """A one-epoch stage-1 encoder of the synthetic dataset (8 time-gap buckets), for shortlists."""
    from userllm.config import EncoderConfig, PretrainConfig
    from userllm.encoder.train import pretrain

    out = tmp_path_factory.mktemp("stage1") / "enc"
    enc = EncoderConfig(d_model=32, d_feature=16, n_layers=1, n_heads=2, max_len=8, time_gap_buckets=8)
    pretrain(PretrainConfig(dataset=synthetic_ds.root, out=out, encoder=enc, epochs=1, batch_size=16))
    return out


def shortlist_data(synthetic_ds, backbone) -> TaskData:
    from userllm.encoder.data import Timelines

    return TaskData(
        synthetic_ds,
        backbone.tokenizer,
        task="next_item",
        method="userllm",
        max_history=5,
        timelines=Timelines.from_dataset(synthetic_ds, 8),
    )


def test_exclude_history_keeps_the_history_out_of_shortlists_and_listings(
    synthetic_ds, text_lm_dir, backbone, stage1, tmp_path
):
    """``llm.exclude_history``: the stage-1 top items (shortlist, TP's listing, the encoder-alone reference) are
    the encoder's order with the history window's items taken out; a run built with it reads them so."""
    from userllm.encoder.pretrained import load_encoder
    from userllm.tasks.pipeline import build

    data = shortlist_data(synthetic_ds, backbone)
    examples = data.examples("test")
    encoder = load_encoder(stage1)
    plain = data.encoder_top(encoder, examples, 20)
    data.exclude_history = True
    top = data.encoder_top(encoder, examples, 10)
    windows = [set(row) - {0} for row in data.user_batch(examples)["item"].tolist()]
    assert any(set(p[:10]) & w for p, w in zip(plain, windows))  # the encoder does rank the history's items
    for row, p, window in zip(top, plain, windows):
        assert row == [i for i in p if i not in window][:10]
    for method, strategy in (("textprompt", "lora"), ("userllm", "proj")):
        llm = UserLLMConfig(backbone=str(text_lm_dir), strategy=strategy, candidates=3, exclude_history=True)
        cfg = TrainConfig(
            dataset=synthetic_ds.root,
            out=tmp_path / method,
            task="next_item",
            method=method,
            llm=llm,
            encoder=str(stage1),
            max_history=5,
            shortlist=10,
        )
        model, built = build(cfg, synthetic_ds)
        assert built.exclude_history and built.encoder_top(encoder, examples, 10) == top
        assert method == "textprompt" or model.cfg.exclude_history


def test_resume_equals_uninterrupted(synthetic_ds, text_lm_dir, tmp_path):
    from safetensors.torch import load_file

    llm = UserLLMConfig(backbone=str(text_lm_dir), strategy="enc", cross_attention_every=1)
    common = dict(
        dataset=synthetic_ds.root,
        task="favorite_genre",
        llm=llm,
        encoder="random",
        max_history=5,
        train_examples=16,
        batch_size=4,
        lr=3e-3,
        checkpoint_every=2,
    )
    train(TrainConfig(out=tmp_path / "a", **common))
    assert train(TrainConfig(out=tmp_path / "b", **common), steps_this_run=2)["steps"] == 2
    with pytest.raises(OutputExistsError):
        train(TrainConfig(out=tmp_path / "b", **common))
    assert train(TrainConfig(out=tmp_path / "b", resume=True, **common))["steps"] == 4
    a, b = (load_file(tmp_path / r / "model" / "userllm.safetensors") for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_evaluation_resumes_from_its_partial_records(synthetic_ds, text_lm_dir, tmp_path):
    """Records of an interrupted scoring of the same model are kept (not scored again); a cut last line is
    scored again; partial records of an earlier training are discarded; a finished scoring leaves none."""
    llm = UserLLMConfig(backbone=str(text_lm_dir), strategy="enc", cross_attention_every=1)
    common = dict(
        dataset=synthetic_ds.root,
        task="favorite_genre",
        llm=llm,
        encoder="random",
        max_history=5,
        train_examples=8,
        batch_size=4,
        lr=3e-3,
        eval_batch_size=2,
    )
    run = tmp_path / "run"
    train(TrainConfig(out=run, **common))
    evaluate(run, users=6, seed=1)
    full = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert not (run / "records.partial.jsonl").exists()
    header = json.dumps({"model": sha256(run / "summary.json")})
    marked = {**full[0], "ranked": ["<kept from the partial file>"]}
    cut = json.dumps(full[1])[:-5]
    (run / "records.partial.jsonl").write_text("\n".join([header, json.dumps(marked), cut]))
    evaluate(run, users=6, seed=1, force=True)
    again = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert again[0] == marked and again[1:] == full[1:]
    assert not (run / "records.partial.jsonl").exists()
    stale = json.dumps({"model": "a model trained before"})
    (run / "records.partial.jsonl").write_text("\n".join([stale, json.dumps(marked)]) + "\n")
    evaluate(run, users=6, seed=1, force=True)
    assert [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()] == full
    # a bf16 scoring is a scoring of its own: it does not take the records of an interrupted fp32 one
    (run / "records.partial.jsonl").write_text("\n".join([header, json.dumps(marked)]) + "\n")
    m = evaluate(run, users=6, seed=1, force=True, bf16=True)
    assert m["precision"] == "bf16" and m["config"]["bf16"] is True
    assert all(r["ranked"] != marked["ranked"] for r in m["predictions"])


def test_extend_carries_a_subset_on_to_every_user(synthetic_ds, text_lm_dir, tmp_path, monkeypatch):
    """--extend keeps the subset's finished records (not scored again) and scores only the other users, the
    same answers as one scoring of all; it refuses another scoring, fewer users, or a run never scored, the
    first two before the model loads."""
    llm = UserLLMConfig(backbone=str(text_lm_dir), strategy="enc", cross_attention_every=1)
    run = tmp_path / "run"
    train(
        TrainConfig(
            dataset=synthetic_ds.root,
            out=run,
            task="favorite_genre",
            llm=llm,
            encoder="random",
            max_history=5,
            train_examples=8,
            batch_size=4,
            lr=3e-3,
            eval_batch_size=4,
        )
    )
    import userllm.tasks.evaluate as ev

    def loaded(*args, **kwargs):
        pytest.fail("the model was loaded before --extend was refused")

    with monkeypatch.context() as patch, pytest.raises(InputError, match="nothing to extend"):
        patch.setattr(ev.Pipeline, "from_pretrained", loaded)
        evaluate(run, extend=True)
    full = evaluate(run)
    every = {r["user_id"]: r for r in read_records(run)}
    subset = evaluate(run, users=6, seed=1, force=True)
    assert subset["examples"] == 6 and subset["scoring_id"] == full["scoring_id"]
    kept = read_records(run)
    marked = {**kept[0], "ranked": ["<kept from records.jsonl>"]}
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [marked, *kept[1:]]))
    with monkeypatch.context() as patch, pytest.raises(InputError, match="another trained model or scoring"):
        patch.setattr(ev.Pipeline, "from_pretrained", loaded)
        evaluate(run, extend=True, bf16=True)
    m = evaluate(run, extend=True)
    assert m["examples"] == full["examples"] == len(every) and m["users"] == "all"
    again = {r["user_id"]: r for r in read_records(run)}
    assert again[marked["user_id"]]["ranked"] == marked["ranked"]  # kept, not scored again
    assert all(again[u] == every[u] for u in every if u != marked["user_id"])
    assert not (run / "records.partial.jsonl").exists()
    with pytest.raises(InputError, match="only adds users"):
        evaluate(run, users=6, seed=1, extend=True)


@pytest.mark.parametrize("method", ["textprompt", "userllm"])
def test_micro_batches_give_the_same_step(synthetic_ds, text_lm_dir, tmp_path, method):
    """Gradient accumulation over micro-batches of 1 (unequal answer lengths) == the whole batch at once."""
    from safetensors.torch import load_file

    llm = UserLLMConfig(
        backbone=str(text_lm_dir), strategy="lora" if method == "textprompt" else "enc", cross_attention_every=1
    )
    common = dict(
        dataset=synthetic_ds.root,
        task="next_item",
        method=method,
        llm=llm,
        encoder="random",
        max_history=5,
        train_examples=8,
        batch_size=4,
        lr=3e-3,
        random_encoder={"dropout": 0.0},
    )
    whole = train(TrainConfig(out=tmp_path / "whole", **common))
    parts = train(TrainConfig(out=tmp_path / "parts", micro_batch_size=1, **common))
    assert parts["losses"] == pytest.approx(whole["losses"], rel=1e-4)
    a, b = (load_file(tmp_path / r / "model" / "userllm.safetensors") for r in ("whole", "parts"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert whole["losses"][0] != whole["losses"][-1]  # it trained


def test_experiment_runs_grid_then_skips_finished_cells(synthetic_ds, text_lm_dir, tmp_path, monkeypatch, run_cli):
    import yaml

    from userllm.tasks import experiment, report

    spec = {
        "out": str(tmp_path / "exp"),
        "prepare": {"source": "synthetic", "out": str(synthetic_ds.root)},
        "tasks": ["favorite_genre"],
        "evaluate": {"seed": 0},
        "defaults": {
            "llm": {"backbone": str(text_lm_dir), "cross_attention_every": 1},
            "encoder": "random",
            "max_history": 4,
            "train_examples": 4,
            "batch_size": 2,
        },
        "cells": [
            {"name": "xattn", "set": {"method": "userllm"}},
            {"name": "tp", "set": {"method": "textprompt", "llm.strategy": "lora"}, "evaluate": {"users": 3}},
            {"name": "xattn-equal", "set": {"method": "userllm", "batch_size": 1}, "match_flops": "tp"},
        ],
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    trims = []  # the heap is trimmed after every cell, so no cell's peak stacks on the last one's leftovers
    monkeypatch.setattr(experiment, "release_memory", lambda: trims.append(True) or True)
    code, shown, err = run_cli("experiment", path)
    assert code == 0, err
    assert len(trims) == 3
    # the summary at a glance: every cell and reference with its compute and main metric, then the pairs
    glance = " ".join(shown.split())
    assert "favorite_genre: accuracy" in glance and "label prior" in glance and "xattn minus tp" in glance
    table = (tmp_path / "exp" / "results.md").read_text()
    assert (
        "| xattn | userllm | cross_attention | every 1 |" in table and "| tp | textprompt | text | - | lora |" in table
    )
    # tp was scored on 3 users: its own table re-scores the other cells on those users from their records
    same = table.split("on the 3 test users tp was scored on")[1]
    assert "| tp | textprompt |" in same and "| xattn | userllm |" in same and "label prior (same users)" in same
    from userllm.tasks.records import answer_summary, paired_difference, rescore, scored_users

    runs = tmp_path / "exp" / "favorite_genre"
    xattn = json.loads((runs / "xattn" / "metrics.json").read_text())
    assert rescore(runs / "xattn", scored_users(runs / "xattn")) == xattn["metrics"]  # all of its users: as scored
    assert len(scored_users(runs / "tp")) == 3 < len(scored_users(runs / "xattn"))
    # the paired difference: over tp's 3 users, per user, equal to the difference of the re-scored means
    users, diff = paired_difference(runs / "xattn", runs / "tp")
    want = (
        rescore(runs / "xattn", scored_users(runs / "tp"))["accuracy"]["value"]
        - json.loads((runs / "tp" / "metrics.json").read_text())["metrics"]["accuracy"]["value"]
    )
    assert users == 3 and diff["accuracy"]["value"] == pytest.approx(want)
    assert diff["accuracy"]["low"] <= diff["accuracy"]["value"] <= diff["accuracy"]["high"]
    assert "User-LLM minus TP, paired over the same users" in table and "| xattn | tp | 3 |" in table
    code, shown, err = run_cli("compare", runs / "xattn", runs / "tp")
    assert code == 0, err
    assert "paired over 3 users" in shown and f"{diff['accuracy']['value']:+.3f}" in shown
    # a side of several runs (a recipe's seeds): each user's mean over them, and the runs resampled too
    users, two = paired_difference([runs / "xattn", runs / "xattn-equal"], runs / "tp")
    _, other = paired_difference(runs / "xattn-equal", runs / "tp")
    assert users == 3 and two["accuracy"]["value"] == pytest.approx(
        (diff["accuracy"]["value"] + other["accuracy"]["value"]) / 2
    )
    code, shown, err = run_cli("compare", f"{runs / 'xattn'},{runs / 'xattn-equal'}", runs / "tp")
    assert code == 0, err
    assert "2 vs 1 runs resampled too" in " ".join(shown.split()) and f"{two['accuracy']['value']:+.3f}" in shown
    tops = Counter(json.loads(line)["ranked"][0] for line in (runs / "tp" / "records.jsonl").read_text().splitlines())
    top, n = tops.most_common(1)[0]
    assert answer_summary(runs / "tp") == f"{len(tops)} distinct; top '{top}' {n / 3:.0%}"
    assert f"| {answer_summary(runs / 'tp')} |" in same
    assert (tmp_path / "exp" / "results.png").stat().st_size > 0
    prior = next(r for r in json.loads((tmp_path / "exp" / "results.json").read_text()) if r["method"] == "label prior")
    data = TaskData(
        synthetic_ds, load_backbone(str(text_lm_dir)).tokenizer, task="favorite_genre", method="userllm", max_history=4
    )
    top = Counter(e.answer for e in data.examples("train")).most_common(1)[0][0]
    test = data.examples("test")
    assert prior["cell"] == "prior-h4" and "| prior-h4 | label prior |" in table
    assert prior["metrics"]["accuracy"]["value"] == pytest.approx(sum(e.answer == top for e in test) / len(test))
    cells = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert all(set(c) == set(report.RESULT_KEYS) for c in cells)
    assert {c["precision"] for c in cells if c["method"] in ("userllm", "textprompt")} == {
        "fp32"
    }  # no cell asked for bf16
    assert {c["precision"] for c in cells if c["method"] == "label prior"} == {"-"}
    assert all(c["train_flops"] > 0 for c in cells if c["method"] in ("userllm", "textprompt"))
    flops = {c["cell"]: c["train_flops"] for c in cells}
    equal = json.loads((tmp_path / "exp" / "favorite_genre" / "xattn-equal" / "summary.json").read_text())
    # User-LLM at TP's compute: more examples than TP's 4, stopping at the first step past TP's FLOPs
    assert equal["examples"] > 4 and flops["tp"] <= flops["xattn-equal"] < flops["tp"] + flops["xattn"] / 4 * 2

    def refuse(*a, **k):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr("userllm.tasks.train.train", refuse)
    monkeypatch.setattr("userllm.tasks.evaluate.evaluate", refuse)
    assert experiment.run_experiment(path) == tmp_path / "exp" / "results.md"


def test_plot_draws_cells_of_several_results_files(tmp_path, run_cli):
    """``userllm plot``: two experiments at different history lengths in one figure, one dataset's cells."""

    def cell(name, method, history, value, dataset="ml-100k"):
        return {
            "dataset": dataset,
            "task": "favorite_genre",
            "cell": name,
            "method": method,
            "mode": "text" if method == "textprompt" else "cross_attention" if method == "userllm" else "-",
            "history": history,
            "train_examples": 8,
            "train_flops": 1e14 if method != "label prior" else 0,
            "train_seconds": 1.0,
            "users": 10,
            "commit": "x",
            "metrics": {"accuracy": {"value": value, "low": value - 0.05, "high": value + 0.05}},
        }

    h50, h200 = tmp_path / "h50.json", tmp_path / "h200.json"
    h50.write_text(
        json.dumps(
            [
                cell("ul", "userllm", 50, 0.8),
                cell("tp", "textprompt", 50, 0.7),
                cell("prior-h50", "label prior", 50, 0.5),
                cell("other", "userllm", 50, 0.1, "gift_cards"),
            ]
        )
    )
    h200.write_text(json.dumps([cell("ul-200", "userllm", 200, 0.8), cell("tp-200", "textprompt", 200, 0.6)]))
    out = tmp_path / "plot.png"
    code, shown, err = run_cli("plot", h50, h200, "--out", out, "--dataset", "ml-100k")
    assert code == 0, err
    assert "(5 cells)" in " ".join(shown.split()) and out.stat().st_size > 0  # the gift_cards cell left out
    code, _, err = run_cli("plot", h50, "--out", out)
    assert code != 0 and "--force" in err
    code, shown, err = run_cli("plot", h50, h200, "--out", out, "--dataset", "ml-100k", "--history", "200", "--force")
    assert code == 0, err
    assert "(2 cells)" in " ".join(shown.split())  # only the 200-event cells
    code, _, err = run_cli("plot", h50, "--out", out, "--history", "100", "--force")
    assert code != 0 and "at 100 events" in err
    bad = write(tmp_path / "bad.json", json.dumps([{"dataset": "ml-100k"}]))
    code, _, err = run_cli("plot", bad, "--out", tmp_path / "p2.png")
    assert code != 0 and "bad.json" in err and "train_flops" in err and not (tmp_path / "p2.png").exists()


def test_a_shortlisting_tp_cell_gets_the_specs_encoder(tmp_path):
    """TP trains without the encoder, but a TP cell with ``shortlist`` ranks its top items: the experiment
    gives it the spec's pretrained encoder, and says so by name when the spec has none."""
    from userllm.errors import ConfigError
    from userllm.tasks.experiment import cell_config

    spec = {"out": str(tmp_path / "exp"), "defaults": {"llm": {"strategy": "lora"}}}
    tp = {"name": "tp", "set": {"method": "textprompt"}}
    listed = {"name": "tp-short", "set": {"method": "textprompt", "shortlist": 20}}
    assert cell_config(spec, tp, "next_item", tmp_path, tmp_path / "enc", {}).encoder is None
    assert cell_config(spec, listed, "next_item", tmp_path, tmp_path / "enc", {}).encoder == str(tmp_path / "enc")
    with pytest.raises(ConfigError, match="cell tp-short: a shortlist or candidates needs a pretrained encoder"):
        cell_config(spec, listed, "next_item", tmp_path, None, {})


def test_cli_train_errors_are_clear(synthetic_ds, run_cli, tmp_path):
    code, _, err = run_cli(
        "train",
        synthetic_ds.root,
        "--out",
        tmp_path / "r",
        "--method",
        "userllm",
        "--backbone",
        "nope/none-such-model-x",
    )
    assert code != 0 and "encoder" in err  # no --encoder given: named before any model is loaded
    code, _, err = run_cli("train", synthetic_ds.root, "--out", tmp_path / "r", "--task", "nonsense")
    assert code == 2 and "task" in err


def test_two_process_torchrun_train_replicas_identical(synthetic_ds, text_lm_dir, tmp_path):
    """The stage-2 recipe under torchrun (2 gloo processes): both replicas end with identical weights."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29531",
        "-m",
        "userllm.cli",
        "train",
        str(synthetic_ds.root),
        "--out",
        str(tmp_path / "ddp"),
        "--encoder",
        "random",
        "--backbone",
        str(text_lm_dir),
        "--strategy",
        "lora",
        "--max-history",
        "4",
        "--train-examples",
        "8",
        "-s",
        "batch_size=4",
        "-s",
        "llm.cross_attention_every=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["replica_sha256"]) == 2 and len(set(summary["replica_sha256"])) == 1


@pytest.mark.slow
def test_trained_userllm_reads_the_user_the_same_way_in_training_and_evaluation(synthetic_ds, text_lm_dir, tmp_path):
    """Issue 13's checks on a trained User-LLM (open gates, not only at zero): the gates open and the log says
    so; evaluation runs in eval mode; train and test prompts are the same tokens and the history window ends
    right before the target; the no-grad (absorbed) constrained scores equal the training forward's
    teacher-forced log-probabilities of answer + eos; and swapping two users' contexts changes the scores."""
    llm = UserLLMConfig(backbone=str(text_lm_dir), strategy="enc", cross_attention_every=1, item_words=["category"])
    cfg = TrainConfig(
        dataset=synthetic_ds.root,
        out=tmp_path / "run",
        task="favorite_genre",
        llm=llm,
        encoder="random",
        max_history=5,
        train_examples=32,
        batch_size=4,
        lr=1e-2,
        checkpoint_every=4,
        encoder_dropout=0.0,
    )
    summary = train(cfg)
    last = summary["gates"][-1]
    assert [g["step"] for g in summary["gates"]] == [4, 8]
    assert all(abs(b["attn_gate"]) > 0.01 and b["attn_norm"] > 0 for k, b in last.items() if k != "step")
    run = userllm.load(tmp_path / "run")
    model, data = run.model, run.data
    assert not model.training and not model.encoder.training
    train_ex, test_ex = data.examples("train"), data.examples("test")
    assert {e.prompt for e in train_ex} == {e.prompt for e in test_ex} and len({e.prompt for e in test_ex}) == 1
    for e in test_ex[:3]:
        assert e.end - e.start == min(5, e.end)
        window = data.user_batch([e])["item"][0]
        assert (
            window.tolist()
            == data.tl.item[data.tl.offsets[e.user_idx] + e.start : data.tl.offsets[e.user_idx] + e.end].tolist()
        )
    a, b = test_ex[0], next(e for e in test_ex if e.user_idx != test_ex[0].user_idx)
    ids, mask, _ = data.batch([a, b], with_answers=False)
    trie = TokenTrie([data.tokens(v) for v in data.answer_vocabulary()[2:]], eos_token_id=data.tokenizer.eos_token_id)

    def scores(examples):
        users = data.user_batch(examples)
        with torch.no_grad(), model.conditioned(users, ids, mask) as (embeds, m):
            return [dict(row) for row in constrained_beam_search(model, embeds, m, trie, beams=3)]

    own, swapped = scores([a, b]), scores([b, a])
    assert own != swapped  # each row's answer scores depend on whose context it reads
    # the no-grad scores are the training forward's log-probabilities of answer + eos
    index, s = next(iter(own[0].items()))
    seq = data.answer_tokens(data.answer_vocabulary()[index + 2])
    full = torch.cat([ids[:1], torch.tensor([seq])], 1)
    fmask = torch.cat([mask[:1], torch.ones(1, len(seq), dtype=torch.long)], 1)
    logp = model(data.user_batch([a]), full, fmask).logits.log_softmax(-1)[0, -len(seq) - 1 : -1]
    assert logp.gather(1, torch.tensor(seq)[:, None]).sum().item() == pytest.approx(s, abs=1e-4)
    # users side by side, as `userllm answer` shows them: constrained answers from each one's latest history
    ids = synthetic_ds.sequences.get_column("user_id").to_list()[:2]
    shown = run.answer(ids, top=3)
    genres = set(synthetic_ds.vocab["category"][2:])
    assert [r["user_id"] for r in shown] == ids
    assert all(len(r["answers"]) == 3 and {a for a, _ in r["answers"]} <= genres for r in shown)
    assert all(1 >= r["answers"][0][1] >= r["answers"][1][1] > 0 and r["events"] == 5 for r in shown)
    assert shown[0]["answers"] != shown[1]["answers"]
    with pytest.raises(InputError, match="not in dataset"):
        run.answer(["nobody"])
    # --bf16 answers as `evaluate --bf16` scores: under autocast, so the probabilities move by bf16's rounding
    # (the flag was not passed on before) while the answers stay those of float32 up to near-ties
    half = Pipeline.from_pretrained(tmp_path / "run", bf16=True).answer(ids, top=3)
    assert [r["answers"] for r in half] != [r["answers"] for r in shown]
    for h, f in zip(half, shown):
        assert dict(h["answers"]) == pytest.approx(dict(f["answers"]), rel=0.1)
    assert Pipeline.from_pretrained(tmp_path / "run", bf16=False).answer(ids, top=3) == shown  # trained in float32


def test_default_gate_learning_rate_opens_the_gates(synthetic_ds, text_lm_dir, tmp_path):
    """Why 64 examples answered one genre for everyone: at the shared learning rate the zero-initialised gates
    move ~lr per Adam step and stay near 0 while the blocks' own weights move at full speed; the default
    gate_lr_scale (20) opens them ~20x as far in the same steps."""
    llm = UserLLMConfig(backbone=str(text_lm_dir), strategy="enc", cross_attention_every=1)
    common = dict(
        dataset=synthetic_ds.root,
        task="favorite_genre",
        llm=llm,
        encoder="random",
        max_history=5,
        train_examples=32,
        batch_size=4,
        warmup_steps=0,
        checkpoint_every=8,
    )
    opened = {}
    for scale in (1.0, TrainConfig().gate_lr_scale):
        gates = train(TrainConfig(out=tmp_path / f"g{scale}", gate_lr_scale=scale, **common))["gates"][-1]
        opened[scale] = max(abs(b["attn_gate"]) for k, b in gates.items() if k != "step")
    assert TrainConfig().gate_lr_scale == 20 and opened[1.0] < 0.01 < 0.05 < opened[20.0]


def test_experiment_refuses_runs_made_with_another_recipe(synthetic_ds, tmp_path, run_cli):
    """A spec names its encoder by ``pretrain.out`` and each cell by its name: a finished run there with another
    recipe (learned positions where the spec asks for ALiBi; a cell whose ``set`` was edited) was reused
    silently; now the experiment stops and says which field differs. How the run ran (force, device) and the
    vocabulary sizes an encoder read from the data do not count."""
    import yaml

    from userllm.config import PretrainConfig, TrainConfig, dump_config
    from userllm.tasks.experiment import check_recipe

    enc = tmp_path / "enc"
    saved = PretrainConfig(dataset=synthetic_ds.root, out=enc, force=True, encoder={"max_len": 8, "num_items": 42})
    write(enc / "config.json", json.dumps(dump_config(saved)))
    write(enc / "summary.json", json.dumps({"finished": True}))
    spec = {
        "out": str(tmp_path / "exp"),
        "prepare": {"source": "synthetic", "out": str(synthetic_ds.root)},
        "pretrain": {"out": str(enc), "encoder": {"max_len": 8, "positions": "alibi"}},
        "tasks": ["favorite_genre"],
        "cells": [{"name": "x", "set": {"lr": 0.01}}],
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, _, err = run_cli("experiment", path)
    assert code == 2 and "encoder.positions: 'learned' there, 'alibi' in the spec" in " ".join(err.split())
    assert "force" not in err and "num_items" not in err and not (tmp_path / "exp").exists()
    check_recipe(path, "pretrain", PretrainConfig(dataset=synthetic_ds.root, out=enc, encoder={"max_len": 8}))  # same

    spec["pretrain"]["encoder"]["positions"] = "learned"
    cell = tmp_path / "exp" / "favorite_genre" / "x"  # finished (metrics.json) with lr 0.001, the spec now says 0.01
    run = TrainConfig(
        dataset=synthetic_ds.root, task="favorite_genre", out=cell, encoder=str(enc), lr=0.001, force=True
    )
    write(cell / "config.json", json.dumps(dump_config(run)))
    write(cell / "metrics.json", "{}")
    path.write_text(yaml.safe_dump(spec))
    code, _, err = run_cli("experiment", path)
    assert (
        code == 2
        and "cell x (favorite_genre)" in err
        and "(lr: 0.001 there, 0.01 in the spec)" in " ".join(err.split())
    )


@pytest.mark.parametrize(
    "name", ["amazon_gift_cards", "demo", "movielens100k", "stage2", "stage2_h200", "stage2_h200_alibi"]
)
def test_shipped_experiment_specs_resolve_every_cell(name, tmp_path):
    """Every (task, cell) of the specs in experiments/ resolves to a valid TrainConfig (a mistyped key or value
    fails here, not hours into a grid); match_flops cells read their reference's training FLOPs."""
    from pathlib import Path

    from userllm.tasks.experiment import cell_config, load_spec

    spec = {**load_spec(Path(__file__).parents[2] / "experiments" / f"{name}.yaml"), "out": str(tmp_path)}
    resolved = 0
    for task in spec["tasks"]:
        for cell in spec["cells"]:
            if task not in cell.get("tasks", [task]):
                continue
            if cell.get("match_flops"):
                write(tmp_path / task / cell["match_flops"] / "summary.json", json.dumps({"train_flops": 2.5e14}))
            cfg = cell_config(spec, cell, task, tmp_path / "data", tmp_path / "enc", {})
            assert cfg.task == task and cfg.out == tmp_path / task / cell["name"]
            flops = (cell.get("set") or {}).get("train_flops")  # as YAML reads it (2.096e14: a string)
            assert cfg.train_flops == (2.5e14 if cell.get("match_flops") else flops and float(flops))
            resolved += 1
    assert resolved >= len(spec["cells"])


def test_item_text_writes_titles_in_the_llms_words_for_the_encoder(synthetic_ds, text_lm_dir, tmp_path, run_cli):
    """`userllm item-text`: row i is the backbone's mean input embedding of item i's title tokens (zeros for
    padding and unknown), refused over an existing file without --force; a stage-1 encoder with the `text`
    feature pretrains on it."""
    out = tmp_path / "titles.npy"
    code, shown, err = run_cli("item-text", synthetic_ds.root, "--out", out, "--backbone", text_lm_dir)
    assert code == 0, err
    table = np.load(out)
    backbone = load_backbone(str(text_lm_dir))
    ids = backbone.tokenizer(synthetic_ds.item_titles[2], add_special_tokens=False).input_ids
    want = backbone.model.get_input_embeddings().weight.detach()[ids].mean(0).numpy()
    assert table.shape == (synthetic_ds.num_items, want.shape[0]) and table.dtype == np.float32
    assert np.allclose(table[2], want, atol=1e-6) and not table[:2].any()
    code, _, err = run_cli("item-text", synthetic_ds.root, "--out", out, "--backbone", text_lm_dir)
    assert code != 0 and "already exists" in err and "--force" in err
    code, _, err = run_cli("item-text", synthetic_ds.root, "--out", tmp_path / "titles.txt", "--backbone", text_lm_dir)
    assert code != 0 and ".npy" in err
    code, _, err = run_cli(
        "pretrain",
        synthetic_ds.root,
        "--out",
        tmp_path / "enc",
        "--epochs",
        "1",
        "-s",
        f"item_text_path={out}",
        "-s",
        "encoder.features=[item,rating,category,text]",
        "-s",
        "batch_size=16",
        "-s",
        "warmup_steps=1",
    )
    assert code == 0, err
    encoder = load_encoder(tmp_path / "enc")
    assert "text" in encoder.cfg.features and encoder.cfg.text_dim == table.shape[1]


def test_paired_difference_refuses_runs_of_different_tasks(tmp_path):
    from userllm.tasks.records import paired_difference

    for name, task in (("genre", "favorite_genre"), ("item", "next_item")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"task": task}))
        (tmp_path / name / "records.jsonl").write_text(
            json.dumps({"user_id": "1", "ranked": ["a"], "truth": "a"}) + "\n"
        )
    with pytest.raises(InputError, match="different tasks"):
        paired_difference([tmp_path / "genre"], [tmp_path / "genre", tmp_path / "item"])
    with pytest.raises(InputError, match="at least one run"):
        paired_difference([], tmp_path / "genre")


def test_history_line_compares_lengths_at_a_shared_budget():
    """The history-length line takes each length's best cell among those within the budget every length
    reached: a longer training at one length only does not stand in for that length, and a cell scored on a
    subset of users does not stand in for one scored on more."""
    from userllm.tasks.plots import best_by_history

    def cell(history, flops, acc, users=943):
        return {
            "history": history,
            "train_flops": flops,
            "users": users,
            "metrics": {"accuracy": {"value": acc, "low": acc, "high": acc}},
        }

    cells = [cell(50, 2.0e14, 0.83), cell(50, 7.4e14, 0.86), cell(50, 4.6e13, 0.72), cell(200, 2.2e14, 0.82)]
    assert [(h, m["value"]) for h, m in best_by_history(cells, "accuracy")] == [(50, 0.83), (200, 0.82)]
    assert [(h, m["value"]) for h, m in best_by_history(cells[:3], "accuracy")] == [(50, 0.86)]  # one length: its best
    lucky = [*cells, cell(50, 2.0e14, 0.90, users=200), cell(200, 2.2e14, 0.70, users=100)]
    assert [(h, m["value"]) for h, m in best_by_history(lucky, "accuracy")] == [(50, 0.83), (200, 0.82)]
    assert [(h, m["value"]) for h, m in best_by_history(lucky[-2:], "accuracy")] == [(50, 0.90), (200, 0.70)]
    # next_item: a list only one length ranked (without the history's items) does not enter the line
    listed = [{**c, "shortlist": 20, "exclude_history": False} for c in cells]
    unrated = {**cell(50, 2.0e14, 0.95), "shortlist": 20, "exclude_history": True}
    assert [(h, m["value"]) for h, m in best_by_history([*listed, unrated], "accuracy")] == [(50, 0.83), (200, 0.82)]
    assert (
        best_by_history([unrated, {**cell(200, 2.2e14, 0.82), "shortlist": 50, "exclude_history": False}], "accuracy")
        == []
    )
    assert best_by_history([], "accuracy") == []


def test_compute_panel_sets_cells_of_one_budget_side_by_side():
    """Cells within ~12% of one another's training compute are spread apart on the log axis, in order and
    around their middle, so their error bars do not overlap; a cell alone keeps its exact compute."""
    from userllm.tasks.plots import dodged

    xs = [2.88e14, 5.0e13, 2.94e14, 2.879e14, 7.4e14]
    out = dodged(xs)
    assert out[1] == 5.0e13 and out[4] == 7.4e14
    group = [out[0], out[2], out[3]]
    assert group == sorted(group) and len(set(group)) == 3
    assert np.allclose(np.diff(np.log10(group)), 0.012)
    assert np.isclose(np.mean(np.log10(group)), np.mean(np.log10([xs[0], xs[2], xs[3]])))


def test_experiment_pairs_only_cells_that_rank_the_same_list():
    """User-LLM minus TP is tabled for cells of one history length that rank the same shortlist: not across
    lengths, shortlist sizes, or a shortlist with and one without the history's items."""
    from userllm.tasks.report import comparable_pairs

    def cell(name, method, history=50, shortlist=20, exclude=False):
        return {"cell": name, "method": method, "history": history, "shortlist": shortlist, "exclude_history": exclude}

    cells = [
        cell("ul", "userllm"),
        cell("ul-unrated", "userllm", exclude=True),
        cell("ul-h200", "userllm", history=200),
        cell("ul-free", "userllm", shortlist=0),
        cell("tp", "textprompt"),
        cell("tp-unrated", "textprompt", exclude=True),
        cell("tp-h200", "textprompt", history=200),
    ]
    pairs = {(a["cell"], b["cell"]) for a, b in comparable_pairs(cells)}
    assert pairs == {("ul", "tp"), ("ul-unrated", "tp-unrated"), ("ul-h200", "tp-h200")}


def test_shuffled_histories_hold_the_same_events_and_are_scored_beside_the_run(
    synthetic_ds, text_lm_dir, tmp_path, run_cli
):
    """``shuffle_history``: each test window's events in a seeded random order (the same events, for the
    encoder and for TP's lines), scored into RUN/shuffled-SEED, which `userllm compare` pairs with the run."""
    data = TaskData(
        synthetic_ds, load_backbone(str(text_lm_dir)).tokenizer, task="favorite_genre", method="userllm", max_history=6
    )
    examples = data.examples("test")
    plain = data.user_batch(examples)
    data.shuffle_seed = 0
    shuffled = data.user_batch(examples)
    assert all(sorted(plain["item"][i].tolist()) == sorted(shuffled["item"][i].tolist()) for i in range(len(examples)))
    assert not torch.equal(plain["item"], shuffled["item"]) and torch.equal(
        shuffled["item"], data.user_batch(examples)["item"]
    )
    lines = data.history_lines(examples[0].user_idx, examples[0].start, examples[0].end)
    data.shuffle_seed = None
    assert sorted(lines) == sorted(data.history_lines(examples[0].user_idx, examples[0].start, examples[0].end))
    llm = UserLLMConfig(backbone=str(text_lm_dir), strategy="enc", cross_attention_every=1)
    run = tmp_path / "run"
    train(
        TrainConfig(
            dataset=synthetic_ds.root,
            out=run,
            task="favorite_genre",
            llm=llm,
            encoder="random",
            max_history=6,
            train_examples=8,
            batch_size=4,
            eval_batch_size=8,
        )
    )
    ordered = evaluate(run, users=10, seed=1)
    m = evaluate(run, users=10, seed=1, shuffle_history=0)
    assert m["shuffled_history"] == 0 and m["examples"] == ordered["examples"] == 10
    assert (run / "shuffled-0" / "records.jsonl").exists() and m["scoring_id"] != ordered["scoring_id"]
    assert json.loads((run / "metrics.json").read_text())["scoring_id"] == ordered["scoring_id"]  # untouched
    code, out, err = run_cli("compare", run, run / "shuffled-0")
    assert code == 0 and "paired over 10 users" in " ".join(out.split()), err
