"""``userllm experiment SPEC.yaml``: a grid of train + evaluate cells, resumable, with a table and plots.

The spec (see ``experiments/movielens100k.yaml``)::

    out: runs/movielens100k                      # results.md, results.json, results.png, one run per cell
    prepare: {source: movielens-100k, out: outputs/ml-100k}     # PrepareConfig; skipped if the dataset exists
    pretrain: {out: runs/movielens100k/encoder, epochs: 20}     # PretrainConfig; skipped if finished
    tasks: [next_item, favorite_genre]
    evaluate: {users: 40, seed: 0, general: false}             # users: omit to score every test user;
                                                               # bf16: true scores under bf16 autocast
    defaults: {train_examples: 128, batch_size: 4}              # TrainConfig fields of every cell
    cells:
      - {name: xattn-h50, set: {method: userllm, llm.mode: cross_attention, max_history: 50}}
      - {name: tp-h50, set: {method: textprompt, llm.strategy: lora}, tasks: [favorite_genre]}   # some tasks only
      - {name: xattn-equal, set: {method: userllm}, match_flops: tp-h50}   # TP's training FLOPs, not its examples
      - {name: tp-slow, set: {method: textprompt}, evaluate: {users: 200}}   # a seeded subset for this cell; the
                                        # other cells are re-scored on its users in a table of their own

Every cell runs once per task in ``out/TASK/NAME``. A cell with ``metrics.json`` is skipped; one with a
trained model is only evaluated; one with a checkpoint resumes; a run (the encoder's or a cell's) whose saved
config is another recipe than the spec's is refused, not reused. ``userllm`` cells use the pretrained
encoder unless they set ``encoder: random``; a next_item cell of any method with ``shortlist: N`` ranks
that encoder's top N items per user, and a TP cell with ``llm.candidates: N`` lists them in its prompt.
Each task's table ends with the label prior at every history length of its cells (the train split's most
frequent answers on the same test users), the floor to beat, and for next_item the stage-1 encoder alone
and, with a shortlist, the shortlist in random order; every metric carries its 95% bootstrap interval over
users.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from userllm.config import PrepareConfig, PretrainConfig, TrainConfig, dump_config, load_config, read_yaml_mapping
from userllm.data.dataset import FILES
from userllm.errors import ConfigError, InputError
from userllm.io import write_json, write_text_atomically
from userllm.memory import release_memory
from userllm.progress import console

MAIN_METRIC = {"next_item": "recall@10", "favorite_genre": "accuracy", "review": "rougeLsum"}
SPEC_KEYS = {"out", "prepare", "pretrain", "tasks", "evaluate", "defaults", "cells"}
# fields of a saved run config that do not decide what the run is: how it ran, and the vocabulary sizes an
# encoder read from the dataset
NOT_RECIPE = {"device", "bf16", "resume", "force", "encoder.num_items", "encoder.num_ratings", "encoder.num_categories"}
REFERENCES = {"label prior": "prior", "most common review": "common-review", "encoder alone": "encoder",
              "shortlist in random order": "random-order"}  # -> cell name
REFERENCE_COLORS = {"label prior": "k", "most common review": "k", "encoder alone": "tab:purple"}  # others grey


def load_spec(path: Path) -> dict[str, Any]:
    spec = read_yaml_mapping(path, "experiment")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; expected some of {sorted(SPEC_KEYS)}")
    for key in ("out", "cells", "tasks"):
        if not spec.get(key):
            raise ConfigError(f"{path}: '{key}' is required")
    names = [c.get("name") for c in spec["cells"]]
    if None in names or len(set(names)) != len(names):
        raise ConfigError(f"{path}: every cell needs a unique 'name' (got {names})")
    for cell in spec["cells"]:
        extra = set(cell) - {"name", "set", "tasks", "match_flops", "evaluate"}
        if extra:
            raise ConfigError(f"{path}: cell {cell['name']}: unknown keys {sorted(extra)}; expected name, set, tasks, "
                              "match_flops, evaluate")  # fmt: skip
    return spec


def cell_config(spec: dict, cell: dict, task: str, dataset: Path, encoder: Path | None, overrides: dict) -> TrainConfig:
    """A cell's TrainConfig: defaults, then the cell's ``set`` (dotted keys), then command-line overrides.
    ``match_flops: OTHER`` trains on the FLOPs that cell OTHER (finished, same task) trained on."""
    sets = {"dataset": str(dataset), "task": task, "out": str(Path(spec["out"]) / task / cell["name"])}
    sets |= {**flatten(spec.get("defaults") or {}), **(cell.get("set") or {}), **overrides}
    if cell.get("match_flops"):
        other = Path(spec["out"]) / task / cell["match_flops"] / "summary.json"
        if not other.exists():
            raise ConfigError(f"cell {cell['name']}: match_flops {cell['match_flops']!r} has not finished training "
                              f"({other} is missing); list that cell first")  # fmt: skip
        sets["train_flops"] = json.loads(other.read_text())["train_flops"]
    # User-LLM reads the spec's encoder; a shortlist (any method) ranks its top items, TP's candidates list them
    listed = sets.get("shortlist") or sets.get("llm.candidates")
    if (sets.get("method", "userllm") == "userllm" or listed) and sets.get("encoder") is None:
        if encoder is None:
            need = "userllm" if sets.get("method", "userllm") == "userllm" else "a shortlist or candidates"
            raise ConfigError(f"cell {cell['name']}: {need} needs a pretrained encoder ('pretrain' in the spec)"
                              + (" or encoder: random" if need == "userllm" else ""))  # fmt: skip
        sets["encoder"] = str(encoder)
    return load_config(TrainConfig, None, sets)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("llm", "random_encoder"):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_fields(saved: dict, wanted: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted name, saved value, wanted value)`` of every field whose value differs; fields that ``saved``
    lacks (a run written before the field existed) are not compared."""
    out = []
    for key, value in wanted.items():
        if key not in saved:
            continue
        if isinstance(value, dict) and isinstance(saved[key], dict):
            out += changed_fields(saved[key], value, f"{prefix}{key}.")
        elif saved[key] != value:
            out.append((f"{prefix}{key}", saved[key], value))
    return out


