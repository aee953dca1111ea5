"""userllm: User-LLM (Ning et al., arXiv 2402.13598): personalize LLMs with user embeddings.

The pipeline, one subpackage per stage, each importing only the ones before it:

- :mod:`userllm.data`: raw interaction logs -> normalized events/items -> prepared timelines.
- :mod:`userllm.encoder`: stage 1, the user encoder (pretraining, evaluation, embeddings).
- :mod:`userllm.llm`: stage 2, connectors and ``UserLLM`` (cross-attention or soft prompt).
- :mod:`userllm.tasks`: the paper's tasks: training, evaluation, experiments, and loading trained runs.
- :mod:`userllm.serve`, :mod:`userllm.bench`: the HTTP service and the benchmarks; :mod:`userllm.cli` on top.

The public API::

    import userllm

    ds = userllm.PreparedDataset("outputs/ml-100k")      # a `userllm prepare` output
    run = userllm.load("runs/xattn")                      # a `userllm train` run: a Pipeline
    run.answer(["122"], top=3)
    encoder = userllm.load("runs/encoder")                # a `userllm pretrain` run: an EncoderRun

Names are imported on first use, so ``import userllm`` stays light (no torch until a model is needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "load": "userllm.tasks.pipeline",
    "Pipeline": "userllm.tasks.pipeline",
    "EncoderRun": "userllm.encoder.pretrained",
    "PreparedDataset": "userllm.data.dataset",
    "PrepareConfig": "userllm.config",
    "PretrainConfig": "userllm.config",
    "EncoderConfig": "userllm.config",
    "TrainConfig": "userllm.config",
    "UserLLMConfig": "userllm.config",
    "load_config": "userllm.config",
}
__all__ = [
    "__version__",
    "load",
    "Pipeline",
    "EncoderRun",
    "PreparedDataset",
    "PrepareConfig",
    "PretrainConfig",
    "EncoderConfig",
    "TrainConfig",
    "UserLLMConfig",
    "load_config",
]

if TYPE_CHECKING:
    from userllm.config import EncoderConfig, PrepareConfig, PretrainConfig, TrainConfig, UserLLMConfig, load_config
    from userllm.data.dataset import PreparedDataset
    from userllm.encoder.pretrained import EncoderRun
    from userllm.tasks.pipeline import Pipeline, load


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'userllm' has no attribute {name!r}")
