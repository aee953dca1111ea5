"""The command line's defaults are the configs' defaults: every option of ``prepare``, ``pretrain`` and
``train`` that shows a default shows its config field's, and passing nothing leaves the config's default
in place (the options only override)."""

from __future__ import annotations

import pytest
import typer.main

from userllm.cli import app
from userllm.cli.common import config_default
from userllm.config import PrepareConfig, PretrainConfig, TrainConfig

# option -> the config field it sets, per command
FIELDS = {
    "prepare": (
        PrepareConfig,
        {
            "source": "source",
            "out_dir": "out",
            "max_history": "max_history",
            "rating_threshold": "rating_threshold",
            "min_user_events": "min_user_events",
            "min_item_events": "min_item_events",
            "train_examples_per_user": "train_examples_per_user",
            "synthetic_users": "synthetic.num_users",
            "synthetic_items": "synthetic.num_items",
            "synthetic_genres": "synthetic.num_genres",
            "synthetic_events": "synthetic.mean_events",
            "seed": "synthetic.seed",
            "strict": "strict",
        },
    ),
    "pretrain": (
        PretrainConfig,
        {
            "out_dir": "out",
            "fusion": "encoder.fusion",
            "features": "encoder.features",
            "epochs": "epochs",
            "device": "device",
            "bf16": "bf16",
            "seed": "seed",
            "time_budget": "time_budget_s",
        },
    ),
    "train": (
        TrainConfig,
        {
            "task": "task",
            "method": "method",
            "mode": "llm.mode",
            "perceiver_latents": "llm.perceiver_latents",
            "strategy": "llm.strategy",
            "encoder": "encoder",
            "max_history": "max_history",
            "train_examples": "train_examples",
            "backbone": "llm.backbone",
            "out_dir": "out",
            "device": "device",
            "bf16": "bf16",
            "seed": "seed",
            "max_memory_gb": "max_memory_gb",
        },
    ),
}


def command(name: str):
    return typer.main.get_command(app).commands[name]


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_shown_default_is_the_configs(name):
    model, fields = FIELDS[name]
    shown = {p.name: p.show_default for p in command(name).params if p.param_type_name == "option"}
    for option, dotted in fields.items():
        default = config_default(model, dotted)
        want = ",".join(map(str, default)) if isinstance(default, list) else str(default)
        assert shown[option] == want, f"userllm {name} --{option}: shows {shown[option]!r}, the config says {want!r}"
    # an option that shows a default of its own must be one of the config's
    own = {o for o, s in shown.items() if isinstance(s, str)} - set(fields)
    assert not own, f"userllm {name}: options {sorted(own)} show defaults that are not a config field's"


def test_train_without_options_keeps_every_config_default(monkeypatch, run_cli, tmp_path):
    """``userllm train DATASET`` hands the trainer the config's defaults (the help once said 256 examples
    while the config trained 1,024)."""
    seen = {}

    def capture(cfg, **kwargs):
        seen["cfg"] = cfg
        return {}

    monkeypatch.setattr("userllm.tasks.train.train", capture)
    code, _, err = run_cli("train", str(tmp_path))
    assert code == 0, err
    got = seen["cfg"].model_dump(mode="json")
    want = TrainConfig(dataset=tmp_path).model_dump(mode="json")
    assert got == want
    code, _, err = run_cli("train", str(tmp_path), "--train-examples", "7", "--strategy", "lora", "--fp32")
    assert code == 0, err
    assert (seen["cfg"].train_examples, seen["cfg"].llm.strategy, seen["cfg"].bf16) == (7, "lora", False)


def test_serve_defaults_are_the_servers():
    """``userllm serve``'s batching and limit flags default to :class:`ServeConfig`'s values."""
    from userllm.serve.protocol import ServeConfig

    defaults = {p.name: p.default for p in command("serve").params}
    for name in ("max_batch", "max_wait_ms", "max_tokens", "allow_unknown_users"):
        assert defaults[name] == getattr(ServeConfig(), name), name