def check_recipe(path: Path, what: str, cfg: PretrainConfig | TrainConfig) -> None:
    """Refuse to reuse or resume a run at ``cfg.out`` made with another recipe than the spec now resolves to
    (``what``: the spec's part that names it): a spec asking for ALiBi positions must not silently rank with an
    encoder that has learned ones, nor a cell edited in the spec report the numbers of its old recipe."""
    saved = Path(cfg.out) / "config.json"
    if not saved.exists():
        return
    changed = [c for c in changed_fields(json.loads(saved.read_text()), dump_config(cfg)) if c[0] not in NOT_RECIPE]
    if changed:
        diffs = "; ".join(f"{name}: {old!r} there, {new!r} in the spec" for name, old, new in changed)
        raise ConfigError(f"{path}: {what}: {cfg.out} was made with another recipe ({diffs}); give it another "
                          f"{'out' if what == 'pretrain' else 'name'}, or remove {cfg.out} to run it again")  # fmt: skip


def run_experiment(path: Path, *, only: list[str] | None = None, task: str | None = None,
                   overrides: dict | None = None) -> Path:  # fmt: skip
    """Run every (task, cell) of the spec that is not finished (only the cells named ``only`` and the tasks
    ``task``, when given); returns the path of ``results.md``, which shows every finished cell."""
    from userllm.data.prepare import prepare_dataset
    from userllm.encoder.train import pretrain
    from userllm.tasks.evaluate import evaluate
    from userllm.tasks.train import train

    spec = load_spec(path)
    overrides = overrides or {}
    names = {c["name"] for c in spec["cells"]}
    unknown = sorted(set(only or []) - names) + ([task] if task and task not in spec["tasks"] else [])
    if unknown:
        raise ConfigError(f"{path}: no cell or task named {unknown}; cells: {sorted(names)}, tasks: {spec['tasks']}")
    prep = load_config(PrepareConfig, None, flatten(spec.get("prepare") or {}))
    if not all((prep.out / f).exists() for f in FILES):
        prepare_dataset(prep)
    encoder = None
    if spec.get("pretrain"):
        pre = load_config(PretrainConfig, None, {"dataset": str(prep.out), **spec["pretrain"],
                                                  **{k: v for k, v in overrides.items() if k in ("device", "bf16")}})  # fmt: skip
        check_recipe(path, "pretrain", pre)
        encoder = Path(pre.out)
        summary = encoder / "summary.json"
        if not (summary.exists() and json.loads(summary.read_text()).get("finished")):
            resume = (encoder / "checkpoint" / "train_state.pt").exists()
            pretrain(pre.model_copy(update={"resume": resume, "force": not resume}))
    ev = spec.get("evaluate") or {}
    for task_name in spec["tasks"]:
        for cell in spec["cells"]:
            if (only and cell["name"] not in only) or (task and task_name != task) or task_name not in cell.get("tasks", [task_name]):
                continue
            cfg = cell_config(spec, cell, task_name, prep.out, encoder, overrides)
            check_recipe(path, f"cell {cell['name']} ({task_name})", cfg)
            run = Path(cfg.out)
            if (run / "metrics.json").exists():
                console.print(f"[dim]skip {task_name}/{cell['name']}: finished[/dim]")
                continue
            console.rule(f"{task_name} / {cell['name']}")
            if not (run / "model" / "userllm.safetensors").exists():
                resume = (run / "checkpoint" / "train_state.pt").exists()
                train(cfg.model_copy(update={"resume": resume, "force": not resume}))
            cell_ev = {**ev, **(cell.get("evaluate") or {})}
            evaluate(run, users=cell_ev.get("users"), seed=cell_ev.get("seed", 0), general=cell_ev.get("general", False),
                     bf16=cell_ev.get("bf16"), force=True)  # fmt: skip
            release_memory()  # the next cell's peak does not stack on this one's freed heap (make demo: ~0.6 GB)
    return write_results(spec)


