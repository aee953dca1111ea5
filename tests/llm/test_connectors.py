import pytest
import torch

from userllm.llm.connectors import (GatedCrossAttentionBlock, MaskedCrossAttention, PerceiverResampler, Projector,
                                    first_token_embeddings)


def test_projector_shape():
    assert Projector(d_in=8, d_out=24)(torch.randn(2, 5, 8)).shape == (2, 5, 24)


def test_zero_gates_are_identity_and_gradients_reach_gates():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(dim=16, heads=4)
    x, ctx = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = block(x, ctx, context_mask=mask)
    assert torch.equal(out, x)
    out.sum().backward()
    assert block.attn_gate.grad is not None and block.attn_gate.grad.abs() > 0


def test_cross_attention_ignores_masked_context_and_precomputed_kv_matches():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(dim=16, heads=4)
    with torch.no_grad():
        block.attn_gate.fill_(1.0), block.ff_gate.fill_(1.0)
    x, ctx = torch.randn(1, 3, 16), torch.randn(1, 5, 16)
    mask = torch.tensor([[1, 1, 0, 0, 0]], dtype=torch.bool)
    changed = ctx.clone()
    changed[:, 2:] = torch.randn(1, 3, 16) * 100
    a = block(x, ctx, context_mask=mask)
    torch.testing.assert_close(block(x, changed, context_mask=mask), a)
    kv = block.attn.context_kv(ctx)
    torch.testing.assert_close(block(x, None, context_mask=mask, kv=kv), a)
    empty = block(x, ctx, context_mask=torch.zeros(1, 5, dtype=torch.bool))
    assert torch.isfinite(empty).all()


