"""One reader per ``--source``. Each returns :class:`~userllm.data.readers.common.RawData`."""

from __future__ import annotations

from pathlib import Path

from userllm.config import PrepareConfig
from userllm.data.readers.amazon import read_amazon
from userllm.data.readers.common import RawData, ReadContext
from userllm.data.readers.google_local import read_google_local
from userllm.data.readers.movielens import read_embedded_movielens_100k, read_movielens
from userllm.data.readers.synthetic import read_synthetic


def read_source(cfg: PrepareConfig, ctx: ReadContext) -> RawData:
    """Dispatch on ``cfg.source``."""
    paths = [Path(p) for p in cfg.paths]
    if cfg.source == "synthetic":
        return read_synthetic(paths, ctx, cfg.synthetic)
    reader = {
        "movielens-100k": read_embedded_movielens_100k,
        "movielens": read_movielens,
        "amazon": read_amazon,
        "google-local": read_google_local,
    }[cfg.source]
    return reader(paths, ctx)


__all__ = ["RawData", "ReadContext", "read_source"]