def collect(spec: dict) -> list[dict]:
    """One cell per finished (task, cell) as ``results.json`` holds it: dataset, task, cell, method, mode,
    history, train_examples, train_flops, train_seconds, users, commit and ``metrics`` ({name: {"value",
    "low", "high"}}), with the settings the tables show."""
    rows = []
    for task in spec["tasks"]:
        for cell in spec["cells"]:
            run = Path(spec["out"]) / task / cell["name"]
            if not (run / "metrics.json").exists():
                continue
            m = json.loads((run / "metrics.json").read_text())
            summary = json.loads((run / "summary.json").read_text())
            c = m["config"]
            encoder = "-" if c["method"] == "textprompt" else ("random" if c["encoder"] == "random" else "pretrained")
            xattn = c["method"] == "userllm" and c["llm"]["mode"] == "cross_attention"
            layers = c["llm"]["cross_attention_layers"]
            rows.append({
                "dataset": Path(c["dataset"]).name, "task": task, "cell": cell["name"], "method": c["method"],
                "mode": c["llm"]["mode"] if c["method"] == "userllm" else "text", "history": c["max_history"],
                "train_examples": summary["examples"], "train_flops": summary.get("train_flops"),
                "train_seconds": summary["train_seconds"], "users": m["examples"], "commit": summary.get("commit"),
                "metrics": m["metrics"], "precision": m.get("precision", "fp32"),  # scored in; fp32 before --bf16
                "strategy": c["llm"]["strategy"], "perceiver": c["llm"]["perceiver_latents"] if c["method"] == "userllm" else 0,
                "item_words": ",".join(c["llm"].get("item_words") or []) if c["method"] == "userllm" else "",
                "xattn_layers": (f"{layers}" if layers else f"every {c['llm']['cross_attention_every']}") if xattn else "-",
                "encoder": encoder, "llm_input_tokens": m["llm_input_tokens"], "general": m.get("general"),
                "references": m.get("references") or {}, "run": str(run),
                "subset": bool((cell.get("evaluate") or {}).get("users")),  # scored on users of its own
                "shortlist": c.get("shortlist", 0) if task == "next_item" else 0,
                "exclude_history": task == "next_item" and bool(c["llm"].get("exclude_history")),  # what the shortlist leaves out
            })  # fmt: skip
    return rows


