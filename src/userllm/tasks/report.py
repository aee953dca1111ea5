"""An experiment's results: ``results.json`` (one entry per finished cell and reference row) and
``results.md`` (a table per task, reference rows last, and the paired differences between cells), with
every metric's 95% bootstrap interval over users; the figures are drawn by :mod:`userllm.tasks.plots`.
"""

from __future__ import annotations

import json
from pathlib import Path

from userllm.errors import InputError
from userllm.io import write_json, write_text_atomically
from userllm.progress import console
from userllm.tasks.records import (
    answer_summary,
    paired_difference,
    paired_vs_encoder,
    paired_vs_random_order,
    rescore,
    scored_users,
)

MAIN_METRIC = {"next_item": "recall@10", "favorite_genre": "accuracy", "review": "rougeLsum"}


REFERENCES = {
    "label prior": "prior",
    "most common review": "common-review",
    "encoder alone": "encoder",
    "shortlist in random order": "random-order",
}  # -> cell name


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
            rows.append(
                {
                    "dataset": Path(c["dataset"]).name,
                    "task": task,
                    "cell": cell["name"],
                    "method": c["method"],
                    "mode": c["llm"]["mode"] if c["method"] == "userllm" else "text",
                    "history": c["max_history"],
                    "train_examples": summary["examples"],
                    "train_flops": summary.get("train_flops"),
                    "train_seconds": summary["train_seconds"],
                    "users": m["examples"],
                    "commit": summary.get("commit"),
                    "metrics": m["metrics"],
                    "precision": m.get("precision", "fp32"),  # scored in; fp32 before --bf16
                    "strategy": c["llm"]["strategy"],
                    "perceiver": c["llm"]["perceiver_latents"] if c["method"] == "userllm" else 0,
                    "item_words": ",".join(c["llm"].get("item_words") or []) if c["method"] == "userllm" else "",
                    "xattn_layers": (f"{layers}" if layers else f"every {c['llm']['cross_attention_every']}")
                    if xattn
                    else "-",
                    "encoder": encoder,
                    "llm_input_tokens": m["llm_input_tokens"],
                    "general": m.get("general"),
                    "references": m.get("references") or {},
                    "run": str(run),
                    "subset": bool((cell.get("evaluate") or {}).get("users")),  # scored on users of its own
                    "shortlist": c.get("shortlist", 0) if task == "next_item" else 0,
                    "exclude_history": task == "next_item"
                    and bool(c["llm"].get("exclude_history")),  # what the shortlist leaves out
                }
            )
    return rows


def reference_rows(rows: list[dict]) -> list[dict]:
    """One row per (task, history length, reference) of the finished cells, from their metrics.json: the label
    prior (review: the most common review) and, for next_item, the stage-1 encoder alone (from a cell with the pretrained encoder), on the same
    test users as the cells."""
    out = []
    for task, history in sorted({(r["task"], r["history"]) for r in rows}):
        # from a cell scored on the spec's users, with the pretrained encoder where there is one
        cells = sorted(
            (r for r in rows if (r["task"], r["history"]) == (task, history)),
            key=lambda r: (r["subset"], r["encoder"] != "pretrained"),
        )
        for name, short in REFERENCES.items():
            cell = next((r for r in cells if name in r["references"]), None)
            if cell is None:
                continue
            out.append(
                {
                    "dataset": cell["dataset"],
                    "task": task,
                    "cell": f"{short}-h{history}",
                    "method": name,
                    "mode": "-",
                    "history": history,
                    "train_examples": 0,
                    "train_flops": 0,
                    "train_seconds": 0.0,
                    "users": cell["users"],
                    "precision": "-",
                    "commit": cell["commit"],
                    "metrics": cell["references"][name],
                    "strategy": "-",
                    "perceiver": 0,
                    "item_words": "",
                    "xattn_layers": "-",
                    "encoder": "-",
                    "llm_input_tokens": 0.0,
                    "general": None,
                    "references": {},
                    "run": cell["run"],
                    "subset": cell["subset"],
                    "shortlist": 0,
                    "exclude_history": cell["exclude_history"],  # the encoder alone: its own top K
                }
            )
    return out


