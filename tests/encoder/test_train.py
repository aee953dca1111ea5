import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from userllm.config import EncoderConfig, PrepareConfig, PretrainConfig, SyntheticConfig
from userllm.data import prepare_dataset
from userllm.encoder.data import Timelines, eval_inputs, train_windows
from userllm.encoder.evaluate import evaluate_split
from userllm.encoder.pretrained import load_encoder
from userllm.encoder.train import pretrain
from userllm.io import state_hash

ENC = EncoderConfig(d_model=32, d_feature=16, n_layers=1, n_heads=2, dropout=0.1, max_len=20)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "syn"
    syn = SyntheticConfig(num_users=200, num_items=200, num_genres=10, mean_events=30, seed=0)
    prepare_dataset(PrepareConfig(source="synthetic", out=out, synthetic=syn, max_history=20))
    return out


def cfg(dataset: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(dataset=dataset, out=out, encoder=ENC, epochs=4, batch_size=8, lr=3e-3, warmup_steps=5, seed=1)
    return PretrainConfig(**(base | kw))


def test_windows_cover_every_train_target_once(dataset):
    from userllm.data import PreparedDataset

    tl = Timelines.from_dataset(PreparedDataset(dataset))
    for seed, stride in ((0, None), (1, None), (0, 5), (1, 12)):
        users, starts, ends, loss_from = train_windows(tl, 20, np.random.default_rng(seed), stride)
        assert ((ends - starts) <= 20).all() and ((ends - starts) > loss_from).all()
        scored = [(u, s + p + 1, p) for u, s, e, f in zip(users, starts, ends, loss_from) for p in range(f, e - s)]
        expected = {(u, t) for u, n in enumerate(tl.lengths) for t in range(1, n - 2)}
        assert {(u, t) for u, t, _ in scored} == expected and len(scored) == len(expected)  # each target once
        if stride:  # scored targets see max_len - stride events of context (or the whole prefix)
            assert all(p >= 20 - stride or t - 1 == p for _, t, p in scored)
        batch = tl.collate(users[:4], starts[:4], ends[:4], loss_from[:4])
        assert ((batch["target_item"] > 0).sum(1).numpy() == (ends - starts - loss_from)[:4]).all()


def test_loss_falls_and_structure_is_recovered(tmp_path):
    """Planted structure (users draw items from a few preferred genres) is learned: the next genre is
    predicted far above chance and, history masked, items rank far above popularity. Needs ~2,000 steps."""
    syn = SyntheticConfig(num_users=400, num_items=200, num_genres=10, mean_events=30, drift=0.0, seed=0)
    prepare_dataset(PrepareConfig(source="synthetic", out=tmp_path / "ds", synthetic=syn, max_history=20))
    enc = ENC.model_copy(update={"features": ["item", "rating", "category"]})
    summary = pretrain(
        cfg(
            tmp_path / "ds",
            tmp_path / "run",
            encoder=enc,
            epochs=30,
            batch_size=16,
            lr=5e-3,
            warmup_steps=10,
            patience=30,
        )
    )
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[-1]["loss"] < history[0]["loss"] - 0.2
    from userllm.data import PreparedDataset
    from userllm.encoder.evaluate import encoder_scores, popularity_scores, rank_split
    from userllm.metrics import ranking_metrics

    ds = PreparedDataset(tmp_path / "ds")
    tl = Timelines.from_dataset(ds)
    model = load_encoder(tmp_path / "run" / "checkpoint")
    users, starts, ends, targets = eval_inputs(tl, "test", 20)
    h, _ = model.encode(tl.collate(users, starts, ends))
    last = h[torch.arange(len(users)), torch.from_numpy(ends - starts - 1)]
    predicted = model.category_logits(last)[:, 2:].argmax(1) + 2
    truth = model.embed.item_categories[torch.from_numpy(targets)]
    accuracy = (truth == predicted[:, None]).any(1).float().mean().item()
    assert accuracy > 0.25  # 10 genres (30% of items have a second one): chance is about 0.13
    ndcg = {
        name: ranking_metrics(rank_split(fn, tl, "test", 20, masked=True)[0])["ndcg@10"]
        for name, fn in (("pop", popularity_scores(tl, ds.num_items)), ("enc", encoder_scores(model, tl, "cpu")))
    }
    assert ndcg["enc"] > 2 * ndcg["pop"], ndcg
    assert summary["finished"]


def test_checkpoint_round_trip_exact(dataset, tmp_path):
    pretrain(cfg(dataset, tmp_path / "run", epochs=1))
    model = load_encoder(tmp_path / "run" / "checkpoint")
    saved = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    batch = {
        "item": torch.tensor([[2, 3, 4]]),
        "rating": torch.tensor([[2, 3, 4]]),
        "time_gap": torch.tensor([[1, 5, 6]]),
    }
    again = load_encoder(tmp_path / "run" / "checkpoint")
    torch.testing.assert_close(model.encode(batch)[0], again.encode(batch)[0], rtol=0, atol=0)


def test_run_saved_before_item_head_existed_loads(dataset, tmp_path):
    """A saved encoder config without ``item_head`` (written before the option) had the head: it loads."""
    pretrain(
        cfg(dataset, tmp_path / "run", epochs=1, encoder=ENC.model_copy(update={"d_model": 16, "item_head": True}))
    )
    path = tmp_path / "run" / "checkpoint" / "config.json"
    saved = json.loads(path.read_text())
    del saved["item_head"]
    path.write_text(json.dumps(saved))
    model = load_encoder(tmp_path / "run" / "checkpoint")
    assert model.cfg.item_head and "item_head.weight" in model.state_dict()


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_equals_uninterrupted(dataset, tmp_path, ema_decay):
    pretrain(cfg(dataset, tmp_path / "full", ema_decay=ema_decay))
    pretrain(cfg(dataset, tmp_path / "split", ema_decay=ema_decay), epochs_this_run=2)
    first = json.loads((tmp_path / "split" / "history.json").read_text())
    assert len(first) == 2
    pretrain(cfg(dataset, tmp_path / "split", ema_decay=ema_decay, resume=True))
    for part in ("checkpoint", "model"):  # the last weights, and the best (of the moving average, with ema_decay)
        assert state_hash(load_encoder(tmp_path / "full" / part)) == state_hash(load_encoder(tmp_path / "split" / part))
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("train_seconds", "events_per_s")} for r in h]  # noqa: E731
    full, split = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("full", "split"))
    assert strip(full) == strip(split)