def reference_rows(rows: list[dict]) -> list[dict]:
    """One row per (task, history length, reference) of the finished cells, from their metrics.json: the label
    prior (review: the most common review) and, for next_item, the stage-1 encoder alone (from a cell with the pretrained encoder), on the same
    test users as the cells."""
    out = []
    for task, history in sorted({(r["task"], r["history"]) for r in rows}):
        # from a cell scored on the spec's users, with the pretrained encoder where there is one
        cells = sorted((r for r in rows if (r["task"], r["history"]) == (task, history)),
                       key=lambda r: (r["subset"], r["encoder"] != "pretrained"))  # fmt: skip
        for name, short in REFERENCES.items():
            cell = next((r for r in cells if name in r["references"]), None)
            if cell is None:
                continue
            out.append({
                "dataset": cell["dataset"], "task": task, "cell": f"{short}-h{history}", "method": name, "mode": "-",
                "history": history, "train_examples": 0, "train_flops": 0, "train_seconds": 0.0, "users": cell["users"],
                "precision": "-", "commit": cell["commit"], "metrics": cell["references"][name], "strategy": "-", "perceiver": 0,
                "item_words": "", "xattn_layers": "-", "encoder": "-", "llm_input_tokens": 0.0, "general": None,
                "references": {}, "run": cell["run"], "subset": cell["subset"],
                "shortlist": 0, "exclude_history": cell["exclude_history"],  # the encoder alone: its own top K
            })  # fmt: skip
    return out


def same_users_rows(rows: list[dict], cell: dict, seed: int) -> list[dict]:
    """The table of a cell scored on a subset of users (e.g. TP, too slow for all): that cell, every other
    cell of its task and history whose records cover those users re-scored on them (from records.jsonl),
    and the references it was scored with."""
    from userllm.tasks.evaluate import rescore, scored_users

    users = scored_users(Path(cell["run"]))
    out = [cell]
    for r in rows:
        if (r["task"], r["history"]) == (cell["task"], cell["history"]) and r is not cell and r["method"] in ("userllm", "textprompt"):
            try:
                out.append({**r, "metrics": rescore(Path(r["run"]), users, seed), "users": len(users)})
            except InputError as e:  # scored on other users (e.g. the spec's own subset): not comparable
                console.print(f"[yellow]{r['cell']} is left out of the table of {cell['cell']}'s users: {e}[/yellow]")
    for name, metrics in cell["references"].items():
        out.append({**cell, "cell": f"{name} (same users)", "method": name, "metrics": metrics, "mode": "-",
                    "train_examples": 0, "train_flops": 0, "strategy": "-", "perceiver": 0, "item_words": "",
                    "xattn_layers": "-", "encoder": "-", "general": None})  # fmt: skip
    return out


