"""evaluate-encoder and embed through the CLI, on a tiny synthetic run."""

import json

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from userllm.data import PreparedDataset
from userllm.encoder.data import Timelines
from userllm.encoder.evaluate import popularity_scores, rank_split
from userllm.encoder.pretrained import load_encoder

TINY = "-s encoder.d_model=16 -s encoder.d_feature=8 -s encoder.n_layers=1 -s encoder.max_len=12 -s batch_size=16 -s warmup_steps=2".split()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("ee")
    cli = [sys.executable, "-m", "userllm.cli"]
    subprocess.run(
        [*cli, "prepare", "--source", "synthetic", "--synthetic-users", "40", "--synthetic-items", "50"]
        + ["--max-history", "12", "--out", str(root / "ds")],
        check=True,
        capture_output=True,
    )
    for name, extra in (("run", []), ("items", ["--features", "item"])):
        subprocess.run(
            [*cli, "pretrain", str(root / "ds"), "--out", str(root / name), "--epochs", "2", *TINY, *extra],
            check=True,
            capture_output=True,
        )
    return root


def test_evaluate_encoder_report(run, run_cli):
    code, stdout, stderr = run_cli("evaluate-encoder", run / "run", "--compare", run / "items")
    assert code == 0, stderr
    report = json.loads((run / "run" / "metrics.json").read_text())
    assert set(report["results"]) == {"popularity", "random-init encoder", "run (this run)", "items"}
    for res in report["results"].values():
        assert set(res) >= {"valid/unmasked", "valid/masked", "test/unmasked", "test/masked"}
        assert sum(b["users"] for b in res["test/masked"]["by_history_length"].values()) == report["users"]
    assert "| popularity | masked (history excluded) |" in stdout and "RecBole protocol" in stdout
    assert (run / "run" / "metrics.md").read_text().startswith("Dataset")


def test_masking_never_helps_history_items_and_keeps_target(run):
    """Masked ranks are never worse than unmasked (history items can only move out of the way)."""
    ds = PreparedDataset(run / "ds")
    tl = Timelines.from_dataset(ds)
    pop = popularity_scores(tl, ds.num_items)
    unmasked, _ = rank_split(pop, tl, "test", 12, masked=False)
    masked, _ = rank_split(pop, tl, "test", 12, masked=True)
    assert (masked <= unmasked).all() and (masked < unmasked).any()


def test_embed_parquet_and_shards(run, run_cli):
    code, _, stderr = run_cli("embed", run / "run", run / "ds", "--out", run / "emb.parquet")
    assert code == 0, stderr
    table = pl.read_parquet(run / "emb.parquet")
    ds = PreparedDataset(run / "ds")
    expected_rows = int(np.minimum(ds.sequences["length"].to_numpy(), 12).sum())
    assert table.height == expected_rows and len(table["embedding"][0]) == 16
    manifest = json.loads((run / "emb.manifest.json").read_text())
    assert len(manifest["model_sha256"]) == 64 and manifest["users"] == ds.sequences.height

    code, _, _ = run_cli("embed", run / "run", run / "ds", "--out", run / "shards")
    assert code == 0
    shard = load_file(run / "shards" / "embeddings-00000.safetensors")
    index = json.loads((run / "shards" / "index.json").read_text())
    assert index["shards"][0]["users"] == [0, ds.sequences.height]
    # the shard equals a direct encode of user 0's last window
    model = load_encoder(run / "run")
    tl = Timelines.from_dataset(ds)
    n = int(tl.lengths[0])
    start = max(0, n - 12)
    h, _ = model.encode(tl.collate(np.array([0]), np.array([start]), np.array([n])))
    torch.testing.assert_close(shard["embeddings"][0, : n - start], h[0], rtol=0, atol=1e-6)
    row0 = table.filter(pl.col("user_idx") == 0).sort("pos")
    assert row0["pos"].to_list() == list(range(start, n))
    np.testing.assert_allclose(np.stack(row0["embedding"].to_numpy()), h[0].numpy(), atol=1e-6)

    code, _, stderr = run_cli("embed", run / "run", run / "ds", "--out", run / "shards")
    assert code == 2 and "--force" in stderr


def test_load_gives_an_encoder_run_that_embeds_as_embed_writes(run):
    """``userllm.load`` of a pretrain run: its encoder, config and dataset; ``embed`` gives each user's
    per-event embeddings of their last max_len events, the rows `userllm embed` writes."""
    import userllm

    loaded = userllm.load(run / "run")
    assert isinstance(loaded, userllm.EncoderRun) and not loaded.encoder.training
    assert loaded.cfg.encoder.d_model == 16 and loaded.dataset.root == (run / "ds").resolve()
    ids = loaded.dataset.sequences.get_column("user_id").to_list()[:3]
    vectors = loaded.embed(ids)
    table = pl.read_parquet(run / "emb.parquet") if (run / "emb.parquet").exists() else None
    tl = Timelines.from_dataset(loaded.dataset)
    for u, user_id in enumerate(ids):
        n = int(tl.lengths[u])
        start = max(0, n - 12)
        h, _ = loaded.encoder.encode(tl.collate(np.array([u]), np.array([start]), np.array([n])))
        torch.testing.assert_close(vectors[user_id], h[0], rtol=0, atol=1e-6)
        if table is not None:
            rows = table.filter(pl.col("user_id") == user_id).sort("pos")
            np.testing.assert_allclose(np.stack(rows["embedding"].to_numpy()), vectors[user_id].numpy(), atol=1e-6)
    with pytest.raises(userllm.errors.InputError, match="not in dataset"):
        loaded.embed(["nobody"])
