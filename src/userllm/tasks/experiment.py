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

from userllm.config import PrepareConfig, PretrainConfig, TrainConfig, dump_config, load_config, read_yaml_mapping
from userllm.data.dataset import FILES
from userllm.errors import ConfigError
from userllm.memory import release_memory
from userllm.progress import console
from userllm.tasks.report import write_results

SPEC_KEYS = {"out", "prepare", "pretrain", "tasks", "evaluate", "defaults", "cells"}
# fields of a saved run config that do not decide what the run is: how it ran, and the vocabulary sizes an
# encoder read from the dataset
NOT_RECIPE = {"device", "bf16", "resume", "force", "encoder.num_items", "encoder.num_ratings", "encoder.num_categories"}


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
            raise ConfigError(
                f"{path}: cell {cell['name']}: unknown keys {sorted(extra)}; expected name, set, tasks, "
                "match_flops, evaluate"
            )
    return spec


def cell_config(spec: dict, cell: dict, task: str, dataset: Path, encoder: Path | None, overrides: dict) -> TrainConfig:
    """A cell's TrainConfig: defaults, then the cell's ``set`` (dotted keys), then command-line overrides.
    ``match_flops: OTHER`` trains on the FLOPs that cell OTHER (finished, same task) trained on."""
    sets = {"dataset": str(dataset), "task": task, "out": str(Path(spec["out"]) / task / cell["name"])}
    sets |= {**flatten(spec.get("defaults") or {}), **(cell.get("set") or {}), **overrides}
    if cell.get("match_flops"):
        other = Path(spec["out"]) / task / cell["match_flops"] / "summary.json"
        if not other.exists():
            raise ConfigError(
                f"cell {cell['name']}: match_flops {cell['match_flops']!r} has not finished training "
                f"({other} is missing); list that cell first"
            )
        sets["train_flops"] = json.loads(other.read_text())["train_flops"]
    # User-LLM reads the spec's encoder; a shortlist (any method) ranks its top items, TP's candidates list them
    listed = sets.get("shortlist") or sets.get("llm.candidates")
    if (sets.get("method", "userllm") == "userllm" or listed) and sets.get("encoder") is None:
        if encoder is None:
            need = "userllm" if sets.get("method", "userllm") == "userllm" else "a shortlist or candidates"
            raise ConfigError(
                f"cell {cell['name']}: {need} needs a pretrained encoder ('pretrain' in the spec)"
                + (" or encoder: random" if need == "userllm" else "")
            )
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
        raise ConfigError(
            f"{path}: {what}: {cfg.out} was made with another recipe ({diffs}); give it another "
            f"{'out' if what == 'pretrain' else 'name'}, or remove {cfg.out} to run it again"
        )


def scored(run: Path, shuffle_history: int | None) -> bool:
    """Whether ``run`` has been scored (with its history windows shuffled by that seed, when given)."""
    return (run / ("metrics.json" if shuffle_history is None else f"shuffled-{shuffle_history}/metrics.json")).exists()


def run_experiment(
    path: Path, *, only: list[str] | None = None, task: str | None = None, overrides: dict | None = None
) -> Path:
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
        pre = load_config(
            PretrainConfig,
            None,
            {
                "dataset": str(prep.out),
                **spec["pretrain"],
                **{k: v for k, v in overrides.items() if k in ("device", "bf16")},
            },
        )
        check_recipe(path, "pretrain", pre)
        encoder = Path(pre.out)
        summary = encoder / "summary.json"
        if not (summary.exists() and json.loads(summary.read_text()).get("finished")):
            resume = (encoder / "checkpoint" / "train_state.pt").exists()
            pretrain(pre.model_copy(update={"resume": resume, "force": not resume}))
    ev = spec.get("evaluate") or {}
    for task_name in spec["tasks"]:
        for cell in spec["cells"]:
            if (
                (only and cell["name"] not in only)
                or (task and task_name != task)
                or task_name not in cell.get("tasks", [task_name])
            ):
                continue
            cfg = cell_config(spec, cell, task_name, prep.out, encoder, overrides)
            check_recipe(path, f"cell {cell['name']} ({task_name})", cfg)
            run = Path(cfg.out)
            cell_ev = {**ev, **(cell.get("evaluate") or {})}
            shuffled = cell_ev.get("shuffle_history")  # also scored with every history window shuffled
            todo = [s for s in dict.fromkeys([None, shuffled]) if not scored(run, s)]
            if not todo:
                console.print(f"[dim]skip {task_name}/{cell['name']}: finished[/dim]")
                continue
            console.rule(f"{task_name} / {cell['name']}")
            if not (run / "model" / "userllm.safetensors").exists():
                resume = (run / "checkpoint" / "train_state.pt").exists()
                train(cfg.model_copy(update={"resume": resume, "force": not resume}))
            for shuffle in todo:
                evaluate(
                    run,
                    users=cell_ev.get("users"),
                    seed=cell_ev.get("seed", 0),
                    general=cell_ev.get("general", False),
                    bf16=cell_ev.get("bf16"),
                    force=True,
                    shuffle_history=shuffle,
                )
            release_memory()  # the next cell's peak does not stack on this one's freed heap (make demo: ~0.6 GB)
    return write_results(spec)


# keys a results.json written before them may lack: "precision" (then fp32), and the list a next_item cell
# ranks, "shortlist" and "exclude_history" (then unknown: such cells count as ranking one kind of list)