def difference_lines(rows: list[dict], task: str, seed: int) -> list[str]:
    """A markdown table of every User-LLM cell minus every TP cell of ``task`` that answers the same question
    (:func:`comparable_pairs`), paired over the test users both were scored on (:func:`~userllm.tasks.evaluate.paired_difference`): a difference
    whose interval excludes 0 is one the users support."""
    from userllm.tasks.evaluate import paired_difference

    cells = [r for r in rows if r["task"] == task and r["method"] in ("userllm", "textprompt")]
    pairs = comparable_pairs(cells)
    encoder_lines = reference_difference_lines(cells, task, seed) if task == "next_item" else []
    if not pairs:
        return encoder_lines
    out = []
    for a, b in pairs:
        try:
            users, diff = paired_difference(Path(a["run"]), Path(b["run"]), seed)
        except InputError as e:  # a run scored before records were kept
            console.print(f"[yellow]{a['cell']} - {b['cell']} is left out of the paired differences: {e}[/yellow]")
            continue
        if not out:
            out = [f"#### {task}: User-LLM minus TP, paired over the same users", "",
                   "| User-LLM cell | TP cell | users | " + " | ".join(f"{m} difference" for m in diff) + " |",
                   "|" + "---|" * (3 + len(diff))]  # fmt: skip
        out.append(f"| {a['cell']} | {b['cell']} | {users} | " + " | ".join(signed(d) for d in diff.values()) + " |")
    if out:
        out += ["", "Mean per-user difference with its 95% bootstrap interval (users resampled with both answers "
                "together); an interval that excludes 0 separates the two cells.", ""]
    return out + encoder_lines


def ranked_list(cell: dict) -> tuple:
    """The kind of list a cell ranks: next_item's stage-1 shortlist size and whether it leaves out the
    history's items (``llm.exclude_history``); (None, None) for a results.json cell written before both."""
    return cell.get("shortlist"), cell.get("exclude_history")


def comparable_pairs(cells: list[dict]) -> list[tuple[dict, dict]]:
    """The (User-LLM cell, TP cell) pairs of ``cells`` (rows of one task) that answer the same question: the
    same history length and, for next_item, the same :func:`ranked_list`, so that both rank the same titles
    for each user."""
    same = lambda a, b: a["history"] == b["history"] and ranked_list(a) == ranked_list(b)  # noqa: E731
    return [(a, b) for a in cells if a["method"] == "userllm" for b in cells if b["method"] == "textprompt" and same(a, b)]


def reference_difference_lines(cells: list[dict], task: str, seed: int) -> list[str]:
    """Markdown tables of every cell of ``task`` minus a reference on the cell's own users, paired per user:
    minus the stage-1 encoder alone (:func:`~userllm.tasks.evaluate.paired_vs_encoder`: does the LLM rank
    better than the encoder it reads?) and minus its shortlist in random order
    (:func:`~userllm.tasks.evaluate.paired_vs_random_order`: does its order find the next item more often than
    no order?). A cell without what a reference needs (a stage-1 encoder, a whole shortlist) is left out of it."""
    from userllm.tasks.evaluate import paired_vs_encoder, paired_vs_random_order

    references = (
        ("the encoder alone", paired_vs_encoder, "the stage-1 encoder's own top titles for the same user (with a "
         "shortlist, its order of the very list the LLM ranked)."),
        ("the shortlist in random order", paired_vs_random_order, "the expected metric of the same list in "
         "uniformly random order, 1[target listed] * min(1, K / list length): what a reranker that ignores the "
         "user gets."),
    )  # fmt: skip
    out = []
    for name, paired, note in references:
        lines = []
        for cell in cells:
            try:
                users, diff = paired(Path(cell["run"]), seed)
            except InputError:  # scored without what the reference needs
                continue
            if not lines:
                lines = [f"#### {task}: each cell minus {name}, paired over the cell's users", "",
                         "| cell | users | " + " | ".join(f"{m} difference" for m in diff) + " |", "|" + "---|" * (2 + len(diff))]  # fmt: skip
            lines.append(f"| {cell['cell']} | {users} | " + " | ".join(signed(d) for d in diff.values()) + " |")
        out += lines + ["", f"{name[0].upper()}{name[1:]}: {note}", ""] if lines else []
    return out


def signed(m: dict) -> str:
    return f"{m['value']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]"


