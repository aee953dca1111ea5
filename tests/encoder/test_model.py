import pytest
import torch

from tests.encoder.conftest import C, R, V, random_batch, tiny_encoder
from userllm.encoder.model import EncoderState


def test_shapes(encoder):
    batch = random_batch(3, 10, lengths=[10, 4, 7])
    h, mask = encoder(batch)
    assert h.shape == (3, 10, encoder.cfg.d_model) and mask.shape == (3, 10)
    assert mask.sum(1).tolist() == [10, 4, 7]
    assert encoder.item_logits(h).shape == (3, 10, V)
    assert encoder.item_logits(h, torch.tensor([2, 5])).shape == (3, 10, 2)
    assert encoder.rating_logits(h).shape == (3, 10, R) and encoder.category_logits(h).shape == (3, 10, C)


def test_causal(encoder):
    """Changing a later event never changes an earlier embedding."""
    batch = random_batch(2, 10)
    h, _ = encoder(batch)
    changed = {k: v.clone() for k, v in batch.items()}
    for v in changed.values():
        v[:, 6] = (v[:, 6] + 1) % 5 + 2
    h2, _ = encoder(changed)
    torch.testing.assert_close(h2[:, :6], h[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(h2[:, 6:], h[:, 6:])


def test_padding_invariance(encoder):
    """A timeline's embeddings do not depend on how much padding follows it."""
    batch = random_batch(1, 6)
    h, _ = encoder(batch)
    padded = {k: torch.cat([v, torch.zeros(1, 5, dtype=v.dtype)], 1) for k, v in batch.items()}
    h_pad, mask = encoder(padded)
    torch.testing.assert_close(h_pad[:, :6], h, rtol=0, atol=1e-6)
    assert mask[0].tolist() == [True] * 6 + [False] * 5


def test_incremental_equals_full(encoder):
    """Appending events one at a time with cached keys/values equals a full recompute."""
    batch = random_batch(2, 9)
    full, _ = encoder(batch)
    state = EncoderState()
    first = {k: v[:, :5] for k, v in batch.items()}
    outs = [encoder(first, state)[0]]
    for t in range(5, 9):
        outs.append(encoder({k: v[:, t : t + 1] for k, v in batch.items()}, state)[0])
    assert state.length == 9
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_alibi_replaces_the_position_table_by_a_recency_bias():
    """ALiBi has no learned positions; with steep slopes each event attends to itself alone, so its embedding
    is the one it has as a timeline of one event; at slope 0 the same weights read the earlier events."""
    enc = tiny_encoder(positions="alibi")
    assert not any(".pos." in k for k in enc.state_dict()) and "stacks.fused.pos.weight" in tiny_encoder().state_dict()
    batch = random_batch(1, 6)
    alone = torch.cat([enc({k: v[:, t : t + 1] for k, v in batch.items()})[0] for t in range(6)], 1)
    for block in enc.stacks["fused"].blocks:
        block.attn.slopes.fill_(1e4)
    torch.testing.assert_close(enc(batch)[0], alone, rtol=1e-5, atol=1e-5)
    for block in enc.stacks["fused"].blocks:
        block.attn.slopes.zero_()
    assert not torch.allclose(enc(batch)[0][:, 1:], alone[:, 1:], atol=1e-3)


def test_too_long_timeline_is_an_error():
    enc = tiny_encoder()
    with pytest.raises(ValueError, match="longer than max_len=12"):
        enc(random_batch(1, 13))


def test_early_and_late_differ_in_structure():
    early, late = tiny_encoder(fusion="early"), tiny_encoder(fusion="late")
    assert list(early.stacks) == ["fused"] and list(late.stacks) == ["item", "rating", "category", "time_gap"]
    assert late.num_parameters() > early.num_parameters()


def test_encode_is_eval_and_no_grad():
    enc = tiny_encoder()
    enc.train()
    h, _ = enc.encode(random_batch(1, 4))
    assert not h.requires_grad and enc.training


def test_items_scored_by_the_output_itself_unless_a_head_is_asked_for():
    """SASRec scoring, the default when d_model == d_feature: item logits are h E^T, with no head weights."""
    enc = tiny_encoder(d_model=8)
    h = torch.randn(2, 3, 8)
    torch.testing.assert_close(enc.item_logits(h), h @ enc.embed.item.weight.T, rtol=0, atol=0)
    assert not any(k.startswith("item_head") for k in enc.state_dict())
    assert tiny_encoder(d_model=8, item_head=True).item_head.weight.shape == (8, 8)
    assert tiny_encoder().item_head.weight.shape == (8, 16)  # d_model != d_feature: always a head


def test_next_item_logprobs_are_the_distribution_next_items_ranks(encoder):
    """log p(next item): a distribution over the catalogue without padding and unknown, whose order is the one
    next_items ranks by (also without the history's items)."""
    batch = random_batch(3, 6, lengths=[6, 4, 2], seed=3)
    logp = encoder.next_item_logprobs(batch)
    assert logp.shape == (3, V) and torch.isinf(logp[:, :2]).all()
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3))
    top = encoder.next_items(batch, 5)
    assert torch.equal(top, logp.topk(5, -1).indices)
    unseen = encoder.next_items(batch, 5, exclude_history=True)
    assert not any(set(row.tolist()) & set(items.tolist()) for row, items in zip(unseen, batch["item"]))
