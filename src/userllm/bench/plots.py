"""The benchmarks' figures: ``efficiency.png`` (``userllm bench efficiency``), ``prefix.png`` (``userllm bench
prefix``) and ``serve.png`` (``userllm bench serve``), each drawn from its report; ``userllm plot RECORD``
redraws any of them from its JSON record (:func:`plot_record`)."""

from __future__ import annotations

from pathlib import Path


def two_panels():
    """A figure of two side-by-side panels, drawn off-screen: ``(figure, axes)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(12, 4.5))


def log_log(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)


def save(fig, axes, path: Path) -> None:
    """Legends and grids on, written to a temporary file and renamed into place."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def plot_serve(report: dict, path: Path) -> None:
    fig, axes = two_panels()
    for method, rows in report["methods"].items():
        c = [r["concurrency"] for r in rows]
        axes[0].plot(c, [r["requests_per_s"] for r in rows], marker="o", label=method)
        axes[1].plot(c, [r["p50_s"] for r in rows], marker="o", label=f"{method} p50")
        axes[1].plot(c, [r["p99_s"] for r in rows], marker="x", ls="--", label=f"{method} p99")
    log_log(axes[0], "concurrent clients", "requests/s", "throughput")
    log_log(axes[1], "concurrent clients", "seconds", "latency")
    fig.suptitle(f"userllm serve, {report['history']}-event histories, {report['max_tokens']}-token answers")
    save(fig, axes, path)


def plot_efficiency(report: dict, path: Path) -> None:
    """FLOPs per request and prefill latency (batch 1) vs history length, log scale, one line per method, and
    TP with its history prefix cached on a hit."""
    fig, axes = two_panels()
    b = report["batch_sizes"][0]
    for name in dict.fromkeys(r["method"] for r in report["rows"]):  # in the order measured
        rows = sorted((r for r in report["rows"] if r["method"] == name), key=lambda r: r["history"])
        x = [r["history"] for r in rows]
        axes[0].plot(x, [r["flops_prefill"] for r in rows], marker="o", label=name)
        axes[1].plot(x, [r[f"prefill_b{b}"]["median_s"] * 1e3 for r in rows], marker="o", label=name)
    tp = sorted(report.get("prefix_cache", []), key=lambda r: r["history"])
    if tp:  # TP with its history prefix cached, on a hit: only the question prefilled
        x = [r["history"] for r in tp]
        label = "text_prompt+prefix_cache (hit)"
        axes[0].plot(x, [r["hit_prefill_flops"] for r in tp], marker="s", ls="--", color="k", label=label)
        axes[1].plot(x, [r["hit_prefill_s"] * 1e3 for r in tp], marker="s", ls="--", color="k", label=label)
    log_log(axes[0], "history length (events)", "prefill FLOPs per request", f"FLOPs ({report['backbone']})")
    log_log(axes[1], "history length (events)", f"prefill latency, batch {b} (ms)", f"latency ({report['device']})")
    save(fig, axes, path)


def plot_prefix(report: dict, path: Path) -> None:
    """Memory per cached user against history length (TP's KV prefix, User-LLM's context), and the replay's
    requests/s against the number of active users sharing one cache budget; log scales."""
    import matplotlib.ticker

    fig, axes = two_panels()
    for name in dict.fromkeys(r["method"] for r in report["rows"]):
        rows = sorted((r for r in report["rows"] if r["method"] == name), key=lambda r: r["history"])
        axes[0].plot([r["history"] for r in rows], [r["bytes_per_user"] / 2**20 for r in rows], marker="o", label=name)
    rp = report["replay"]
    for name in rp["by_users"][0]:
        groups = [g[name] for g in rp["by_users"]]
        axes[1].plot([g["users"] for g in groups], [g["requests_per_s"] for g in groups], marker="o", label=name)
    log_log(
        axes[0],
        "history length (events)",
        "MiB per cached user (float32)",
        f"memory per cached user ({report['backbone']})",
    )
    budget = f"{rp['budget_bytes'] / 2**30:g} GiB per method, {rp['history']} events (replay)"
    log_log(axes[1], "active users (Zipf 1.0)", "requests/s", budget)
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,g}")
    axes[0].set_xticks(report["lengths"], [f"{n:,}" for n in report["lengths"]])
    axes[1].set_xticks([g["users"] for g in groups], [f"{g['users']:,}" for g in groups])
    for ax in axes:
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain if ax is axes[1] else matplotlib.ticker.NullFormatter())  # < 1 decade
    save(fig, axes, path)


def plot_record(record: dict, path: Path) -> str:
    """Draw a benchmark's figure from its JSON record (``efficiency.json``, ``prefix.json`` or ``serve.json``);
    returns which one it was."""
    from userllm.errors import InputError

    if "replay" in record:
        plot_prefix(record, path)
        return "prefix"
    if "batch_sizes" in record and "rows" in record:
        plot_efficiency(record, path)
        return "efficiency"
    if "methods" in record and "max_tokens" in record:
        plot_serve(record, path)
        return "serve"
    raise InputError(
        "not a record of `userllm bench efficiency`, `bench prefix` or `bench serve` (expected the keys "
        "rows + batch_sizes, rows + replay, or methods + max_tokens)"
    )