RESULT_KEYS = ("dataset", "task", "cell", "method", "mode", "history", "train_examples", "train_flops", "train_seconds",
               "users", "precision", "shortlist", "exclude_history", "commit", "metrics")  # fmt: skip
# keys a results.json written before them may lack: "precision" (then fp32), and the list a next_item cell
# ranks, "shortlist" and "exclude_history" (then unknown: such cells count as ranking one kind of list)
OPTIONAL_KEYS = {"precision", "shortlist", "exclude_history"}


def interval(m: dict) -> str:
    return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def write_results(spec: dict) -> Path:
    """``results.json`` (a list of cells, :data:`RESULT_KEYS`), ``results.md`` (rendered from it: a table per
    task, reference rows last) and ``results.png`` from the finished cells."""
    out = Path(spec["out"])
    rows = collect(spec)
    rows += reference_rows(rows)
    write_json(out / "results.json", [{k: r[k] for k in RESULT_KEYS} for r in rows])
    lines = []
    tables = [(task, f"### {task}", [r for r in rows if r["task"] == task], None) for task in spec["tasks"]]
    seed = (spec.get("evaluate") or {}).get("seed", 0)
    from userllm.tasks.evaluate import answer_summary, scored_users

    tabled = set()  # (task, history, users) already shown: cells scored on the same users share a table
    for cell in [r for r in rows if r["subset"] and r["method"] in ("userllm", "textprompt")]:
        key = (cell["task"], cell["history"], frozenset(scored_users(Path(cell["run"]))))
        if key in tabled:
            continue
        tabled.add(key)
        same = same_users_rows(rows, cell, seed)
        tables.append((cell["task"], f"### {cell['task']}: on the {cell['users']} test users {cell['cell']} was scored on", same,
                       scored_users(Path(cell["run"]))))  # fmt: skip
    for task, title, part, users in tables:
        if not part:
            continue
        names = list(next(r for r in part if r["method"] not in REFERENCES)["metrics"])
        lines += [title, "",
                  "| cell | method | mode | xattn layers | strategy | perceiver | item words | encoder | history | users | "
                  + " | ".join(names) + " | answers | train examples | train PFLOPs | train s | LLM input tokens | ppl after/before |",
                  "|" + "---|" * (len(names) + 16)]  # fmt: skip
        for r in part:
            ppl = f"{r['general']['ratio']:.3f}" if r["general"] else "-"
            ref = r["method"] in REFERENCES
            flops = f"{r['train_flops'] / 1e15:.2f}" if r["train_flops"] else "-"
            cost = "- | - | - | -" if ref else f"{r['train_examples']} | {flops} | {r['train_seconds']:.0f} | {r['llm_input_tokens']:.0f}"
            cost = ("-" if ref else answer_summary(Path(r["run"]), users)) + " | " + cost
            mode = f"{r['mode']}, shortlist {r['shortlist']}" if r.get("shortlist") else r["mode"]
            lines.append(f"| {r['cell']} | {r['method']} | {mode} | {r['xattn_layers']} | {r['strategy']} | {r['perceiver'] or '-'} | "
                         f"{r['item_words'] or '-'} | {r['encoder']} | {r['history']} | {r['users']} | "
                         + " | ".join(interval(r["metrics"][n]) if n in r["metrics"] else "-" for n in names)
                         + f" | {cost} | {ppl} |")  # fmt: skip
        lines += ["", "Each metric with its 95% bootstrap interval over the test users scored. "
                  "Label prior: the train split's most frequent answers, whoever the user (next_item: the most popular "
                  "titles; favorite_genre: the most frequent genre; review: the most common review). Encoder alone: the "
                  "stage-1 encoder's own top items as titles. Answers: how many distinct top answers the cell gave "
                  "and its most frequent one. Train FLOPs: analytic, 3 forwards per example."
                  + (" Shortlist N: the LLM ranked only the titles of the stage-1 encoder's N highest-scoring items "
                     "for each user (the encoder alone ranks the same list), all N exactly by log p(title + eos)." if any(r.get("shortlist") for r in part) else ""),
                  ""]  # fmt: skip
        if title == f"### {task}":
            lines += difference_lines(rows, task, seed)
    write_text_atomically(out / "results.md", "\n".join(lines))
    if rows:
        plot(rows, spec["tasks"], out / "results.png")
    return out / "results.md"