def same_users_rows(rows: list[dict], cell: dict, seed: int) -> list[dict]:
    """The table of a cell scored on a subset of users (e.g. TP, too slow for all): that cell, every other
    cell of its task and history whose records cover those users re-scored on them (from records.jsonl),
    and the references it was scored with."""
    users = scored_users(Path(cell["run"]))
    out = [cell]
    for r in rows:
        if (
            (r["task"], r["history"]) == (cell["task"], cell["history"])
            and r is not cell
            and r["method"] in ("userllm", "textprompt")
        ):
            try:
                out.append({**r, "metrics": rescore(Path(r["run"]), users, seed), "users": len(users)})
            except InputError as e:  # scored on other users (e.g. the spec's own subset): not comparable
                console.print(f"[yellow]{r['cell']} is left out of the table of {cell['cell']}'s users: {e}[/yellow]")
    for name, metrics in cell["references"].items():
        out.append(
            {
                **cell,
                "cell": f"{name} (same users)",
                "method": name,
                "metrics": metrics,
                "mode": "-",
                "train_examples": 0,
                "train_flops": 0,
                "strategy": "-",
                "perceiver": 0,
                "item_words": "",
                "xattn_layers": "-",
                "encoder": "-",
                "general": None,
            }
        )
    return out


def difference_lines(rows: list[dict], task: str, seed: int) -> list[str]:
    """A markdown table of every User-LLM cell minus every TP cell of ``task`` that answers the same question
    (:func:`comparable_pairs`), paired over the test users both were scored on (:func:`~userllm.tasks.records.paired_difference`): a difference
    whose interval excludes 0 is one the users support."""
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
            out = [
                f"#### {task}: User-LLM minus TP, paired over the same users",
                "",
                "| User-LLM cell | TP cell | users | " + " | ".join(f"{m} difference" for m in diff) + " |",
                "|" + "---|" * (3 + len(diff)),
            ]
        out.append(f"| {a['cell']} | {b['cell']} | {users} | " + " | ".join(signed(d) for d in diff.values()) + " |")
    if out:
        out += [
            "",
            "Mean per-user difference with its 95% bootstrap interval (users resampled with both answers "
            "together); an interval that excludes 0 separates the two cells.",
            "",
        ]
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
    return [
        (a, b) for a in cells if a["method"] == "userllm" for b in cells if b["method"] == "textprompt" and same(a, b)
    ]


def reference_difference_lines(cells: list[dict], task: str, seed: int) -> list[str]:
    """Markdown tables of every cell of ``task`` minus a reference on the cell's own users, paired per user:
    minus the stage-1 encoder alone (:func:`~userllm.tasks.records.paired_vs_encoder`: does the LLM rank
    better than the encoder it reads?) and minus its shortlist in random order
    (:func:`~userllm.tasks.records.paired_vs_random_order`: does its order find the next item more often than
    no order?). A cell without what a reference needs (a stage-1 encoder, a whole shortlist) is left out of it."""
    references = (
        (
            "the encoder alone",
            paired_vs_encoder,
            "the stage-1 encoder's own top titles for the same user (with a "
            "shortlist, its order of the very list the LLM ranked).",
        ),
        (
            "the shortlist in random order",
            paired_vs_random_order,
            "the expected metric of the same list in "
            "uniformly random order, 1[target listed] * min(1, K / list length): what a reranker that ignores the "
            "user gets.",
        ),
    )
    out = []
    for name, paired, note in references:
        lines = []
        for cell in cells:
            try:
                users, diff = paired(Path(cell["run"]), seed)
            except InputError:  # scored without what the reference needs
                continue
            if not lines:
                lines = [
                    f"#### {task}: each cell minus {name}, paired over the cell's users",
                    "",
                    "| cell | users | " + " | ".join(f"{m} difference" for m in diff) + " |",
                    "|" + "---|" * (2 + len(diff)),
                ]
            lines.append(f"| {cell['cell']} | {users} | " + " | ".join(signed(d) for d in diff.values()) + " |")
        out += lines + ["", f"{name[0].upper()}{name[1:]}: {note}", ""] if lines else []
    return out


def signed(m: dict) -> str:
    return f"{m['value']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]"