def test_absorbed_context_equals_keys_and_values():
    """Folding a context into the query/output projections changes the cost, not the output: padding,
    a fully padded row (zeros) and every head included."""
    torch.manual_seed(0)
    attn = GatedCrossAttentionBlock(dim=32, heads=4).attn
    x, ctx = torch.randn(3, 7, 32), torch.randn(3, 5, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    kv = attn.context_kv(ctx)
    absorbed = attn.absorb(kv, mask)
    assert absorbed.qk.shape == (3, 32, 4 * 5) and absorbed.ov.shape == (3, 4 * 5, 32)
    expected = attn(x, None, mask, kv)
    torch.testing.assert_close(attn(x, None, mask, absorbed), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(attn(x, None, mask, absorbed)[2], torch.zeros(7, 32))
    # d = 32, 4 heads: only while 4 n < 32, and only for enough tokens to pay for absorbing (11 t > 7 x 32)
    assert attn.absorbs(7, tokens=21) and not attn.absorbs(7, tokens=20) and not attn.absorbs(8, tokens=1000)


def test_identity_values_read_the_attention_weighted_mean_of_the_entries():
    """identity_values: at init the block's read is sum_j p_j ctx_j (every head's share of the entries' own
    coordinates), with the queries and keys, and so the random state after the block, as without."""
    torch.manual_seed(0)
    plain = GatedCrossAttentionBlock(dim=16, heads=4).attn
    after_plain = torch.rand(1)
    torch.manual_seed(0)
    attn = GatedCrossAttentionBlock(dim=16, heads=4, identity_values=True).attn
    assert torch.equal(torch.rand(1), after_plain) and torch.equal(attn.to_q.weight, plain.to_q.weight)
    assert torch.equal(attn.to_kv.weight[:16], plain.to_kv.weight[:16])
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    q = attn.to_q(attn.norm(x)).view(2, 3, 4, 4).transpose(1, 2)
    k = attn.to_kv(ctx)[..., :16].view(2, 5, 4, 4).transpose(1, 2)
    p = ((q @ k.transpose(-1, -2)) / 2).masked_fill(~mask[:, None, None], float("-inf")).softmax(-1)  # (b, h, t, n)
    expected = torch.einsum("bhtn,bnhe->bthe", p, ctx.view(2, 5, 4, 4)).reshape(2, 3, 16)
    torch.testing.assert_close(attn(x, ctx, mask), expected)
    assert not torch.allclose(plain(x, ctx, mask), expected)
    with pytest.raises(ValueError, match="identity_values"):
        MaskedCrossAttention(dim=16, heads=4, dim_context=8, identity_values=True)


@pytest.mark.parametrize("depth", [1, 2])
def test_perceiver_ignores_padded_events(depth):
    torch.manual_seed(0)
    perceiver = PerceiverResampler(dim=16, num_latents=4, depth=depth, heads=4).eval()
    x = torch.randn(1, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    out = perceiver(x, mask)
    assert out.shape == (1, 4, 16)
    noisy = x.clone()
    noisy[:, 4:] = torch.randn(1, 2, 16) * 50
    torch.testing.assert_close(perceiver(noisy, mask), out)
    torch.testing.assert_close(perceiver(x[:, :4], mask[:, :4]), out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(perceiver(x, torch.ones(1, 6, dtype=torch.bool)), out)


def test_first_token_embeddings_are_the_first_rows_zero_padded():
    class Tok:  # one token per character, ids 'a' = 1 ...
        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": [ord(ch) - 96 for ch in text]})()

    emb = torch.nn.Embedding(30, 4)
    out = first_token_embeddings(Tok(), emb, ["", "ab", "abcde"], 3)
    assert out.shape == (3, 3, 4) and out[0].eq(0).all() and out[1, 2].eq(0).all()
    torch.testing.assert_close(out[2], emb.weight[[1, 2, 3]].detach())
    torch.testing.assert_close(out[1, :2], emb.weight[[1, 2]].detach())


def test_block_without_feed_forward_adds_only_what_it_reads_from_the_context():
    """ff_mult=0: with open gates, a context the block cannot read (fully masked) leaves the hidden states
    exactly as they were; with the feed-forward branch the same block moves them, whoever the user is."""
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    unread = torch.zeros(2, 5, dtype=torch.bool)
    bare = GatedCrossAttentionBlock(dim=16, heads=4, ff_mult=0, gate_init=0.5)
    assert bare.ff is None and bare.ff_gate is None and set(bare.gate_report()) == {"attn_gate"}
    assert torch.equal(bare(x, ctx, context_mask=unread), x)
    assert not torch.allclose(bare(x, ctx, context_mask=~unread), x)
    dense = GatedCrossAttentionBlock(dim=16, heads=4, ff_mult=2, gate_init=0.5)
    assert not torch.allclose(dense(x, ctx, context_mask=unread), x)


def test_scale_to_hidden_multiplies_the_read_by_each_tokens_hidden_rms():
    """scale_to_hidden: the gated attention output times the token's hidden-state RMS, so hidden states 100x
    larger receive a 100x larger read of the same context; closed gates are still the identity."""
    torch.manual_seed(0)
    x, ctx, mask = torch.randn(2, 3, 16), torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    plain = GatedCrossAttentionBlock(dim=16, heads=4, ff_mult=0, gate_init=0.5)
    scaled = GatedCrossAttentionBlock(dim=16, heads=4, ff_mult=0, gate_init=0.5, scale_to_hidden=True)
    scaled.load_state_dict(plain.state_dict())
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(scaled(x, ctx, context_mask=mask) - x, (plain(x, ctx, context_mask=mask) - x) * rms)
    big = x * 100  # LayerNorm'd queries: the same attention, a 100x larger read
    torch.testing.assert_close(scaled(big, ctx, context_mask=mask) - big, (scaled(x, ctx, context_mask=mask) - x) * 100,
                               rtol=1e-4, atol=1e-4)
    closed = GatedCrossAttentionBlock(dim=16, heads=4, scale_to_hidden=True)
    assert torch.equal(closed(big, ctx, context_mask=mask), big)
