"""Runs that fit the machine: training micro-batches and scoring batches sized to the memory, a run that
cannot fit refused before it starts, and training under a real memory limit (``RLIMIT_DATA``)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import save_tiny_llama
from userllm.config import PrepareConfig, SyntheticConfig, TrainConfig, UserLLMConfig
from userllm.data.prepare import prepare_dataset
from userllm.memory import RESERVED
from userllm.tasks.data import TaskData
from userllm.tasks.evaluate import evaluate
from userllm.tasks.train import train


def spy_batches(monkeypatch) -> list[list]:
    """Every list of examples :meth:`TaskData.batch` is given from now on."""
    seen, batch = [], TaskData.batch

    def spy(self, part, **kw):
        seen.append(list(part))
        return batch(self, part, **kw)

    monkeypatch.setattr(TaskData, "batch", spy)
    return seen


def test_training_sizes_micro_batches_to_its_memory_and_refuses_what_cannot_fit(
    synthetic_ds, text_lm_dir, tmp_path, run_cli
):
    """Without micro_batch_size, a batch is split into the largest micro-batches whose estimated memory fits
    (here max_memory_gb holds two examples of four): the same losses as micro-batches of one. A budget that
    holds no example stops before training, exit 2, nothing written."""
    llm = UserLLMConfig(backbone=str(text_lm_dir), strategy="lora")
    common = dict(
        dataset=synthetic_ds.root,
        task="favorite_genre",
        method="textprompt",
        llm=llm,
        max_history=8,
        train_examples=8,
        batch_size=4,
        lr=3e-3,
    )
    ones = train(TrainConfig(out=tmp_path / "ones", micro_batch_size=1, **common))
    per_example = ones["memory"]["estimate_bytes_per_example"]
    assert ones["memory"]["micro_batch_size"] == 1 and ones["memory"]["peak_rss_bytes"] > 0
    limited = train(TrainConfig(out=tmp_path / "limited", max_memory_gb=2.5 * per_example / 2**30, **common))
    assert limited["memory"]["micro_batch_size"] == 2
    assert limited["losses"] == pytest.approx(ones["losses"], rel=1e-5)
    code, _, err = run_cli(
        "train",
        synthetic_ds.root,
        "--task",
        "favorite_genre",
        "--method",
        "textprompt",
        "--strategy",
        "lora",
        "--backbone",
        text_lm_dir,
        "-s",
        f"max_memory_gb={0.5 * per_example / 2**30}",
        "--out",
        tmp_path / "none",
    )
    message = " ".join(err.split())
    assert code == 2 and "needs about" in message and "max_memory_gb" in message and "tokens" in message
    assert not (tmp_path / "none").exists()


def test_scoring_takes_batches_that_fit_the_memory(synthetic_ds, text_lm_dir, tmp_path, monkeypatch):
    """Scoring batches hold at most eval_batch_size prompts, fewer when their estimated memory (KV caches
    for the beams) exceeds max_memory_gb: here one prompt at a time, with the same answers."""
    from userllm.llm.budget import inference_bytes
    from userllm.tasks.pipeline import Pipeline

    llm = UserLLMConfig(backbone=str(text_lm_dir), strategy="lora")
    run = tmp_path / "run"
    train(
        TrainConfig(
            dataset=synthetic_ds.root,
            out=run,
            task="favorite_genre",
            method="textprompt",
            llm=llm,
            max_history=6,
            train_examples=4,
            batch_size=4,
            eval_batch_size=4,
        )
    )
    whole = evaluate(run, users=8, seed=1)
    sizes = spy_batches(monkeypatch)
    loaded = Pipeline.from_pretrained(run)
    longest = max(len(loaded.data.tokens(ex.prompt)) for ex in loaded.data.examples("test"))
    one = inference_bytes(loaded.model, longest, copies=5)  # the longest prompt with the beams' caches
    tight = evaluate(run, users=8, seed=1, force=True, max_memory_gb=1.5 * one / 2**30)
    assert sizes and max(len(b) for b in sizes) == 1
    assert tight["metrics"] == whole["metrics"]


@pytest.fixture(scope="module")
def long_histories(tmp_path_factory, text_lm_dir) -> tuple[Path, Path]:
    """A dataset of long timelines (TP prompts of ~500 tokens) and a wider tiny Llama (hidden 256) with the
    test tokenizer: about 40 MB to back-propagate one prompt, so that a batch of 8 is ~300 MB."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("long")
    prepare_dataset(
        PrepareConfig(
            source="synthetic",
            out=root / "ds",
            max_history=48,
            train_examples_per_user=1,
            synthetic=SyntheticConfig(num_users=16, num_items=30, num_genres=4, mean_events=60),
        )
    )
    save_tiny_llama(
        root / "lm", AutoTokenizer.from_pretrained(text_lm_dir), hidden_size=256, mlp_ratio=4, max_positions=2048
    )
    return root / "ds", root / "lm"


def train_limited(ds: Path, lm: Path, out: Path, limit: int, *sets: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``userllm train`` TP, two steps of 8 examples, in a process whose private data may not pass ``limit`` bytes
    (``RLIMIT_DATA``, as ``ulimit -d``); its result and summary (empty where it failed)."""
    cmd = [sys.executable, "-c", "from userllm.cli import main; main()", "train", str(ds), "--task", "favorite_genre"]
    cmd += ["--method", "textprompt", "--strategy", "lora", "--backbone", str(lm), "--max-history", "48"]
    cmd += ["-s", "train_examples=16", "-s", "batch_size=8", "--out", str(out)]
    for s in sets:
        cmd += ["-s", s]
    done = subprocess.run(
        cmd,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit)),
        capture_output=True,
        text=True,
    )
    summary = out / "summary.json"
    return done, json.loads(summary.read_text()) if summary.exists() else {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc are Linux's")
def test_training_under_a_memory_limit_fits_its_micro_batches_to_it(long_histories, tmp_path):
    """Under a real limit (``RLIMIT_DATA``) that a batch of 8 TP prompts does not fit, a run whose
    micro_batch_size is set to 8 runs out of memory (one clear message, no traceback), and the same run with
    micro_batch_size unset splits its batch to fit and finishes with the losses of micro-batches of one."""
    from userllm.memory import available_bytes

    ds, lm = long_histories
    generous = 3 * 2**30
    if available_bytes() < generous + 2**30:
        pytest.skip("needs 4 GiB free")
    ones, summary = train_limited(ds, lm, tmp_path / "ones", generous, "micro_batch_size=1")
    assert ones.returncode == 0, ones.stderr
    plan = summary["memory"]
    mapped = generous - plan["available_bytes"]  # what the process had mapped when it planned
    # room for 3 examples at once (the plan takes 80%); a batch of 8 needs about 10 examples' room
    limit = mapped + RESERVED + 4 * plan["estimate_bytes_per_example"]

    eight, _ = train_limited(ds, lm, tmp_path / "eight", limit, "micro_batch_size=8")
    message = " ".join(eight.stderr.split())
    assert eight.returncode == 1 and "ran out of memory" in message and "Traceback" not in message, message
    assert not (tmp_path / "eight" / "summary.json").exists()

    fitted, summary = train_limited(ds, lm, tmp_path / "fitted", limit)
    assert fitted.returncode == 0, fitted.stderr
    assert 1 < summary["memory"]["micro_batch_size"] < 8 and len(summary["losses"]) == 2
    assert summary["losses"] == pytest.approx(json.loads((tmp_path / "ones" / "summary.json").read_text())["losses"])
