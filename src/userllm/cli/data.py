"""``userllm prepare`` and ``userllm inspect``: raw logs to prepared timelines, and a look at them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from userllm.cli.common import ConfigOpt, app, config_option, err, out
from userllm.config import PrepareConfig, load_config
from userllm.errors import UserError


@app.command()
def prepare(
    paths: Annotated[Optional[list[Path]], typer.Argument(help="input files or directories of the source")] = None,
    source: Annotated[Optional[str], config_option(PrepareConfig, "source")] = None,
    out_dir: Annotated[Optional[Path], config_option(PrepareConfig, "out", "--out")] = None,
    max_history: Annotated[Optional[int], config_option(PrepareConfig, "max_history")] = None,
    rating_threshold: Annotated[Optional[float], config_option(PrepareConfig, "rating_threshold")] = None,
    min_user_events: Annotated[Optional[int], config_option(PrepareConfig, "min_user_events")] = None,
    min_item_events: Annotated[Optional[int], config_option(PrepareConfig, "min_item_events")] = None,
    train_examples_per_user: Annotated[Optional[int], config_option(PrepareConfig, "train_examples_per_user")] = None,
    synthetic_users: Annotated[Optional[int], config_option(PrepareConfig, "synthetic.num_users")] = None,
    synthetic_items: Annotated[Optional[int], config_option(PrepareConfig, "synthetic.num_items")] = None,
    synthetic_genres: Annotated[Optional[int], config_option(PrepareConfig, "synthetic.num_genres")] = None,
    synthetic_events: Annotated[Optional[float], config_option(PrepareConfig, "synthetic.mean_events")] = None,
    seed: Annotated[Optional[int], config_option(PrepareConfig, "synthetic.seed")] = None,
    strict: Annotated[Optional[bool], config_option(PrepareConfig, "strict", "--strict/--lenient")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out")] = False,
    config: ConfigOpt = None,
) -> None:
    """Turn raw interaction logs into a prepared dataset of user timelines."""
    from userllm.data.inspect import summary
    from userllm.data.prepare import prepare_dataset

    cfg = load_config(
        PrepareConfig,
        config,
        {
            "source": source,
            "paths": [str(p) for p in paths] if paths else None,
            "out": out_dir,
            "max_history": max_history,
            "rating_threshold": rating_threshold,
            "min_user_events": min_user_events,
            "min_item_events": min_item_events,
            "train_examples_per_user": train_examples_per_user,
            "strict": strict,
            "force": force or None,
            "synthetic.num_users": synthetic_users,
            "synthetic.num_items": synthetic_items,
            "synthetic.num_genres": synthetic_genres,
            "synthetic.mean_events": synthetic_events,
            "synthetic.seed": seed,
        },
    )
    manifest = prepare_dataset(cfg)
    out.print(summary(manifest))
    for warning in manifest["warnings"]:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    out.print(f"[green]prepared[/green] {cfg.out} in {manifest['elapsed_s']:.1f} s")


@app.command()
def inspect(
    dataset: Annotated[Path, typer.Argument(help="a prepared dataset directory")],
    users: Annotated[int, typer.Option(help="how many example timelines to show")] = 3,
    events: Annotated[int, typer.Option(help="events shown per timeline (the most recent)")] = 8,
    user: Annotated[Optional[str], typer.Option(help="show this user_id's timeline")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the whole manifest as JSON instead")] = False,
) -> None:
    """Print a prepared dataset's manifest summary and a few timelines in readable form."""
    from userllm.data.dataset import PreparedDataset
    from userllm.data.inspect import summary, timelines

    ds = PreparedDataset(dataset)
    if as_json:
        print(json.dumps(ds.manifest, indent=2, ensure_ascii=False))
        return
    out.print(summary(ds.manifest))
    tables = timelines(ds, users=users, events=events, user_id=user)
    if user is not None and not tables:
        raise UserError(f"user_id {user!r} is not in {dataset}")
    for table in tables:
        out.print(table)
