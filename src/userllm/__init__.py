"""userllm: User-LLM (Ning et al., arXiv 2402.13598) — personalize LLMs with user embeddings.

The pipeline, one subpackage per stage:

- :mod:`userllm.data`: raw interaction logs -> normalized events/items -> prepared timelines.
"""

__version__ = "0.1.0"
