"""How the benchmarks measure a request: FLOPs counted on the real forward passes, warm timings (median and
p90, several functions in turn for paired ratios), and the peak resident memory above the live working set."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from userllm.memory import release_memory, rss_bytes

_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: (
        sdpa_flop_count(q, k, v)
    )
}


def count_flops(fn) -> int:
    """Matrix-multiply and attention FLOPs of ``fn()`` (torch.utils.flop_counter; CPU attention included)."""
    with FlopCounterMode(display=False, custom_mapping=_SDPA) as counter:
        fn()
    return counter.get_total_flops()


class PeakRSS:
    """Peak resident memory above the start (after returning freed heap memory to the OS), sampled every
    2 ms on a thread (Linux /proc); on CUDA the allocator's peak instead."""

    def __init__(self, device: str) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        release_memory()  # the base is the live working set, not old peaks
        self.base = rss_bytes()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss_bytes() - self.base)


def timed(fn, repeats: int, device: str) -> dict[str, float]:
    """Median and p90 seconds of ``fn()`` over ``repeats`` warm runs (one warm-up run first)."""
    return timed_in_turn({"fn": fn}, repeats, device)["fn"]


def timed_in_turn(fns: dict[str, Callable], repeats: int, device: str) -> dict[str, dict]:
    """:func:`timed` for several functions run in turn within each repeat, so a drift in the machine's speed
    hits them alike; each result also holds its per-repeat seconds (``times_s``) for paired ratios."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    return {
        k: {"median_s": statistics.median(t), "p90_s": float(np.quantile(t, 0.9)), "times_s": t}
        for k, t in times.items()
    }


def paired_ratio(a: dict, b: dict) -> float:
    """Median over repeats of ``a``'s seconds / ``b``'s seconds in the same repeat (:func:`timed_in_turn`)."""
    return statistics.median(x / y for x, y in zip(a["times_s"], b["times_s"]))
