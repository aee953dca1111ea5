"""Stage 2 and the tasks: ``userllm train``, ``evaluate``, ``answer``, ``compare``, ``generate``, ``experiment`` and ``plot``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from userllm.cli.common import ConfigOpt, ForceRunOpt, ResumeOpt, SetOpt, app, config_option, out, parse_sets
from userllm.config import TrainConfig, load_config
from userllm.errors import InputError, OutputExistsError


@app.command()
def train(
    dataset: Annotated[Path, typer.Argument(help="a prepared dataset directory")],
    task: Annotated[Optional[str], config_option(TrainConfig, "task")] = None,
    method: Annotated[Optional[str], config_option(TrainConfig, "method")] = None,
    mode: Annotated[Optional[str], config_option(TrainConfig, "llm.mode")] = None,
    perceiver_latents: Annotated[Optional[int], config_option(TrainConfig, "llm.perceiver_latents")] = None,
    strategy: Annotated[Optional[str], config_option(TrainConfig, "llm.strategy")] = None,
    encoder: Annotated[Optional[str], config_option(TrainConfig, "encoder")] = None,
    max_history: Annotated[Optional[int], config_option(TrainConfig, "max_history")] = None,
    train_examples: Annotated[Optional[int], config_option(TrainConfig, "train_examples")] = None,
    backbone: Annotated[Optional[str], config_option(TrainConfig, "llm.backbone")] = None,
    out_dir: Annotated[Optional[Path], config_option(TrainConfig, "out", "--out")] = None,
    device: Annotated[Optional[str], config_option(TrainConfig, "device")] = None,
    bf16: Annotated[Optional[bool], config_option(TrainConfig, "bf16", "--bf16/--fp32")] = None,
    seed: Annotated[Optional[int], config_option(TrainConfig, "seed")] = None,
    max_memory_gb: Annotated[Optional[float], config_option(TrainConfig, "max_memory_gb")] = None,
    steps_this_run: Annotated[
        Optional[int], typer.Option(help="stop after this many steps (continue later with --resume)")
    ] = None,
    resume: ResumeOpt = False,
    force: ForceRunOpt = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Fine-tune User-LLM (or the text-prompt baseline) on a task (runs unchanged under torchrun)."""
    from userllm.tasks.train import train as run_train

    overrides = {
        "dataset": str(dataset),
        "out": out_dir and str(out_dir),
        "task": task,
        "method": method,
        "llm.mode": mode,
        "llm.perceiver_latents": perceiver_latents,
        "llm.strategy": strategy,
        "llm.backbone": backbone,
        "encoder": encoder,
        "max_history": max_history,
        "train_examples": train_examples,
        "device": device,
        "bf16": bf16,
        "seed": seed,
        "max_memory_gb": max_memory_gb,
        "resume": resume or None,
        "force": force or None,
    } | parse_sets(sets)
    summary = run_train(load_config(TrainConfig, config, overrides), steps_this_run=steps_this_run)
    out.print({k: v for k, v in summary.items() if k != "losses"})


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="a `userllm train` run directory")],
    users: Annotated[Optional[int], typer.Option(help="score a seeded subset of N users (saved in the run)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the user subset and of the bootstrap intervals")] = 0,
    general: Annotated[
        bool, typer.Option("--general", help="also the LLM's perplexity on general English, before/after")
    ] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda", show_default="the run's")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing metrics.json")] = False,
    extend: Annotated[
        bool,
        typer.Option(
            "--extend",
            help="keep the users records.jsonl holds (the same trained "
            "model and scoring) and score only the others, e.g. a --users subset carried "
            "on to every user; rewrites metrics.json over all of them",
        ),
    ] = False,
    shortlist: Annotated[
        Optional[int],
        typer.Option(
            min=0,
            help="next_item: rank only the stage-1 encoder's top N items per user (0: the whole catalogue)",
            show_default="the run's",
        ),
    ] = None,
    bf16: Annotated[
        Optional[bool],
        typer.Option(
            "--bf16/--fp32",
            help="score under bf16 autocast (faster or slower than float32 depending on the CPU: time both on a "
            "few users)",
            show_default="as the run trained",
        ),
    ] = None,
    max_memory_gb: Annotated[
        Optional[float],
        typer.Option(help="memory scoring may use, GiB: batches of at most eval_batch_size that fit"),
    ] = None,
    shuffle_history: Annotated[
        Optional[int],
        typer.Option(
            help="score with every user's history window in a random order seeded by this (the same events), "
            "into RUN/shuffled-SEED; then `userllm compare RUN RUN/shuffled-SEED`"
        ),
    ] = None,
) -> None:
    """Score a trained run on its task's test split (every test user unless --users); writes metrics.json."""
    from rich.table import Table

    from userllm.tasks.evaluate import evaluate as run_evaluate

    m = run_evaluate(
        run,
        users=users,
        seed=seed,
        general=general,
        force=force,
        device=device,
        shortlist=shortlist,
        bf16=bf16,
        extend=extend,
        shuffle_history=shuffle_history,
        max_memory_gb=max_memory_gb,
    )
    table = Table(title=f"{m['task']}: {m['method']} on {m['examples']} test users (95% bootstrap intervals)")
    for col in ("", *m["metrics"]):
        table.add_column(col, justify="left" if not col else "right")
    for name, metrics in {"this run": m["metrics"], **m["references"]}.items():
        table.add_row(
            name,
            *(
                f"{metrics[k]['value']:.3f} [{metrics[k]['low']:.3f}, {metrics[k]['high']:.3f}]"
                if k in metrics
                else "-"
                for k in m["metrics"]
            ),
        )
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
    bf16: Annotated[
        Optional[bool],
        typer.Option(
            "--bf16/--fp32",
            help="answer under bf16 autocast",
            show_default="as the run trained, as `userllm evaluate` scores it",
        ),
    ] = None,
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
        table.add_row(
            f"{r['user_id']} ({r['events']} events)",
            "\n".join(r["recent"]),
            ", ".join(r["top_categories"]),
            "\n".join(f"{a} ({p:.2f})" for a, p in r["answers"]),
        )
    out.print(table)


