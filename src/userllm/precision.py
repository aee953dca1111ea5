"""bf16 autocast, the one way every layer runs it: stage-1 and stage-2 training, scoring, answers, generation.

Example::

    with autocast(cfg.bf16, "cuda:0"):   # a context that does nothing when bf16 is False
        loss = model(batch)
"""

from __future__ import annotations

import torch


def autocast(bf16: bool, device: str = "cpu") -> torch.autocast:
    """bf16 autocast on ``device``'s type (``cuda:1`` -> ``cuda``) if ``bf16``, else a context that does nothing.
    A fresh context each call; one context may be entered again after it exits."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)
