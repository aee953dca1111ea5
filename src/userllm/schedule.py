"""The learning-rate schedule both training stages use."""

from __future__ import annotations

import math


def lr_lambda(warmup: int, total: int):
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f
