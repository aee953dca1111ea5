"""userllm: User-LLM (Ning et al., arXiv 2402.13598) — personalize LLMs with user embeddings.

The pipeline, one subpackage per stage:

- :mod:`userllm.data`: raw interaction logs -> normalized events/items -> prepared timelines.
- :mod:`userllm.encoder`: stage 1, the user encoder (pretraining, evaluation, embeddings).
- :mod:`userllm.llm`: stage 2, connectors and ``UserLLM`` (cross-attention or soft prompt).
- :mod:`userllm.eval`: ranking metrics.
"""

__version__ = "0.1.0"
