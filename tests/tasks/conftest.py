"""A tiny synthetic dataset and a tiny random Llama with a byte-level BPE tokenizer, all built offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from userllm.config import PrepareConfig, SyntheticConfig
from userllm.data.dataset import PreparedDataset
from userllm.data.prepare import prepare_dataset


@pytest.fixture(scope="session")
def synthetic_ds(tmp_path_factory) -> PreparedDataset:
    out = tmp_path_factory.mktemp("data") / "syn"
    prepare_dataset(PrepareConfig(source="synthetic", out=out, max_history=8, train_examples_per_user=2,
                                  synthetic=SyntheticConfig(num_users=24, num_items=30, num_genres=4, mean_events=10)))  # fmt: skip
    return PreparedDataset(out)


@pytest.fixture(scope="session")
def text_lm_dir(tmp_path_factory, synthetic_ds) -> Path:
    """A tiny Llama whose byte-level BPE tokenizer was trained on the dataset's titles, genres and reviews."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    import torch

    corpus = synthetic_ds.item_titles + synthetic_ds.vocab["category"]
    corpus += [t for t in synthetic_ds.examples.get_column("review_text").to_list() if t]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    out = tmp_path_factory.mktemp("lm") / "tiny-bpe"
    LlamaForCausalLM(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out
