"""``userllm experiment SPEC.yaml``: a grid of train + evaluate cells, resumable, with a table and plots.

The spec (see ``experiments/movielens100k.yaml``)::

    out: runs/movielens100k                      # results.md, results.json, results.png, one run per cell
    prepare: {source: movielens-100k, out: outputs/ml-100k}     # PrepareConfig; skipped if the dataset exists
    pretrain: {out: runs/movielens100k/encoder, epochs: 20}     # PretrainConfig; skipped if finished
    tasks: [next_item, favorite_genre]
    evaluate: {users: 40, seed: 0, general: false}
    defaults: {train_examples: 128, batch_size: 4}              # TrainConfig fields of every cell
    cells:
      - {name: xattn-h50, set: {method: userllm, llm.mode: cross_attention, max_history: 50}}

Every cell runs once per task in ``out/TASK/NAME``. A cell with ``metrics.json`` is skipped; one with a
trained model is only evaluated; one with a checkpoint resumes. ``userllm`` cells use the pretrained
encoder unless they set ``encoder: random``. Each task's table ends with the label prior at every history
length of its cells (the train split's most frequent answers on the same test users), the floor to beat.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from userllm.config import PrepareConfig, PretrainConfig, TrainConfig, load_config, read_yaml_mapping
from userllm.data.dataset import FILES
from userllm.errors import ConfigError
from userllm.io import write_json, write_text_atomically
from userllm.progress import console

MAIN_METRIC = {"next_item": "recall@10", "favorite_genre": "accuracy", "review": "rougeLsum"}
SPEC_KEYS = {"out", "prepare", "pretrain", "tasks", "evaluate", "defaults", "cells"}


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
    return spec


def cell_config(spec: dict, cell: dict, task: str, dataset: Path, encoder: Path | None, overrides: dict) -> TrainConfig:
    """A cell's TrainConfig: defaults, then the cell's ``set`` (dotted keys), then command-line overrides."""
    sets = {"dataset": str(dataset), "task": task, "out": str(Path(spec["out"]) / task / cell["name"])}
    sets |= {**flatten(spec.get("defaults") or {}), **(cell.get("set") or {}), **overrides}
    if sets.get("method", "userllm") == "userllm" and sets.get("encoder") is None:
        if encoder is None:
            raise ConfigError(f"cell {cell['name']}: userllm needs a pretrained encoder ('pretrain' in the spec) or encoder: random")
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


def run_experiment(path: Path, *, only: str | None = None, overrides: dict | None = None) -> Path:
    """Run every (task, cell) of the spec that is not finished; returns the path of ``results.md``."""
    from userllm.data.prepare import prepare_dataset
    from userllm.encoder.train import pretrain
    from userllm.tasks.evaluate import evaluate
    from userllm.tasks.train import train

    spec = load_spec(path)
    overrides = overrides or {}
    out = Path(spec["out"])
    prep = load_config(PrepareConfig, None, flatten(spec.get("prepare") or {}))
    if not all((prep.out / f).exists() for f in FILES):
        prepare_dataset(prep)
    encoder = None
    if spec.get("pretrain"):
        pre = load_config(PretrainConfig, None, {"dataset": str(prep.out), **spec["pretrain"],
                                                  **{k: v for k, v in overrides.items() if k in ("device", "bf16")}})  # fmt: skip
        encoder = Path(pre.out)
        summary = encoder / "summary.json"
        if not (summary.exists() and json.loads(summary.read_text()).get("finished")):
            resume = (encoder / "checkpoint" / "train_state.pt").exists()
            pretrain(pre.model_copy(update={"resume": resume, "force": not resume}))
    ev = spec.get("evaluate") or {}
    for task in spec["tasks"]:
        for cell in spec["cells"]:
            if only and only not in cell["name"]:
                continue
            cfg = cell_config(spec, cell, task, prep.out, encoder, overrides)
            run = Path(cfg.out)
            if (run / "metrics.json").exists():
                console.print(f"[dim]skip {task}/{cell['name']}: finished[/dim]")
                continue
            console.rule(f"{task} / {cell['name']}")
            if not (run / "model" / "userllm.safetensors").exists():
                resume = (run / "checkpoint" / "train_state.pt").exists()
                train(cfg.model_copy(update={"resume": resume, "force": not resume}))
            evaluate(run, users=ev.get("users"), seed=ev.get("seed", 0), general=ev.get("general", False), force=True)
    return write_results(spec)


def collect(spec: dict) -> list[dict]:
    """One row per finished (task, cell): its settings, metrics, LLM input tokens and training time."""
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
                "task": task, "cell": cell["name"], "method": c["method"],
                "mode": c["llm"]["mode"] if c["method"] == "userllm" else "text",
                "strategy": c["llm"]["strategy"], "perceiver": c["llm"]["perceiver_latents"] if c["method"] == "userllm" else 0,
                "xattn_layers": (f"{layers}" if layers else f"every {c['llm']['cross_attention_every']}") if xattn else "-",
                "encoder": encoder, "history": c["max_history"], "metrics": m["metrics"], "examples": m["examples"],
                "llm_input_tokens": m["llm_input_tokens"], "train_seconds": summary["train_seconds"],
                "general": m.get("general"),
            })  # fmt: skip
    return rows


def label_priors(spec: dict, rows: list[dict]) -> list[dict]:
    """One row per (task, history length) of the finished cells: the label prior
    (:func:`~userllm.tasks.evaluate.label_prior`) on the same test users as the cells."""
    from userllm.data.dataset import PreparedDataset
    from userllm.llm.backbone import load_tokenizer
    from userllm.tasks.data import TaskData
    from userllm.tasks.evaluate import eval_users, label_prior

    ev, priors, tokenizers = spec.get("evaluate") or {}, [], {}
    for task, history in sorted({(r["task"], r["history"]) for r in rows if r["task"] != "review"}):
        cell = next(r for r in rows if (r["task"], r["history"]) == (task, history))
        run = Path(spec["out"]) / task / cell["cell"]
        cfg = TrainConfig.from_saved(json.loads((run / "config.json").read_text()))
        if cfg.llm.backbone not in tokenizers:
            tokenizers[cfg.llm.backbone] = load_tokenizer(cfg.llm.backbone)
        data = TaskData(PreparedDataset(cfg.dataset), tokenizers[cfg.llm.backbone], task=task, method=cfg.method,
                        max_history=history)  # fmt: skip
        users = eval_users(run, data.tl.num_users, ev["users"], ev.get("seed", 0)) if ev.get("users") else None
        priors.append({
            "task": task, "cell": f"prior-h{history}", "method": "label prior", "mode": "-", "xattn_layers": "-",
            "strategy": "-", "perceiver": 0, "encoder": "-", "history": history, "examples": cell["examples"],
            "metrics": label_prior(data, users, cfg.beams if task == "next_item" else 1),
            "llm_input_tokens": 0.0, "train_seconds": 0.0, "general": None,
        })  # fmt: skip
    return priors


def write_results(spec: dict) -> Path:
    """``results.json``, ``results.md`` (a table per task, label priors last) and ``results.png`` from the
    finished cells."""
    out = Path(spec["out"])
    rows = collect(spec)
    rows += label_priors(spec, rows)
    write_json(out / "results.json", rows)
    lines = []
    for task in spec["tasks"]:
        part = [r for r in rows if r["task"] == task]
        if not part:
            continue
        names = list(part[0]["metrics"])
        lines += [f"### {task}", "",
                  "| cell | method | mode | xattn layers | strategy | perceiver | encoder | history | " + " | ".join(names)
                  + " | LLM input tokens | train s | ppl after/before |",
                  "|" + "---|" * (len(names) + 11)]  # fmt: skip
        for r in part:
            ppl = f"{r['general']['ratio']:.3f}" if r["general"] else "-"
            cost = "- | -" if r["method"] == "label prior" else f"{r['llm_input_tokens']:.0f} | {r['train_seconds']:.0f}"
            lines.append(f"| {r['cell']} | {r['method']} | {r['mode']} | {r['xattn_layers']} | {r['strategy']} | {r['perceiver'] or '-'} | "
                         f"{r['encoder']} | {r['history']} | " + " | ".join(f"{r['metrics'][n]:.3f}" for n in names)
                         + f" | {cost} | {ppl} |")  # fmt: skip
        lines += ["", f"{part[0]['examples']} test examples per cell. Label prior: the train split's most frequent "
                  "answers, whoever the user (next_item: the most popular titles; favorite_genre: the most frequent "
                  "genre).", ""]  # fmt: skip
    write_text_atomically(out / "results.md", "\n".join(lines))
    if rows:
        plot(rows, spec["tasks"], out / "results.png")
    return out / "results.md"


def plot(rows: list[dict], tasks: list[str], path: Path) -> None:
    """Per task: main metric vs history length (one line per method/mode, default settings; the label prior
    dashed), and main metric vs mean LLM input tokens (every cell; the label priors dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in tasks if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    for ax_row, task in zip(axes, tasks):
        metric = MAIN_METRIC[task]
        part = [r for r in rows if r["task"] == task and r["method"] != "label prior"]
        priors = sorted((r["history"], r["metrics"][metric]) for r in rows if r["task"] == task and r["method"] == "label prior")
        for label in sorted({r["mode"] for r in part}):
            same = [r for r in part if r["mode"] == label and not r["perceiver"] and r["encoder"] != "random"]
            usual = Counter((r["strategy"], r["xattn_layers"]) for r in same).most_common(1)[0][0] if same else None
            line = sorted((r["history"], r["metrics"][metric]) for r in same if (r["strategy"], r["xattn_layers"]) == usual)
            if line:
                ax_row[0].plot(*zip(*line), marker="o", label=label)
        if priors:
            ax_row[0].plot(*zip(*priors), "k--", marker=".", label="label prior")
            for i, (_, value) in enumerate(priors):
                ax_row[1].axhline(value, color="k", ls=":", lw=0.8, label="label prior" if i == 0 else None)
        ax_row[0].set(xlabel="history length (events)", ylabel=metric, title=f"{task}: quality vs history length")
        ax_row[0].legend()
        for r in part:
            ax_row[1].scatter(r["llm_input_tokens"], r["metrics"][metric])
            ax_row[1].annotate(r["cell"], (r["llm_input_tokens"], r["metrics"][metric]), fontsize=7)
        if priors:
            ax_row[1].legend(fontsize=8)
        ax_row[1].set(xscale="log", xlabel="LLM input tokens per request", ylabel=metric,
                      title=f"{task}: quality vs LLM input tokens")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