def plot_results(paths: list[Path], out: Path, *, dataset: str | None = None, history: int | None = None) -> int:
    """:func:`plot` of the cells in ``results.json`` files (e.g. ``docs/results.json``, or two experiments at
    different history lengths, so that quality vs history length has both), only ``dataset``'s cells and
    only those at ``history`` events when given; a cell in several files is drawn from the last. Returns the
    number of cells drawn."""
    cells: dict[tuple, dict] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: cannot read it as results.json: {e}") from None
        bad = not isinstance(data, list) or any(not isinstance(r, dict) or set(RESULT_KEYS) - set(r) - OPTIONAL_KEYS for r in data)
        if bad:
            raise InputError(f"{path}: expected a list of cells, each with the keys {', '.join(RESULT_KEYS)} "
                             f"({', '.join(sorted(OPTIONAL_KEYS))} may be absent)")
        for r in data:
            if dataset in (None, r["dataset"]) and history in (None, r["history"]):
                cells[(r["dataset"], r["task"], r["cell"], r["history"])] = r
    if not cells:
        which = (f" of dataset {dataset!r}" if dataset else "") + (f" at {history} events" if history is not None else "")
        raise InputError(f"no cells{which} in {', '.join(map(str, paths))}")
    rows = list(cells.values())
    plot(rows, list(dict.fromkeys(r["task"] for r in rows)), Path(out))
    return len(rows)


def best_by_history(cells: list[dict], metric: str, slack: float = 1.1) -> list[tuple[int, dict]]:
    """(history, metric) of the best of ``cells`` (one method and mode) at each history length, among the
    cells trained on at most the largest budget that every length reached (times ``slack``: a cell matched to
    another's FLOPs overshoots by up to one step). A longer training at one length only (e.g. 16k examples at
    50 events) would otherwise make the line compare budgets, not history lengths. Among those, only the
    cells scored on the most users count: a cell scored on a seeded subset has a wider interval, and taking
    the best of noisy cells favours the luckiest. And only cells ranking a kind of list (:func:`ranked_list`)
    that every length has: a list only one length was scored on (e.g. without the history's items) would make
    the line compare lists; none shared, no line."""
    lengths = sorted({r["history"] for r in cells})
    lists = [{ranked_list(r) for r in cells if r["history"] == h} for h in lengths]
    cells = [r for r in cells if all(ranked_list(r) in kinds for kinds in lists)]
    if not cells:
        return []
    shared = min(max(r["train_flops"] or 0 for r in cells if r["history"] == h) for h in lengths) * slack
    out = []
    for h in lengths:
        fit = [r for r in cells if r["history"] == h and (r["train_flops"] or 0) <= shared]
        if fit:
            most = max(r.get("users", 0) for r in fit)
            fit = [r for r in fit if r.get("users", 0) == most]
            out.append((h, max(fit, key=lambda r: r["metrics"][metric]["value"])["metrics"][metric]))
    return out


def dodged(xs: list[float], near: float = 0.05, step: float = 0.012) -> list[float]:
    """Positions on a log axis for points at ``xs`` (> 0), those within ``near`` decades of a neighbour (a run of
    budgets matched to one another's FLOPs) spread sideways ``step`` decades apart around their group's middle,
    in their given order, so that their error bars stand side by side instead of on top of each other.

    Example::

        dodged([1e14, 1.01e14, 1e15])   # [~0.991e14, ~1.019e14, 1e15]
    """
    logs = np.log10(xs)
    groups, out = [], [float(x) for x in xs]
    for i in np.argsort(logs, kind="stable"):
        if groups and logs[i] - logs[groups[-1][-1]] <= near:
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in [g for g in groups if len(g) > 1]:
        middle = float(np.mean(logs[group]))
        for j, i in enumerate(sorted(group)):
            out[i] = float(10 ** (middle + (j - (len(group) - 1) / 2) * step))
    return out