@app.command()
def compare(
    run_a: Annotated[
        str,
        typer.Argument(
            help="a scored `userllm train` run, or several runs of one recipe "
            "(e.g. its training seeds) joined by commas"
        ),
    ],
    run_b: Annotated[
        str, typer.Argument(help="another scored run (or runs, joined by commas) of the same task and dataset")
    ],
    seed: Annotated[int, typer.Option(help="seed of the bootstrap intervals")] = 0,
) -> None:
    """Run A minus run B, paired over the test users both were scored on: each metric's mean per-user
    difference with its 95% bootstrap interval (an interval that excludes 0 separates the two runs). That
    interval resamples test users with both trained models fixed, so it says nothing about how far a
    run moves under another training seed. Give each side as several runs of its recipe
    (``A,A-seed1,A-seed2``) and the interval resamples the runs too (a hierarchical bootstrap)."""
    from rich.table import Table

    from userllm.tasks.records import paired_difference

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
    bf16: Annotated[
        Optional[bool],
        typer.Option("--bf16/--fp32", help="generate under bf16 autocast", show_default="as the run trained"),
    ] = None,
) -> None:
    """A personalized answer for one user of the dataset (their most recent history)."""
    from userllm.tasks.pipeline import Pipeline

    print(Pipeline.from_pretrained(run, bf16=bf16).generate(user, instruction, max_new_tokens=max_new_tokens))


@app.command()
def experiment(
    spec: Annotated[Path, typer.Argument(help="an experiment YAML, e.g. experiments/movielens100k.yaml")],
    only: Annotated[Optional[str], typer.Option(help="run only these cells (comma-separated names)")] = None,
    task: Annotated[Optional[str], typer.Option(help="run only this task's cells")] = None,
    device: Annotated[
        Optional[str], typer.Option(help="cpu, cuda or cuda:N for every cell", show_default="the spec's")
    ] = None,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--fp32", help="bf16 autocast for every cell")] = None,
) -> None:
    """Run a grid of train + evaluate cells (finished cells are skipped); writes results.md and plots."""
    from userllm.tasks.experiment import run_experiment

    overrides = {k: v for k, v in {"device": device, "bf16": bf16}.items() if v is not None}
    results = run_experiment(spec, only=only.split(",") if only else None, task=task, overrides=overrides)
    from rich.table import Table

    from userllm.config import read_yaml_mapping
    from userllm.tasks.report import summary

    for title, rows in summary(read_yaml_mapping(spec, "experiment")):
        table = Table(title=title)
        for i, col in enumerate(rows[0]):
            table.add_column(col, justify="left" if i < 2 else "right")
        for row in rows[1:]:
            table.add_row(*row)
        out.print(table)
    out.print(f"wrote {results} (every cell's settings, answers and references) and the figures beside it")


@app.command("plot")
def plot_command(
    results: Annotated[
        list[Path],
        typer.Argument(
            help="results.json files (`userllm experiment` output, docs/results.json), or one benchmark record "
            "(efficiency.json, prefix.json, serve.json)"
        ),
    ],
    out_path: Annotated[Path, typer.Option("--out", help="the PNG to write")],
    dataset: Annotated[Optional[str], typer.Option(help="only this dataset's cells, e.g. ml-100k")] = None,
    history: Annotated[
        Optional[int], typer.Option(help="only the cells at this history length (events), e.g. 50")
    ] = None,
    cells: Annotated[
        Optional[str],
        typer.Option(help="only these cells (comma-separated), drawn side by side with their panels' references"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out")] = False,
) -> None:
    """Quality vs history length and vs training compute, with 95% intervals, from one or more results.json
    (or, with --cells, the chosen cells side by side beside the label prior and the encoder alone); or a
    benchmark's figure redrawn from its JSON record."""
    import json

    from userllm.tasks.plots import plot_results

    if out_path.exists() and not force:
        raise OutputExistsError(f"{out_path} already exists; pass --force to draw it again")
    if len(results) == 1 and results[0].is_file():
        try:
            record = json.loads(results[0].read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{results[0]}: not a JSON file ({e})") from None
        if isinstance(record, dict):  # a benchmark's record; results.json is a list of cells
            from userllm.bench.plots import plot_record

            try:
                kind = plot_record(record, out_path)
            except InputError as e:
                raise InputError(f"{results[0]}: {e}") from None
            out.print(f"wrote {out_path} (the figure of `userllm bench {kind}`)")
            return
    chosen = [c for c in cells.split(",") if c] if cells else None
    n = plot_results(results, out_path, dataset=dataset, history=history, chosen=chosen)
    out.print(f"wrote {out_path} ({n} cells)")
