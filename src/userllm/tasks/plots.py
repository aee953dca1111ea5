"""An experiment's figures: per task, the main metric with its 95% interval against history length and
against training compute (``results.png``, ``userllm plot``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from userllm.errors import InputError
from userllm.tasks.report import MAIN_METRIC, OPTIONAL_KEYS, RESULT_KEYS, ranked_list

REFERENCE_COLORS = {"label prior": "k", "most common review": "k", "encoder alone": "tab:purple"}  # others grey


def plot_results(
    paths: list[Path],
    out: Path,
    *,
    dataset: str | None = None,
    history: int | None = None,
    chosen: list[str] | None = None,
) -> int:
    """:func:`plot` of the cells in ``results.json`` files (e.g. ``docs/results.json``, or two experiments at
    different history lengths, so that quality vs history length has both), only ``dataset``'s cells and
    only those at ``history`` events when given; a cell in several files is drawn from the last. With
    ``chosen`` cell names: :func:`plot_methods` of those cells and the references of their panels instead.
    Returns the number of cells drawn."""
    cells: dict[tuple, dict] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: cannot read it as results.json: {e}") from None
        bad = not isinstance(data, list) or any(
            not isinstance(r, dict) or set(RESULT_KEYS) - set(r) - OPTIONAL_KEYS for r in data
        )
        if bad:
            raise InputError(
                f"{path}: expected a list of cells, each with the keys {', '.join(RESULT_KEYS)} "
                f"({', '.join(sorted(OPTIONAL_KEYS))} may be absent)"
            )
        for r in data:
            if dataset in (None, r["dataset"]) and history in (None, r["history"]):
                cells[(r["dataset"], r["task"], r["cell"], r["history"])] = r
    if not cells:
        which = (f" of dataset {dataset!r}" if dataset else "") + (
            f" at {history} events" if history is not None else ""
        )
        raise InputError(f"no cells{which} in {', '.join(map(str, paths))}")
    rows = list(cells.values())
    if chosen:
        missing = sorted(set(chosen) - {r["cell"] for r in rows})
        if missing:
            raise InputError(f"no cells named {missing} in {', '.join(map(str, paths))}")
        rows = sorted((r for r in rows if r["cell"] in chosen), key=lambda r: chosen.index(r["cell"]))
        rows += [r for r in cells.values() if r["method"] in REFERENCE_NAMES and group(r) in {group(c) for c in rows}]
        plot_methods(rows, Path(out))
        return len(rows)
    plot(rows, list(dict.fromkeys(r["task"] for r in rows)), Path(out))
    return len(rows)


METHOD_NAMES = {"userllm": "User-LLM", "textprompt": "TP"}
REFERENCE_NAMES = ("label prior", "most common review", "encoder alone")


def group(r: dict) -> tuple:
    return r["dataset"], r["task"], r["history"]


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as a PNG at ``path``: drawn to a temporary file beside it, then renamed into place."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def plot_methods(rows: list[dict], path: Path) -> None:
    """The methods side by side, one panel per (dataset, task, history length): each cell's main metric with
    its 95% interval (User-LLM and TP labelled with their training compute), then the reference rows of the
    same users (label prior, encoder alone, most common review)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(group(r) for r in rows))
    cols = min(3, len(groups))
    fig, axes = plt.subplots(
        -(-len(groups) // cols), cols, figsize=(5.2 * cols, 3.2 * -(-len(groups) // cols)), squeeze=False
    )
    for ax, key in zip(axes.flat, groups):
        metric = MAIN_METRIC[key[1]]
        part = [r for r in rows if group(r) == key and metric in r["metrics"]]
        part.sort(key=lambda r: r["method"] in REFERENCE_NAMES)  # the cells in the order given, references last
        for y, r in enumerate(part):
            m = r["metrics"][metric]
            name = METHOD_NAMES.get(r["method"], r["method"])
            label = f"{name}, {r['train_flops'] / 1e12:,.0f} TFLOPs" if r["train_flops"] else name
            label += f", top-{r['shortlist']} shortlist" if r.get("shortlist") else ""
            color = {"userllm": "tab:blue", "textprompt": "tab:orange"}.get(r["method"], "tab:gray")
            ax.errorbar(
                m["value"], y, xerr=[[m["value"] - m["low"]], [m["high"] - m["value"]]], fmt="o", color=color, capsize=3
            )
            ax.annotate(label, (m["high"], y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks([])
        ax.set_ylim(len(part) - 0.5, -0.5)
        lows, highs = [r["metrics"][metric]["low"] for r in part], [r["metrics"][metric]["high"] for r in part]
        ax.set_xlim(min(lows) - 0.02, max(highs) + (max(highs) - min(lows)) * 1.1 + 0.02)
        users = max(r["users"] for r in part)
        ax.set_title(f"{key[0]} {key[1]}, {key[2]} events ({users} users)", fontsize=9)
        ax.set_xlabel(f"{metric} (95% interval)", fontsize=8)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    save_figure(fig, path)


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
    fig, axes = plt.subplots(
        len(tasks), 1 + by_history, figsize=(13 if by_history else 9, 4.5 * len(tasks)), squeeze=False
    )
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
            line = sorted(
                ((r["history"], r["metrics"][metric]) for r in refs if r["method"] == name and metric in r["metrics"]),
                key=lambda p: p[0],
            )
            if line and history_ax is not None:
                bars(history_ax, line, ls="--", marker=".", label=name)
            for i, (_, m) in enumerate(line):
                compute_ax.axhspan(
                    m["low"],
                    m["high"],
                    alpha=0.15,
                    color=REFERENCE_COLORS.get(name, "tab:gray"),
                    label=name if i == 0 else None,
                )
        if history_ax is not None:
            history_ax.set(xlabel="history length (events)", ylabel=metric, title=f"{task}: quality vs history length")
            history_ax.legend(fontsize=8)
        markers = "osD^v<>ph*"
        trained = [p for p in part if p["train_flops"]]
        for i, (r, x) in enumerate(zip(trained, dodged([r["train_flops"] for r in trained]))):
            bars(
                compute_ax,
                [(x, r["metrics"][metric])],
                marker=markers[i % len(markers)],
                ls="none",
                color="k" if r["method"] == "textprompt" else f"C{i % 10}",
                label=f"{r['cell']} ({r['method']})",
            )
        compute_ax.set(
            xscale="log",
            xlabel="training compute (FLOPs, analytic)",
            ylabel=metric,
            title=f"{task}: quality vs training compute",
        )
        flops = [p["train_flops"] for p in part if p["train_flops"]]
        if flops:  # at least a decade wide, major ticks only: close budgets' minor labels ran into one smudge
            compute_ax.set_xlim(min(flops) / 3, max(flops) * 3)
            compute_ax.xaxis.set_minor_formatter(NullFormatter())
        compute_ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path)
