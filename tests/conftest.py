"""Shared fixtures. Every data fixture is written by the tests themselves (never copies of real datasets);
real public files are read in place from the team's shared data folder (``real_file``)."""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import pytest

from userllm.config import PrepareConfig, SyntheticConfig
from userllm.data.dataset import PreparedDataset
from userllm.data.prepare import prepare_dataset


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path``; gzip it when the name ends in ``.gz``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode(encoding)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


# real files as released (../shared/data beside the repository; USERLLM_SHARED_DATA to point elsewhere)
SHARED_DATA = Path(os.environ.get("USERLLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def real_file(relative: str) -> Path:
    """A real data file from the shared data folder; the test is skipped (saying where it looked) without it."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"real data file {path} is not here (set USERLLM_SHARED_DATA to the shared data folder)")
    return path


def jsonl(records: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def flags(*on: int) -> str:
    return "|".join("1" if i in on else "0" for i in range(19))


@pytest.fixture
def ml100k_dir(tmp_path: Path) -> Path:
    """A tiny ml-100k layout: 3 users, 4 items, a latin-1 title, and 3 malformed rating lines."""
    d = tmp_path / "ml-100k"
    rows = [
        "1\t10\t5\t100",
        "1\t20\t3\t200",
        "1\t30\t4\t300",
        "1\t40\t2\t300",
        "2\t10\t4\t150",
        "2\t30\t5\t250",
        "2\t40\t1\t350",
        "3\t20\t2\t120",
        "3\t10\t3\t220",
        "3\t30\t4\t320",
        "3\t40\t5\t420",
        "3\t40\t5",  # line 12: wrong field count
        "3\t10\tfive\t500",  # line 13: non-numeric rating
        "3\t20\t4\tyesterday",  # line 14: bad timestamp
    ]
    write(d / "u.data", "\n".join(rows) + "\n")
    items = [
        f"10|Café Society (1995)|01-Jan-1995||http://x|{flags(5, 8)}",
        f"20|Toy Story (1995)|01-Jan-1995||http://x|{flags(3, 4, 5)}",
        f"30|Heat (1995)|01-Jan-1995||http://x|{flags(1, 6, 16)}",
        f"40|Mystery Film (1996)|01-Jan-1996||http://x|{flags(0)}",
    ]
    write(d / "u.item", "\n".join(items) + "\n", encoding="latin-1")
    return d


@pytest.fixture
def cfg_for(tmp_path: Path):
    """Build a PrepareConfig writing under tmp_path."""

    def make(source: str, *paths: Path, **kw) -> PrepareConfig:
        return PrepareConfig(source=source, paths=list(paths), out=tmp_path / "out", **kw)

    return make


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run ``userllm ARGS...`` in-process through the real entry point; returns (exit code, stdout, stderr)."""
    from userllm import cli

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["userllm", *map(str, args)])
        code = 0
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def synthetic_ds(tmp_path_factory) -> PreparedDataset:
    out = tmp_path_factory.mktemp("data") / "syn"
    prepare_dataset(
        PrepareConfig(
            source="synthetic",
            out=out,
            max_history=8,
            train_examples_per_user=2,
            synthetic=SyntheticConfig(num_users=24, num_items=30, num_genres=4, mean_events=10),
        )
    )
    return PreparedDataset(out)


@pytest.fixture(scope="session")
def text_lm_dir(tmp_path_factory, synthetic_ds) -> Path:
    """A tiny Llama whose byte-level BPE tokenizer was trained on the dataset's titles, genres and reviews."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = synthetic_ds.item_titles + synthetic_ds.vocab["category"]
    corpus += [t for t in synthetic_ds.examples.get_column("review_text").to_list() if t]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    out = tmp_path_factory.mktemp("lm") / "tiny-bpe"
    save_tiny_llama(out, fast)
    return out


def save_tiny_llama(out: Path, tokenizer, hidden_size: int = 32, mlp_ratio: int = 2, max_positions: int = 1024) -> None:
    """A seeded 2-layer Llama of ``hidden_size`` (its MLP ``mlp_ratio`` times wider) for ``tokenizer``, saved
    with it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * mlp_ratio,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