def test_pretraining_is_identical_across_processes(dataset, tmp_path):
    """Two `userllm pretrain` processes with different Python hash seeds write the same weights and losses:
    every random choice is seeded, none depends on set or dict order. The summary names the machine's kernels,
    the one thing that may still differ between two machines' runs."""
    runs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"run{hash_seed}"
        cmd = [
            sys.executable,
            "-m",
            "userllm.cli",
            "pretrain",
            str(dataset),
            "--out",
            str(out),
            "--epochs",
            "1",
            "-s",
            "encoder.d_model=32",
            "-s",
            "encoder.d_feature=16",
            "-s",
            "encoder.n_layers=1",
            "-s",
            "encoder.max_len=20",
            "-s",
            "batch_size=8",
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": hash_seed}, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(out)
    assert (runs[0] / "model" / "model.safetensors").read_bytes() == (
        runs[1] / "model" / "model.safetensors"
    ).read_bytes()
    losses = [[r["loss"] for r in json.loads((run / "history.json").read_text())] for run in runs]
    assert losses[0] == losses[1]
    runtime = json.loads((runs[0] / "summary.json").read_text())["runtime"]
    assert (
        runtime["torch"] == torch.__version__ and runtime["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    )


def test_ema_is_what_is_validated_and_saved(dataset, tmp_path):
    """With ema_decay the run's model is the moving average of the weights (as checkpointed for resuming),
    not the last raw weights, and its valid NDCG@10 is the one recorded."""
    from userllm.data import PreparedDataset
    from userllm.errors import ConfigError

    summary = pretrain(cfg(dataset, tmp_path / "run", ema_decay=0.9, epochs=1))
    best, last = load_encoder(tmp_path / "run" / "model"), load_encoder(tmp_path / "run" / "checkpoint")
    ema = torch.load(tmp_path / "run" / "checkpoint" / "train_state.pt", weights_only=False)["ema"]
    assert all(torch.equal(ema[f"module.{k}"], v) for k, v in best.state_dict().items())
    assert state_hash(best) != state_hash(last)
    tl = Timelines.from_dataset(PreparedDataset(dataset))
    assert evaluate_split(best, tl, "valid", "cpu")["ndcg@10"] == pytest.approx(summary["best_valid_ndcg@10"], abs=1e-7)
    with pytest.raises(ConfigError, match="resume with the run's own ema_decay"):
        pretrain(cfg(dataset, tmp_path / "run", ema_decay=0.0, epochs=2, resume=True))


def test_refuses_existing_run(dataset, tmp_path):
    from userllm.errors import InputError, OutputExistsError

    pretrain(cfg(dataset, tmp_path / "run", epochs=1))
    with pytest.raises(OutputExistsError, match="--resume to continue it or --force"):
        pretrain(cfg(dataset, tmp_path / "run", epochs=1))
    with pytest.raises(InputError, match="no checkpoint"):
        pretrain(cfg(dataset, tmp_path / "empty", epochs=1, resume=True))


def test_sampled_softmax_trains(dataset, tmp_path):
    summary = pretrain(cfg(dataset, tmp_path / "run", epochs=3, sampled_softmax_above=0, num_negatives=16))
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[-1]["loss"] < history[0]["loss"] and summary["epochs"] == 3


def test_two_process_ddp_replicas_identical(dataset, tmp_path):
    """torchrun with 2 gloo processes: the run completes and both replicas hold identical weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        "-m",
        "userllm.cli",
        "pretrain",
        str(dataset),
        "--out",
        str(tmp_path / "ddp"),
        "--epochs",
        "2",
        "-s",
        "encoder.d_model=32",
        "-s",
        "encoder.d_feature=16",
        "-s",
        "encoder.n_layers=1",
        "-s",
        "encoder.max_len=20",
        "-s",
        "batch_size=32",
        "-s",
        "warmup_steps=2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert len(summary["replica_sha256"]) == 2 and len(set(summary["replica_sha256"])) == 1
    assert summary["epochs"] == 2


@pytest.mark.parametrize(
    "variant", [{"bf16": True}, {"encoder": ENC.model_copy(update={"fusion": "late"})}], ids=["bf16", "late"]
)
def test_bf16_and_late_fusion_train(dataset, tmp_path, variant):
    summary = pretrain(cfg(dataset, tmp_path / "run", epochs=2, **variant))
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert all(np.isfinite(r["loss"]) for r in history) and summary["epochs"] == 2
    assert load_encoder(tmp_path / "run").cfg.fusion == ("late" if "encoder" in variant else "early")


def test_text_feature_from_npy(dataset, tmp_path):
    from userllm.data import PreparedDataset
    from userllm.errors import ConfigError

    enc = ENC.model_copy(update={"features": ["item", "text"]})
    with pytest.raises(ConfigError, match="needs item_text_path"):
        pretrain(cfg(dataset, tmp_path / "a", epochs=1, encoder=enc))
    np.save(tmp_path / "bad.npy", np.zeros((3, 4)))
    with pytest.raises(ConfigError, match=r"expected shape \(\d+, text_dim\)"):
        pretrain(cfg(dataset, tmp_path / "b", epochs=1, encoder=enc, item_text_path=tmp_path / "bad.npy"))
    n = PreparedDataset(dataset).num_items
    np.save(tmp_path / "text.npy", np.random.default_rng(0).normal(size=(n, 6)))
    pretrain(cfg(dataset, tmp_path / "c", epochs=1, encoder=enc, item_text_path=tmp_path / "text.npy"))
    model = load_encoder(tmp_path / "c")
    assert model.cfg.text_dim == 6 and torch.allclose(
        model.embed.item_text[5], torch.from_numpy(np.load(tmp_path / "text.npy")[5]).float()
    )
