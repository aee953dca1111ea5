"""Prometheus metrics of ``userllm serve`` (text exposition format 0.0.4, at ``GET /metrics``).

=========================================  =========  =====================================================
metric                                     type       labels
=========================================  =========  =====================================================
``userllm_requests_total``                 counter    endpoint, status
``userllm_request_seconds``                histogram  endpoint
``userllm_time_to_first_token_seconds``    histogram  (streamed chat completions)
``userllm_events_appended_total``          counter
``userllm_context_total``                  counter    result: hit (cached, unchanged), append (incremental
                                                      update), miss (computed), stale / corrupt (on-disk
                                                      entry recomputed)
``userllm_batch_size``                     histogram  (chat requests decoded together)
``userllm_refresh_batch_size``             histogram  (users' contexts refreshed together after appends)
``userllm_generated_tokens_total``         counter
``userllm_requests_abandoned_total``       counter    (chats dropped because their client went away)
``userllm_requests_timed_out_total``       counter    (chats ended by the per-request time limit)
``userllm_prefix_cache_total``             counter    result: hit / extend / miss (a TP run's cached history
                                                      prefixes, ``--cache-bytes``)
``userllm_batches_split_total``            counter    (batches decoded in parts to fit the memory)
=========================================  =========  =====================================================
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
HELP = {
    "userllm_requests_total": ("counter", "HTTP requests by endpoint and status"),
    "userllm_request_seconds": ("histogram", "HTTP request latency by endpoint"),
    "userllm_time_to_first_token_seconds": ("histogram", "time to the first streamed token"),
    "userllm_events_appended_total": ("counter", "events committed to the store"),
    "userllm_context_total": ("counter", "user contexts served, by how they were obtained"),
    "userllm_batch_size": ("histogram", "chat requests decoded together"),
    "userllm_refresh_batch_size": ("histogram", "user contexts refreshed together after appends"),
    "userllm_generated_tokens_total": ("counter", "completion tokens generated"),
    "userllm_requests_abandoned_total": ("counter", "chat requests dropped because their client went away"),
    "userllm_requests_timed_out_total": ("counter", "chat requests ended by the per-request time limit"),
    "userllm_prefix_cache_total": ("counter", "TP history prefixes looked up, by how much was reused"),
    "userllm_batches_split_total": ("counter", "chat batches decoded in parts to fit the memory"),
}


def buckets_of(name: str) -> tuple:
    """A histogram's bucket edges: sizes (``*_batch_size``) or seconds."""
    return BATCH_BUCKETS if name.endswith("_batch_size") else LATENCY_BUCKETS


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in sorted(labels.items())
    )
    return "{" + ",".join(escaped) + "}"


class Metrics:
    """Counters and histograms, thread-safe; :meth:`render` writes them for Prometheus."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.histograms: dict[str, dict[str, list]] = defaultdict(dict)  # name -> labels -> [bucket counts, sum, n]

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self.lock:
            self.counters[name][_labels(labels)] += value

    def observe(self, name: str, value: float, **labels: str) -> None:
        buckets = buckets_of(name)
        with self.lock:
            h = self.histograms[name].setdefault(_labels(labels), [[0] * len(buckets), 0.0, 0])
            for i, edge in enumerate(buckets):
                if value <= edge:
                    h[0][i] += 1
            h[1] += value
            h[2] += 1

    def render(self) -> str:
        lines = []
        with self.lock:
            for name in sorted(set(self.counters) | set(self.histograms)):
                kind, text = HELP.get(name, ("untyped", name))
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                for labels, value in sorted(self.counters.get(name, {}).items()):
                    lines.append(f"{name}{labels} {value:g}")
                buckets = buckets_of(name)
                for labels, (counts, total, n) in sorted(self.histograms.get(name, {}).items()):
                    inner = labels[1:-1] + "," if labels else ""
                    lines += [f'{name}_bucket{{{inner}le="{edge:g}"}} {c}' for edge, c in zip(buckets, counts)]
                    lines += [
                        f'{name}_bucket{{{inner}le="+Inf"}} {n}',
                        f"{name}_sum{labels} {total:g}",
                        f"{name}_count{labels} {n}",
                    ]
        return "\n".join(lines) + "\n"