RESULT_KEYS = (
    "dataset",
    "task",
    "cell",
    "method",
    "mode",
    "history",
    "train_examples",
    "train_flops",
    "train_seconds",
    "users",
    "precision",
    "shortlist",
    "exclude_history",
    "commit",
    "metrics",
)


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
    tabled = set()  # (task, history, users) already shown: cells scored on the same users share a table
    for cell in [r for r in rows if r["subset"] and r["method"] in ("userllm", "textprompt")]:
        key = (cell["task"], cell["history"], frozenset(scored_users(Path(cell["run"]))))
        if key in tabled:
            continue
        tabled.add(key)
        same = same_users_rows(rows, cell, seed)
        tables.append(
            (
                cell["task"],
                f"### {cell['task']}: on the {cell['users']} test users {cell['cell']} was scored on",
                same,
                scored_users(Path(cell["run"])),
            )
        )
    for task, title, part, users in tables:
        if not part:
            continue
        names = list(next(r for r in part if r["method"] not in REFERENCES)["metrics"])
        lines += [
            title,
            "",
            "| cell | method | mode | xattn layers | strategy | perceiver | item words | encoder | history | users | "
            + " | ".join(names)
            + " | answers | train examples | train PFLOPs | train s | LLM input tokens | ppl after/before |",
            "|" + "---|" * (len(names) + 16),
        ]
        for r in part:
            ppl = f"{r['general']['ratio']:.3f}" if r["general"] else "-"
            ref = r["method"] in REFERENCES
            flops = f"{r['train_flops'] / 1e15:.2f}" if r["train_flops"] else "-"
            cost = (
                "- | - | - | -"
                if ref
                else f"{r['train_examples']} | {flops} | {r['train_seconds']:.0f} | {r['llm_input_tokens']:.0f}"
            )
            cost = ("-" if ref else answer_summary(Path(r["run"]), users)) + " | " + cost
            mode = f"{r['mode']}, shortlist {r['shortlist']}" if r.get("shortlist") else r["mode"]
            lines.append(
                f"| {r['cell']} | {r['method']} | {mode} | {r['xattn_layers']} | {r['strategy']} | {r['perceiver'] or '-'} | "
                f"{r['item_words'] or '-'} | {r['encoder']} | {r['history']} | {r['users']} | "
                + " | ".join(interval(r["metrics"][n]) if n in r["metrics"] else "-" for n in names)
                + f" | {cost} | {ppl} |"
            )
        lines += [
            "",
            "Each metric with its 95% bootstrap interval over the test users scored. "
            "Label prior: the train split's most frequent answers, whoever the user (next_item: the most popular "
            "titles; favorite_genre: the most frequent genre; review: the most common review). Encoder alone: the "
            "stage-1 encoder's own top items as titles. Answers: how many distinct top answers the cell gave "
            "and its most frequent one. Train FLOPs: analytic, 3 forwards per example."
            + (
                " Shortlist N: the LLM ranked only the titles of the stage-1 encoder's N highest-scoring items "
                "for each user (the encoder alone ranks the same list), all N exactly by log p(title + eos)."
                if any(r.get("shortlist") for r in part)
                else ""
            ),
            "",
        ]
        if title == f"### {task}":
            lines += difference_lines(rows, task, seed)
    write_text_atomically(out / "results.md", "\n".join(lines))
    if rows:
        from userllm.tasks.plots import plot  # matplotlib only when there is a figure to draw

        plot(rows, spec["tasks"], out / "results.png")
    return out / "results.md"


def summary(spec: dict) -> list[tuple[str, list[list[str]]]]:
    """The experiment at a glance, per task: each finished cell and reference row with its training compute,
    users and main metric (95% interval), then each User-LLM cell minus each TP cell that answers the same
    question, paired over their common users. Returns (title, rows); the first row is the header."""
    rows = collect(spec)
    rows += reference_rows(rows)
    seed = (spec.get("evaluate") or {}).get("seed", 0)
    out = []
    for task in spec["tasks"]:
        part = [r for r in rows if r["task"] == task]
        if not part:
            continue
        metric = MAIN_METRIC[task]
        table = [["", "method", "training PFLOPs", "users", f"{metric} [95% interval]"]]
        for r in sorted(part, key=lambda r: r["method"] in REFERENCES):
            flops = f"{r['train_flops'] / 1e15:.3f}" if r["train_flops"] else "-"
            value = interval(r["metrics"][metric]) if metric in r["metrics"] else "-"
            table.append([r["cell"], r["method"], flops, str(r["users"]), value])
        for a, b in comparable_pairs([r for r in part if r["method"] in ("userllm", "textprompt")]):
            try:
                users, diff = paired_difference(Path(a["run"]), Path(b["run"]), seed)
            except InputError:
                continue
            table.append([f"{a['cell']} minus {b['cell']}", "paired", "", str(users), signed(diff[metric])])
        out.append((f"{task}: {metric} on the test users scored", table))
    return out