def plot(rows: list[dict], tasks: list[str], path: Path) -> None:
    """Per task, with 95% intervals as error bars: the main metric vs history length (per method and mode,
    its best cell at each length within the budget every length reached, :func:`best_by_history`; references
    dashed; drawn only when the cells hold more than one length) and vs training compute (every cell, one
    marker each in the legend, cells of about the same compute side by side, :func:`dodged`; references as
    shaded bands)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    tasks = [t for t in tasks if any(r["task"] == t for r in rows)]
    by_history = len({r["history"] for r in rows}) > 1  # at one length the compute panel says it all
    fig, axes = plt.subplots(len(tasks), 1 + by_history, figsize=(13 if by_history else 9, 4.5 * len(tasks)), squeeze=False)
    for ax_row, task in zip(axes, tasks):
        history_ax, compute_ax = ax_row if by_history else (None, ax_row[0])
        metric = MAIN_METRIC[task]
        part = [r for r in rows if r["task"] == task and r["method"] in ("userllm", "textprompt")]
        refs = [r for r in rows if r["task"] == task and r["method"] not in ("userllm", "textprompt")]

        def bars(ax, points, **kw):
            x = [p[0] for p in points]
            m = [p[1]["value"] for p in points]
            err = [[p[1]["value"] - p[1]["low"] for p in points], [p[1]["high"] - p[1]["value"] for p in points]]
            ax.errorbar(x, m, yerr=err, capsize=3, **kw)

        if history_ax is not None:
            for label in sorted({(r["method"], r["mode"]) for r in part}):
                line = best_by_history([r for r in part if (r["method"], r["mode"]) == label], metric)
                if line:
                    bars(history_ax, line, marker="o", label=f"{label[0]} {label[1]} (best cell, shared budget)")
        for name in sorted({r["method"] for r in refs}):
            line = sorted(((r["history"], r["metrics"][metric]) for r in refs if r["method"] == name and metric in r["metrics"]),
                          key=lambda p: p[0])  # fmt: skip
            if line and history_ax is not None:
                bars(history_ax, line, ls="--", marker=".", label=name)
            for i, (_, m) in enumerate(line):
                compute_ax.axhspan(m["low"], m["high"], alpha=0.15, color=REFERENCE_COLORS.get(name, "tab:gray"),
                                  label=name if i == 0 else None)  # fmt: skip
        if history_ax is not None:
            history_ax.set(xlabel="history length (events)", ylabel=metric, title=f"{task}: quality vs history length")
            history_ax.legend(fontsize=8)
        markers = "osD^v<>ph*"
        trained = [p for p in part if p["train_flops"]]
        for i, (r, x) in enumerate(zip(trained, dodged([r["train_flops"] for r in trained]))):
            bars(compute_ax, [(x, r["metrics"][metric])], marker=markers[i % len(markers)], ls="none",
                 color="k" if r["method"] == "textprompt" else f"C{i % 10}", label=f"{r['cell']} ({r['method']})")  # fmt: skip
        compute_ax.set(xscale="log", xlabel="training compute (FLOPs, analytic)", ylabel=metric,
                       title=f"{task}: quality vs training compute")  # fmt: skip
        flops = [p["train_flops"] for p in part if p["train_flops"]]
        if flops:  # at least a decade wide, major ticks only: close budgets' minor labels ran into one smudge
            compute_ax.set_xlim(min(flops) / 3, max(flops) * 3)
            compute_ax.xaxis.set_minor_formatter(NullFormatter())
        compute_ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
