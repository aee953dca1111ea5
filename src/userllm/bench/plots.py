"""The benchmarks' figures: ``efficiency.png`` (``userllm bench efficiency``) and ``serve.png``
(``userllm bench serve``), each drawn from its report."""

from __future__ import annotations

from pathlib import Path


def plot_serve(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, rows in report["methods"].items():
        c = [r["concurrency"] for r in rows]
        axes[0].plot(c, [r["requests_per_s"] for r in rows], marker="o", label=method)
        axes[1].plot(c, [r["p50_s"] for r in rows], marker="o", label=f"{method} p50")
        axes[1].plot(c, [r["p99_s"] for r in rows], marker="x", ls="--", label=f"{method} p99")
    axes[0].set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="requests/s", title="throughput")
    axes[1].set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="seconds", title="latency")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"userllm serve, {report['history']}-event histories, {report['max_tokens']}-token answers")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def plot_efficiency(report: dict, path: Path) -> None:
    """FLOPs per request and prefill latency (batch 1) vs history length, log scale, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    b = report["batch_sizes"][0]
    for name in dict.fromkeys(r["method"] for r in report["rows"]):  # in the order measured
        rows = sorted((r for r in report["rows"] if r["method"] == name), key=lambda r: r["history"])
        if not rows:
            continue
        x = [r["history"] for r in rows]
        axes[0].plot(x, [r["flops_prefill"] for r in rows], marker="o", label=name)
        axes[1].plot(x, [r[f"prefill_b{b}"]["median_s"] * 1e3 for r in rows], marker="o", label=name)
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="history length (events)",
        ylabel="prefill FLOPs per request",
        title=f"FLOPs ({report['backbone']})",
    )
    axes[1].set(
        xscale="log",
        yscale="log",
        xlabel="history length (events)",
        ylabel=f"prefill latency, batch {b} (ms)",
        title=f"latency ({report['device']})",
    )
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
