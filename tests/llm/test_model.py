"""UserLLM on tiny random Llama and GPT-2 configs (offline), both modes, all four strategies."""

import pytest
import torch

from tests.encoder.conftest import random_batch, tiny_encoder
from tests.llm.conftest import tiny_gpt2, tiny_llama
from userllm.config import UserLLMConfig
from userllm.encoder.model import top_items
from userllm.errors import InputError
from userllm.llm.backbone import decoder_layers
from userllm.llm.connectors import AbsorbedContext
from userllm.llm.model import UserLLM

MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
MODES = ["cross_attention", "soft_prompt"]


def word_tables(names, d=32) -> dict[str, torch.Tensor]:
    """Random stand-ins for the item-words tables (V items of tiny_encoder, width d)."""
    g = torch.Generator().manual_seed(7)
    return {name: torch.randn(30, d, generator=g) for name in names}


def build(arch="llama", **kw) -> UserLLM:
    torch.manual_seed(1)
    cfg = UserLLMConfig(**({"cross_attention_every": 1} | kw))
    return UserLLM(
        cfg, encoder=tiny_encoder(), llm=MAKERS[arch](), item_words=word_tables(UserLLM.word_tables_needed(cfg))
    )


def prompts(b=2, t=6, lengths=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for i, n in enumerate(lengths or []):
        ids[i, : t - n], mask[i, : t - n] = 0, 0  # left padding
    return ids, mask


@pytest.mark.parametrize("arch", MAKERS)
def test_zero_gates_reproduce_base_llm_exactly(arch):
    model = build(arch).eval()
    ids, mask = prompts()
    base = MAKERS[arch]()(input_ids=ids, attention_mask=mask).logits
    out = model(random_batch(2, 5, lengths=[5, 3]), ids, mask).logits
    assert torch.equal(out, base)


@pytest.mark.parametrize("arch", MAKERS)
@pytest.mark.parametrize("mode", MODES)
def test_cached_equals_uncached_generation(arch, mode):
    model = build(arch, mode=mode, perceiver_latents=3 if mode == "soft_prompt" else 0)
    with torch.no_grad():  # open the gates so the user context matters
        for block in model.xattn.values():
            block.attn_gate.fill_(0.8), block.ff_gate.fill_(0.5)
    ids, mask = prompts(lengths=[6, 4])
    users = random_batch(2, 5, lengths=[5, 2])
    a = model.generate(users, ids, mask, max_new_tokens=6, use_cache=True)
    b = model.generate(users, ids, mask, max_new_tokens=6, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("events", [5, 9])  # 4 heads x 5 < d = 32: absorbed context; 4 x 9 >= 32: keys/values
def test_forward_without_gradients_matches_training_forward(events):
    """Without gradients the blocks read the absorbed context where it is cheaper; the logits do not change."""
    model = build()
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.fill_(0.8), block.ff_gate.fill_(0.5)
    ids, mask = prompts(t=12, lengths=[12, 4])  # 12 tokens pay for absorbing 5 entries (d = 32, 4 heads)
    users = random_batch(2, events, lengths=[events, 2])
    read = []  # what the first block reads in each forward
    decoder_layers(model.llm)[0].register_forward_pre_hook(lambda *_: read.append(type(model._active.kv["0"]).__name__))
    trained = model(users, ids, mask).logits
    with torch.no_grad():
        served = model(users, ids, mask).logits
    torch.testing.assert_close(served, trained, rtol=1e-5, atol=1e-5)
    assert read == ["ContextKV", "AbsorbedContext" if events == 5 else "ContextKV"]


def test_beam_search_over_an_absorbed_context_matches_keys_and_values():
    """Beams repeat the absorbed context row by row (UserContext.select keeps its kind)."""
    from userllm.llm.decoding import TokenTrie, constrained_beam_search

    model = build(perceiver_latents=3)
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.fill_(0.8), block.ff_gate.fill_(0.5)
    ids, mask = prompts(t=12, lengths=[12, 9])
    users = random_batch(2, 5, lengths=[5, 2])
    trie = TokenTrie([[5, 6], [5, 7, 8], [9], [10, 11], [12]], eos_token_id=2)
    found = {}
    for absorbed in (True, False):
        with torch.set_grad_enabled(not absorbed), model.conditioned(users, ids, mask) as (embeds, m):
            assert isinstance(next(iter(model._active.kv.values())), AbsorbedContext) == absorbed
            found[absorbed] = constrained_beam_search(model, embeds.detach(), m, trie, beams=3)
    assert [[i for i, _ in row] for row in found[True]] == [[i for i, _ in row] for row in found[False]]
    for a, b in zip(found[True], found[False]):
        torch.testing.assert_close(
            torch.tensor([s for _, s in a]), torch.tensor([s for _, s in b]), rtol=1e-5, atol=1e-5
        )


def test_beam_search_with_a_trie_per_row_ranks_each_rows_own_sequences():
    """One trie per row (each user's shortlist): each row answers only from its own trie, exactly as a search
    of that row alone with its trie does; with beams >= its sequences, all of them, best first."""
    from userllm.llm.decoding import TokenTrie, constrained_beam_search

    model = build()
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.fill_(0.8)
    ids, mask = prompts(lengths=[6, 6])
    users = random_batch(2, 5, lengths=[5, 3])
    tries = [TokenTrie([[5, 6], [9]], eos_token_id=2), TokenTrie([[5, 7, 8], [10, 11], [12], [5, 6]], eos_token_id=2)]
    with torch.no_grad(), model.conditioned(users, ids, mask) as (embeds, m):
        both = constrained_beam_search(model, embeds, m, tries, beams=4)
    assert sorted(i for i, _ in both[0]) == [0, 1] and sorted(i for i, _ in both[1]) == [0, 1, 2, 3]
    for r in range(2):
        one = {k: v[r : r + 1] for k, v in users.items()}
        with torch.no_grad(), model.conditioned(one, ids[r : r + 1], mask[r : r + 1]) as (embeds, m):
            alone = constrained_beam_search(model, embeds, m, tries[r], beams=4)[0]
        assert [i for i, _ in alone] == [i for i, _ in both[r]]
        torch.testing.assert_close(torch.tensor([s for _, s in alone]), torch.tensor([s for _, s in both[r]]))
    with pytest.raises(ValueError, match="1 tries for 2 rows"):
        constrained_beam_search(model, embeds.expand(2, -1, -1), m.expand(2, -1), tries[:1], beams=2)


@pytest.mark.parametrize("arch", MAKERS)
@pytest.mark.parametrize("mode", MODES)
def test_exact_ranking_equals_beam_search_with_a_beam_per_sequence(arch, mode):
    """rank_sequences scores every sequence of a row by the log-probability of sequence + eos after the
    prefix: the ranking and scores a constrained beam search with as many beams as sequences finds, for
    left-padded rows of different lengths, each with its own sequences (a shortlist per user), packed into
    one continuation per row, under an absorbed cross-attention context."""
    from userllm.llm.decoding import TokenTrie, constrained_beam_search, prefill, rank_sequences

    model = build(arch, mode=mode, perceiver_latents=3)  # 3 latents: the blocks read an absorbed context
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.fill_(0.8), block.ff_gate.fill_(0.5)
    ids, mask = prompts(b=3, t=12, lengths=[12, 7, 9])
    users = random_batch(3, 5, lengths=[5, 2, 4])
    rows = [[[5, 6], [9], [5, 7, 8], [10, 11, 12, 13]], [[5, 7, 8], [10, 11], [12]], [[9], [14, 15], [5, 6], [16]]]
    tries = [TokenTrie(r, eos_token_id=2) for r in rows]
    with torch.no_grad(), model.conditioned(users, ids, mask) as (embeds, m):
        beams = constrained_beam_search(model, embeds, m, tries, beams=4)
    with torch.no_grad(), model.conditioned(users, ids, mask) as (embeds, m):
        exact = rank_sequences(model, embeds, m, rows, eos_token_id=2, prefilled=prefill(model, embeds, m)[0])
    assert [[i for i, _ in row] for row in exact] == [[i for i, _ in row] for row in beams]
    assert [len(row) for row in exact] == [4, 3, 4]
    for a, b in zip(exact, beams):
        torch.testing.assert_close(
            torch.tensor([s for _, s in a]), torch.tensor([s for _, s in b]), rtol=1e-4, atol=1e-4
        )
    with pytest.raises(ValueError, match="one non-empty list of non-empty sequences per prefix row"):
        rank_sequences(model, embeds, m, rows[:2], eos_token_id=2)


@pytest.mark.parametrize("arch", MAKERS)
@pytest.mark.parametrize("mode", MODES)
def test_batch_equals_single_under_left_padding(arch, mode):
    model = build(arch, mode=mode)
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.fill_(0.8)
    ids, mask = prompts(lengths=[6, 3])
    users = random_batch(2, 5, lengths=[5, 2])
    batched = model.generate(users, ids, mask, max_new_tokens=5)
    for i in range(2):
        n = int(mask[i].sum())
        single = model.generate(
            {k: v[i : i + 1, : 5 if i == 0 else 2] for k, v in users.items()},
            ids[i : i + 1, -n:],
            mask[i : i + 1, -n:],
            max_new_tokens=5,
        )
        assert torch.equal(single[0], batched[i])


def test_user_context_matters_and_nothing_survives_a_call():
    model = build(mode="soft_prompt")
    ids, mask = prompts(b=1)
    a = model(random_batch(1, 5, seed=1), ids, mask).logits
    b = model(random_batch(1, 5, seed=2), ids, mask).logits
    assert not torch.allclose(a, b)
    xa = build()
    xa(random_batch(1, 5), ids, mask)
    assert xa._active is None


EXPECTED = {
    "full": {"encoder", "projector+perceiver", "cross-attention blocks", "llm"},
    "lora": {"encoder", "projector+perceiver", "cross-attention blocks", "llm"},
    "enc": {"encoder", "projector+perceiver", "cross-attention blocks"},
    "proj": {"projector+perceiver", "cross-attention blocks"},
}


@pytest.mark.parametrize("arch", MAKERS)
@pytest.mark.parametrize("strategy", EXPECTED)
def test_strategy_trains_exactly_its_parameters(arch, strategy):
    model = build(arch, strategy=strategy, cross_attention_every=2)
    groups = model.parameter_groups()
    assert {g for g, (trainable, _) in groups.items() if trainable} == EXPECTED[strategy]
    if strategy == "lora":
        assert 0 < groups["llm"][0] < groups["llm"][1] // 10
        assert all("lora_" in n for n, p in model.llm.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids, mask = prompts()
    with torch.no_grad():
        for block in model.xattn.values():  # nonzero gates so that every trainable part gets a gradient
            block.attn_gate.fill_(0.5), block.ff_gate.fill_(0.5)
    model(random_batch(2, 5), ids, mask, labels=ids).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            continue
        assert torch.equal(p, before[n]), f"frozen {n} changed"
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed


@pytest.mark.parametrize("strategy", ["full", "lora", "enc", "proj"])
def test_save_load_round_trip_exact(tmp_path, strategy):
    model = build("llama", strategy=strategy, perceiver_latents=2, item_words=["title", "category"], candidates=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids, mask = prompts()
    users = random_batch(2, 5)
    for _ in range(2):
        opt.zero_grad()
        model(users, ids, mask, labels=ids).loss.backward()
        opt.step()
    model.eval()
    expected = model(users, ids, mask).logits
    model.save(tmp_path / "saved")
    loaded = UserLLM.load(
        tmp_path / "saved", llm=tiny_llama(), encoder=model.encoder if strategy == "proj" else None
    ).eval()
    assert torch.equal(loaded(users, ids, mask).logits, expected)
    saved = set(model.trained_state_dict())
    assert any(k.startswith("llm.") for k in saved) == (strategy in ("full", "lora"))
    assert any(k.startswith("encoder.") for k in saved) == (strategy != "proj")
    if strategy == "proj":
        with pytest.raises(InputError, match="does not save the frozen encoder"):
            UserLLM.load(tmp_path / "saved", llm=tiny_llama())


def test_full_strategy_saves_tied_embeddings_once(tmp_path):
    """SmolLM2 ties its embeddings to the LM head: saved once, and both are restored exactly."""
    torch.manual_seed(1)
    model = UserLLM(
        UserLLMConfig(strategy="full", cross_attention_every=2, item_words=[]),
        encoder=tiny_encoder(),
        llm=tiny_llama(tie=True),
    )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids, mask = prompts()
    users = random_batch(2, 5)
    model(users, ids, mask, labels=ids).loss.backward()
    opt.step()
    model.eval()
    model.save(tmp_path / "saved")
    saved = model.trained_state_dict()
    assert ("llm.lm_head.weight" in saved) != ("llm.model.embed_tokens.weight" in saved)
    loaded = UserLLM.load(tmp_path / "saved", llm=tiny_llama(tie=True)).eval()
    assert torch.equal(loaded(users, ids, mask).logits, model(users, ids, mask).logits)


def test_bad_cross_attention_layers():
    with pytest.raises(InputError, match="outside 0..3"):
        build(cross_attention_layers=[1, 7])


def test_perceiver_ignores_padded_events_end_to_end():
    """Padded events (item 0) after a user's timeline change nothing, whatever their other features hold."""
    model = build(mode="soft_prompt", perceiver_latents=3).eval()
    ids, mask = prompts(b=1)
    users = random_batch(1, 6, lengths=[4])
    expected = model(users, ids, mask).logits
    noisy = {k: v.clone() for k, v in users.items()}
    noisy["rating"][:, 4:], noisy["time_gap"][:, 4:] = 5, 9  # padding positions keep item 0
    torch.testing.assert_close(model(noisy, ids, mask).logits, expected, rtol=0, atol=1e-6)
    shorter = {k: v[:, :4] for k, v in users.items()}
    torch.testing.assert_close(model(shorter, ids, mask).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_both_modes_learn_a_history_only_task(mode):
    """The answer token depends only on the user's history (items 2-9 -> token 10, items 10-17 -> token 11).

    Trained with ``full``: a frozen tiny random LM cannot be confident about any token (its 0.02-scale head
    after RMSNorm moves logits by about 1), whatever the connectors do. The prompt is the same for both
    classes, so a loss below ln 2 is only reachable through the user context."""
    torch.manual_seed(0)
    model = build(mode=mode, strategy="full")
    g = torch.Generator().manual_seed(0)
    cls = torch.randint(0, 2, (32,), generator=g)
    items = torch.randint(2, 10, (32, 6), generator=g) + 8 * cls[:, None]
    users = {"item": items, "rating": torch.full_like(items, 3), "time_gap": torch.full_like(items, 2)}
    ids = torch.tensor([[5, 6, 7, 9]]).repeat(32, 1)
    ids[:, -1] = 10 + cls
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(80):
        loss = model(users, ids, mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3, (losses[0], losses[-1])  # below ln 2: only possible by reading the history
    logits = model.eval()(users, ids[:, :-1], mask[:, :-1]).logits[:, -1]
    assert (logits[:, 10:12].argmax(1) == cls).float().mean() > 0.9


@pytest.mark.parametrize("mode", MODES)
def test_sampling_is_seeded_and_top1_is_greedy(mode):
    model = build(mode=mode)
    ids, mask = prompts(lengths=[6, 4])
    users = random_batch(2, 5)

    def sample(seed, **kw):
        return model.generate(
            users,
            ids,
            mask,
            max_new_tokens=6,
            do_sample=True,
            generator=torch.Generator().manual_seed(seed),
            **kw,
        )

    assert torch.equal(sample(3, temperature=1.5), sample(3, temperature=1.5))
    assert not all(torch.equal(sample(3, temperature=1.5), sample(s, temperature=1.5)) for s in (4, 5, 6))
    assert torch.equal(sample(7, top_k=1), model.generate(users, ids, mask, max_new_tokens=6))


def test_generation_stops_rows_at_eos():
    model = build()
    ids, mask = prompts()
    users = random_batch(2, 5)
    free = model.generate(users, ids, mask, max_new_tokens=6)
    eos = int(free[0, 1])
    out = model.generate(users, ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    first = (out[0] == eos).nonzero()[0].item()
    assert (out[0, first + 1 :] == 0).all()


def test_item_words_start_as_the_words_and_move_each_event():
    """Each event's context entry adds its item's words through identity-initialised maps (tables frozen);
    the tables are needed, and the event context changes with the item."""
    model = build(item_words=["category"])
    users = random_batch(1, 4)
    h, _ = model.encoder(users)
    table = model.item_words.table_category
    expected = model.projector(h) + table[users["item"]]
    torch.testing.assert_close(model.event_context(h, users["item"]), expected)
    assert not table.requires_grad and model.item_words.maps["category"].weight.requires_grad
    with pytest.raises(InputError, match="need their tables"):
        UserLLM(UserLLMConfig(item_words=["title"]), encoder=tiny_encoder(), llm=tiny_llama())


def test_gate_init_sets_both_gates():
    model = build(gate_init=0.3)
    assert all(
        b.attn_gate.item() == pytest.approx(0.3) and b.ff_gate.item() == pytest.approx(0.3)
        for b in model.xattn.values()
    )


def test_candidates_are_the_encoders_top_items_in_words():
    """k extra context entries: the titles' words of the encoder's k best items after each row's last event
    (specials never), plus a rank embedding; padding rows past the last event do not change them."""
    model = build(candidates=3, perceiver_latents=0)
    users = random_batch(2, 5, lengths=[5, 2])
    h, mask = model.encoder(users)
    ctx, cmask = model.context_from_embeddings(h, mask, users["item"])
    assert ctx.shape[1] == 5 + 3 and cmask[:, 5:].all()
    for row, last in ((0, 4), (1, 1)):
        scores = model.encoder.item_logits(h[row, last])
        scores[:2] = float("-inf")
        top = scores.topk(3).indices
        expected = model.candidates.table_title[top] + model.candidates.rank  # identity map at the start
        torch.testing.assert_close(ctx[row, 5:], expected)


def test_exclude_history_offers_no_item_of_the_history_as_a_candidate():
    """``exclude_history``: the k candidates are the encoder's best items outside the row's history window (its
    padding never counts); without it the same scores offer the history's items, which score highest here."""
    model = build(candidates=3, perceiver_latents=0)
    users = random_batch(2, 5, lengths=[5, 2])
    h, mask = model.encoder(users)
    scores = torch.randn(2, model.candidates.table_title.shape[0], generator=torch.Generator().manual_seed(0))
    for row in range(2):
        scores[row, users["item"][row]] += 100  # the history's own items are the encoder's favourites
    model.encoder.item_logits = lambda _: scores
    plain = top_items(scores, 3)
    assert all(plain[r, 0].item() in users["item"][r].tolist() for r in range(2))
    model.cfg.exclude_history = True
    ctx, _ = model.context_from_embeddings(h, mask, users["item"])
    for row in range(2):
        rest = scores[row].clone()
        rest[users["item"][row]] = float("-inf")
        rest[:2] = float("-inf")
        top = rest.topk(3).indices
        assert not set(top.tolist()) & set(users["item"][row].tolist())
        torch.testing.assert_close(ctx[row, 5:], model.candidates.table_title[top] + model.candidates.rank)


def test_a_timeline_without_events_masks_its_candidates():
    """The candidates follow the last event: a row with no event offers none (all its entries masked)."""
    model = build(candidates=3, perceiver_latents=0)
    users = random_batch(2, 5, lengths=[5, 2])
    users["item"][1] = 0
    h, mask = model.encoder(users)
    ctx, cmask = model.context_from_embeddings(h, mask, users["item"])
    assert ctx.shape[1] == 5 + 3 and cmask[0].all() and not cmask[1].any()


def test_sample_token_temperature_top_p_and_top_k():
    from userllm.llm.decoding import sample_token

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]]).repeat(400, 1)
    assert sample_token(logits, temperature=0).eq(0).all()  # greedy
    g = torch.Generator().manual_seed(0)
    assert (
        sample_token(logits, temperature=1.0, top_p=0.5, generator=g).eq(0).all()
    )  # the nucleus holds only the top token
    drawn = sample_token(logits, temperature=1.0, top_p=0.9, generator=g)
    assert set(drawn.tolist()) == {
        0,
        1,
        2,
    }  # 0.61 + 0.22 < 0.9: the third token completes the nucleus; never the fourth
    assert set(sample_token(logits, temperature=1.0, top_k=2, generator=g).tolist()) == {0, 1}
    same = [sample_token(logits[:5], temperature=1.0, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*same)  # seeded


def test_one_prefill_serves_greedy_then_beam_search_as_two_separate_decodings():
    """Evaluation runs a prompt once (``prefill``, two copies of its cache) for the greedy answer and the
    constrained search: both must equal what each finds from its own run of the prompt. A shared, not copied,
    cache would let the greedy tokens leak into the search's prefix."""
    from userllm.llm.decoding import TokenTrie, constrained_beam_search, generate_tokens, prefill

    model = build()
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.fill_(0.8), block.ff_gate.fill_(0.5)
    ids, mask = prompts(lengths=[6, 4])
    users = random_batch(2, 5, lengths=[5, 3])
    trie = TokenTrie([[5, 6], [5, 7, 8], [9], [10, 11], [12]], eos_token_id=2)
    with torch.no_grad(), model.conditioned(users, ids, mask) as (embeds, m):
        alone_greedy = generate_tokens(model, embeds, m, max_new_tokens=6)
    with torch.no_grad(), model.conditioned(users, ids, mask) as (embeds, m):
        alone_beams = constrained_beam_search(model, embeds, m, trie, beams=3)
    with torch.no_grad(), model.conditioned(users, ids, mask) as (embeds, m):
        first, second = prefill(model, embeds, m, copies=2)
        greedy = generate_tokens(model, embeds, m, max_new_tokens=6, prefilled=first)
        beams = constrained_beam_search(model, embeds, m, trie, beams=3, prefilled=second)
    assert torch.equal(greedy, alone_greedy)
    assert [[i for i, _ in row] for row in beams] == [[i for i, _ in row] for row in alone_beams]
    for a, b in zip(beams, alone_beams):
        torch.testing.assert_close(torch.tensor([s for _, s in a]), torch.tensor([s for _, s in b]))


@pytest.mark.parametrize("arch", MAKERS)
@pytest.mark.parametrize("mode", MODES)
def test_row_by_row_prefill_equals_the_padded_batch(arch, mode):
    """From ``per_row_from`` positions (TP's long prompts) ``prefill`` runs a left-padded batch row by row
    without its padding (each row under its own user context) and pads the caches back: the logits, and every
    decoding after it (greedy answer, beam search, exact ranking), equal those of one padded call."""
    from userllm.llm.decoding import TokenTrie, constrained_beam_search, generate_tokens, prefill, rank_sequences

    model = build(arch, mode=mode, perceiver_latents=3)
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.fill_(0.8), block.ff_gate.fill_(0.5)
    ids, mask = prompts(b=3, t=12, lengths=[12, 5, 9])
    users = random_batch(3, 5, lengths=[5, 2, 4])
    rows = [[[5, 6], [9], [5, 7, 8]], [[5, 7, 8], [10, 11], [12]], [[9], [14, 15], [5, 6]]]
    trie = TokenTrie(rows[0], eos_token_id=2)
    out = {}
    for per_row_from in (10_000, 0):  # one padded call; row by row
        with torch.no_grad(), model.conditioned(users, ids, mask) as (embeds, m):
            a, b, c = prefill(model, embeds, m, copies=3, per_row_from=per_row_from)
            out[per_row_from] = (
                a[0].clone(),
                generate_tokens(model, embeds, m, max_new_tokens=6, prefilled=a),
                constrained_beam_search(model, embeds, m, trie, beams=3, prefilled=b),
                rank_sequences(model, embeds, m, rows, eos_token_id=2, prefilled=c),
            )
    (logits, greedy, beams, exact), (logits1, greedy1, beams1, exact1) = out[10_000], out[0]
    torch.testing.assert_close(logits1, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy1, greedy)
    for found, found1 in ((beams, beams1), (exact, exact1)):
        assert [[i for i, _ in row] for row in found1] == [[i for i, _ in row] for row in found]
        for x, y in zip(found1, found):
            torch.testing.assert_close(
                torch.tensor([s for _, s in x]), torch.tensor([s for _, s in y]), rtol=1e-4, atol=1e-4
            )


@pytest.mark.parametrize("arch", MAKERS)
def test_lora_strategy_builds_without_warnings(arch, recwarn):
    """PEFT reads a deprecated transformers alias while wrapping the backbone; a user sees no FutureWarning."""
    build(arch, strategy="lora", cross_attention_every=2)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)], [str(w.message) for w in recwarn]
