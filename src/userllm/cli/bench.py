"""``userllm bench``: the benchmarks that print their figures side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from userllm.cli.common import app, out
from userllm.errors import UserError

bench_app = typer.Typer(help="Benchmarks that print their figures side by side.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def ints(text: str, name: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers (an option's value), or a clear error."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--{name} expects comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"--{name} values must be positive, got {text!r}")
    return values


@bench_app.command("efficiency")
def bench_efficiency(
    out_dir: Annotated[Path, typer.Option("--out", help="directory for efficiency.json / .md / .png")] = Path(
        "runs/bench-efficiency"
    ),
    backbone: Annotated[str, typer.Option(help="smollm2-135m, a local HF directory or a hub id")] = "smollm2-135m",
    dataset: Annotated[
        Optional[Path], typer.Option(help="prepared dataset for the timelines", show_default="MovieLens-100K")
    ] = None,
    lengths: Annotated[str, typer.Option(help="comma-separated history lengths")] = "10,25,50,100,200,500",
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,8",
    repeats: Annotated[int, typer.Option(help="warm runs per latency figure")] = 5,
    cache_repeats: Annotated[int, typer.Option(help="paired runs of cached serving vs the plain backbone")] = 10,
    quick: Annotated[
        bool, typer.Option("--quick", help="lengths 10,50,200,500, batch 1, 2 repeats (a few minutes)")
    ] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out")] = False,
) -> None:
    """User-LLM vs the text prompt: tokens, FLOPs, latency and memory per request, and cached serving."""
    from userllm.bench.efficiency import markdown, run_efficiency

    sizes, hist = ints(batch_sizes, "batch-sizes"), ints(lengths, "lengths")
    if quick:
        sizes, hist, repeats = (1,), (10, 50, 200, 500), 2
    report = run_efficiency(
        out=out_dir,
        backbone=backbone,
        dataset=dataset,
        lengths=hist,
        batch_sizes=sizes,
        repeats=repeats,
        cache_length=200 if 200 in hist else max(hist),
        cache_repeats=cache_repeats,
        device=device,
        force=force,
    )
    print(markdown(report))
    out.print(f"wrote {out_dir}/efficiency.json, efficiency.md, efficiency.png")


@bench_app.command("serve")
def bench_serve(
    out_dir: Annotated[Path, typer.Option("--out", help="directory for serve.json / .md / .png")] = Path(
        "runs/bench-serve"
    ),
    dataset: Annotated[Path, typer.Option(help="prepared dataset whose users are served")] = Path("outputs/ml-100k"),
    backbone: Annotated[str, typer.Option(help="smollm2-135m, a local HF directory or a hub id")] = "smollm2-135m",
    history: Annotated[int, typer.Option(help="events per user (users with fewer are not asked)")] = 200,
    max_tokens: Annotated[int, typer.Option(help="tokens of every answer")] = 16,
    append_seconds: Annotated[float, typer.Option(help="length of the append phase")] = 10.0,
    weights: Annotated[str, typer.Option(help="every server's backbone weights (`userllm serve --weights`)")] = "int4",
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out")] = False,
) -> None:
    """User-LLM vs TP served over HTTP to 1, 4 and 16 concurrent clients: requests/s, latency, TTFT, appends."""
    from userllm.bench.serve import markdown, run_serve_bench

    report = run_serve_bench(
        out_dir,
        dataset=dataset,
        backbone=backbone,
        history=history,
        max_tokens=max_tokens,
        append_seconds=append_seconds,
        weights=weights,
        force=force,
    )
    print(markdown(report))
    out.print(f"wrote {out_dir}/serve.json, serve.md, serve.png")


@bench_app.command("prefix")
def bench_prefix(
    out_dir: Annotated[Path, typer.Option("--out", help="directory for prefix.json / .md / .png")] = Path(
        "runs/bench-prefix"
    ),
    backbone: Annotated[str, typer.Option(help="smollm2-135m, a local HF directory or a hub id")] = "smollm2-135m",
    dataset: Annotated[
        Optional[Path], typer.Option(help="prepared dataset for the timelines", show_default="MovieLens-100K")
    ] = None,
    lengths: Annotated[str, typer.Option(help="comma-separated history lengths")] = "50,200,500",
    repeats: Annotated[int, typer.Option(help="warm runs per latency figure")] = 3,
    cache_gib: Annotated[float, typer.Option(help="the cache budget of each method in the replay, GiB")] = 1.0,
    users: Annotated[str, typer.Option(help="comma-separated active-user counts of the replay")] = "100,1000,10000",
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out")] = False,
) -> None:
    """TP with its history's KV prefix cached against User-LLM's cached context: bytes per user, hit / miss
    and appended-event costs, and a many-users replay through each method's LRU cache."""
    from userllm.bench.prefix import markdown, run_prefix

    report = run_prefix(
        out=out_dir,
        dataset=dataset,
        backbone=backbone,
        lengths=ints(lengths, "lengths"),
        repeats=repeats,
        budget_bytes=int(cache_gib * 2**30),
        users=ints(users, "users"),
        force=force,
    )
    print(markdown(report))
    out.print(f"wrote {out_dir}/prefix.json, prefix.md, prefix.png")


@bench_app.command("users")
def bench_users(
    prefix: Annotated[Path, typer.Option(help="the prefix.json of `userllm bench prefix` (the costs the replay uses)")],
    out_dir: Annotated[Path, typer.Option("--out", help="directory for users.json / .md")] = Path("runs/bench-users"),
    dataset: Annotated[Path, typer.Option(help="prepared dataset whose timelines the users copy")] = Path(
        "outputs/ml-100k"
    ),
    backbone: Annotated[str, typer.Option(help="smollm2-135m, a local HF directory or a hub id")] = "smollm2-135m",
    users: Annotated[int, typer.Option(help="active users in the store")] = 100,
    chats: Annotated[int, typer.Option(help="chat requests in the trace (and one append per ten)")] = 40,
    history: Annotated[int, typer.Option(help="events per user (the served window, full)")] = 200,
    cache_gib: Annotated[float, typer.Option(help="each server's --cache-bytes, GiB")] = 1.0,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out")] = False,
) -> None:
    """Many active users served live by User-LLM and by TP with prefix caching, one request trace for both,
    beside what the replay of `userllm bench prefix` predicts for the same trace."""
    from userllm.bench.users import markdown, run_users_bench

    report = run_users_bench(
        out_dir,
        dataset=dataset,
        prefix=prefix,
        backbone=backbone,
        users=users,
        chats=chats,
        history=history,
        cache_bytes=int(cache_gib * 2**30),
        force=force,
    )
    print(markdown(report))
    out.print(f"wrote {out_dir}/users.json, users.md")
