"""The ``userllm`` command line. Every user error prints one clear message and exits non-zero."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from userllm.config import SOURCES, PrepareConfig, load_config
from userllm.errors import UserError

app = typer.Typer(
    name="userllm",
    help="User-LLM: personalize LLMs with user embeddings (arXiv 2402.13598).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML file of config fields; flags override it")]


@app.command()
def prepare(
    paths: Annotated[Optional[list[Path]], typer.Argument(help="input files or directories of the source")] = None,
    source: Annotated[Optional[str], typer.Option(help=f"one of: {', '.join(SOURCES)} [default: movielens-100k]")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="prepared dataset directory to create")] = None,
    max_history: Annotated[Optional[int], typer.Option(help="history window before each target [default: 50]")] = None,
    rating_threshold: Annotated[Optional[float], typer.Option(help="keep events rated at least this")] = None,
    min_user_events: Annotated[Optional[int], typer.Option(help="k-core: minimum events per user [default: 0, off]")] = None,
    min_item_events: Annotated[Optional[int], typer.Option(help="k-core: minimum events per item [default: 0, off]")] = None,
    train_examples_per_user: Annotated[Optional[int], typer.Option(help="labelled train targets per user [default: 5]")] = None,
    synthetic_users: Annotated[Optional[int], typer.Option(help="synthetic: number of users")] = None,
    synthetic_items: Annotated[Optional[int], typer.Option(help="synthetic: number of items")] = None,
    synthetic_genres: Annotated[Optional[int], typer.Option(help="synthetic: number of genres")] = None,
    synthetic_events: Annotated[Optional[float], typer.Option(help="synthetic: mean events per user")] = None,
    seed: Annotated[Optional[int], typer.Option(help="synthetic: random seed")] = None,
    strict: Annotated[Optional[bool], typer.Option("--strict/--lenient", help="stop at the first malformed row")] = None,
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
            "source": source, "paths": [str(p) for p in paths] if paths else None, "out": out_dir,
            "max_history": max_history, "rating_threshold": rating_threshold,
            "min_user_events": min_user_events, "min_item_events": min_item_events,
            "train_examples_per_user": train_examples_per_user, "strict": strict, "force": force or None,
            "synthetic.num_users": synthetic_users, "synthetic.num_items": synthetic_items,
            "synthetic.num_genres": synthetic_genres, "synthetic.mean_events": synthetic_events,
            "synthetic.seed": seed,
        },
    )  # fmt: skip
    manifest = prepare_dataset(cfg)
    out.print(summary(manifest))
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


def main() -> None:
    """Console entry point: user errors become one message and a non-zero exit, never a traceback."""
    try:
        app()
    except UserError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]: no partial output was kept")
        sys.exit(130)
    except OSError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
