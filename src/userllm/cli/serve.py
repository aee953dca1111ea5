"""``userllm serve`` and ``userllm store``: the HTTP service and its event store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from userllm.cli.common import app, err, out
from userllm.errors import UserError
from userllm.serve.protocol import ServeConfig


@app.command()
def serve(
    run: Annotated[Path, typer.Argument(help="a `userllm train` run directory (User-LLM or TP)")],
    db: Annotated[
        Optional[str],
        typer.Option(
            help="event store URL: sqlite:///PATH or postgresql+psycopg://...", show_default="sqlite file RUN/events.db"
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="address to bind (0.0.0.0 exposes it to the network)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[
        Optional[str],
        typer.Option(envvar="USERLLM_API_KEY", help="require `Authorization: Bearer KEY` (env USERLLM_API_KEY)"),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="chat requests decoded together")] = ServeConfig.max_batch,
    max_wait_ms: Annotated[
        float, typer.Option(help="how long a batch waits for more requests")
    ] = ServeConfig.max_wait_ms,
    max_tokens: Annotated[
        int, typer.Option(help="the longest completion a request may ask for (and the default)")
    ] = ServeConfig.max_tokens,
    allow_unknown_users: Annotated[
        bool,
        typer.Option(
            "--allow-unknown-users",
            help="answer users without events (or without `user`) unpersonalized instead of 404/400",
        ),
    ] = ServeConfig.allow_unknown_users,
    cache_dir: Annotated[Optional[Path], typer.Option(help="also keep users' contexts on disk here")] = None,
    refresh_interval: Annotated[
        float,
        typer.Option(help="seconds between two refreshes of one user's cached context while their events stream in"),
    ] = 1.0,
    weights: Annotated[
        str,
        typer.Option(
            help="the backbone's weights: float32 (as trained) or int4 (its decoder "
            "layers 4-bit: faster decoding on CPU; exact for SmolLM2 Q4_1)"
        ),
    ] = "float32",
    bf16: Annotated[
        Optional[bool],
        typer.Option(
            "--bf16/--fp32",
            help="compute under bf16 autocast, users' contexts included",
            show_default="as the run trained",
        ),
    ] = None,
    cache_bytes: Annotated[
        str,
        typer.Option(
            help="memory for cached user state, least recently used out: User-LLM's contexts, or a TP run's "
            "history prefixes as KV cache (e.g. 1G, 512M; 0: no TP prefix cache, no limit on contexts)"
        ),
    ] = "1G",
    max_memory_gb: Annotated[
        Optional[float],
        typer.Option(
            help="memory one batch of chats may use, GiB: a batch that would not fit is decoded in parts",
            show_default="80% of the memory available, less 128 MiB",
        ),
    ] = None,
    max_prompt_tokens: Annotated[
        Optional[int],
        typer.Option(help="reject longer prompts with a 400 before any model work", show_default="the model's context"),
    ] = ServeConfig.max_prompt_tokens,
    request_timeout: Annotated[
        float, typer.Option(help="seconds a chat may take before it is ended with an error (504)")
    ] = ServeConfig.request_timeout_s,
    shutdown_grace: Annotated[
        float, typer.Option(help="on SIGTERM or Ctrl-C: seconds in-flight requests get to finish before they are ended")
    ] = 30.0,
) -> None:
    """Serve a trained run over HTTP: OpenAI's Chat Completions, personalized by `user`, over an event store."""
    import threading

    import uvicorn

    from userllm.serve.app import create_app
    from userllm.serve.engine import Engine
    from userllm.serve.protocol import ServeConfig
    from userllm.serve.store import EventStore, sqlite_url_beside

    if port < 0 or port > 65535:
        raise UserError(f"--port {port}: expected 0-65535")
    if max_memory_gb is not None and max_memory_gb <= 0:
        raise UserError(f"--max-memory-gb {max_memory_gb:g}: expected GiB > 0")
    store = EventStore(db or sqlite_url_beside(run))
    if refresh_interval < 0:
        raise UserError(f"--refresh-interval {refresh_interval}: expected seconds >= 0")
    engine = Engine(
        run,
        store,
        cache_dir=cache_dir,
        refresh_interval=refresh_interval,
        weights=weights,
        bf16=bf16,
        cache_bytes=parse_bytes(cache_bytes, "--cache-bytes") or None,
        max_memory_gb=max_memory_gb,
    )
    if engine.quantized:
        q = engine.quantized
        err.print(
            f"int4 weights: {q['layers']} layers, {q['float_bytes'] / 1e6:.0f} MB -> {q['int4_bytes'] / 1e6:.0f} MB, "
            f"largest weight change {q['max_error']:.3g}",
            highlight=False,
        )
    cfg = ServeConfig(
        api_key=api_key,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_tokens=max_tokens,
        allow_unknown_users=allow_unknown_users,
        max_prompt_tokens=max_prompt_tokens,
        request_timeout_s=request_timeout,
    )
    longest = cfg.max_prompt_tokens or engine.context_length
    if longest:
        engine.check_memory(longest + cfg.max_tokens)
    err.print(
        f"serving {engine.name} ({engine.method}{', bf16' if engine.bf16 else ''}) on http://{host}:{port}/v1 "
        f"with the event store {store.url}" + ("" if api_key else " (no API key)"),
        highlight=False,
        soft_wrap=True,
    )

    # SIGTERM or Ctrl-C: stop accepting, give in-flight requests --shutdown-grace seconds, then end the rest
    # with a 503 (a streaming client gets the error event and [DONE]), run the app's shutdown (the cache
    # flushed, the store closed) and exit 0. uvicorn alone would re-raise the signal and die by it.
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()
            if not hasattr(self, "ending"):
                self.ending = threading.Timer(shutdown_grace, engine.stop_decoding)
                self.ending.daemon = True
                self.ending.start()

    config = uvicorn.Config(
        create_app(engine, cfg),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=shutdown_grace + 10,  # a backstop: connections still open then are closed
    )
    Server(config).run()
    err.print(f"stopped {engine.name}; the store is closed", highlight=False)


def parse_bytes(text: str, name: str) -> int:
    """``1G``, ``512M``, ``64K`` or a plain number of bytes (binary units), or a clear error."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(value[-1:], 1)
    try:
        number = float(value[:-1] if scale > 1 else value)
    except ValueError:
        raise UserError(f"{name} {text!r}: expected a size such as 1G, 512M or 1073741824") from None
    if number < 0:
        raise UserError(f"{name} {text!r}: expected a size >= 0")
    return int(number * scale)


store_app = typer.Typer(help="The event store behind `userllm serve`.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("import")
def store_import(
    dataset: Annotated[Path, typer.Argument(help="a prepared dataset directory")],
    db: Annotated[str, typer.Option(help="event store URL: sqlite:///PATH or postgresql+psycopg://...")],
) -> None:
    """Load a prepared dataset's timelines into the event store (idempotent), so a run serves its users at once."""
    from userllm.data.dataset import PreparedDataset
    from userllm.progress import progress_bar
    from userllm.serve.store import EventStore, import_dataset

    ds = PreparedDataset(dataset)
    store = EventStore(db)
    with progress_bar("events") as progress:
        task = progress.add_task(f"importing {dataset}", total=ds.events.height)
        total = import_dataset(store, ds, progress=lambda n: progress.advance(task, n))
    out.print(
        f"[green]imported[/green] {ds.events.height:,} events of {ds.sequences.height:,} users; "
        f"the store holds {total:,} events of {store.users():,} users"
    )
