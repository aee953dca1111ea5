import pytest
import torch

from userllm.llm.connectors import GatedCrossAttentionBlock, PerceiverResampler, Projector


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
