"""Stage 2 of User-LLM: contextualizing a decoder LLM with user embeddings (cross-attention or soft prompt)."""

from userllm.llm.connectors import GatedCrossAttentionBlock, PerceiverResampler, Projector

__all__ = ["GatedCrossAttentionBlock", "PerceiverResampler", "Projector"]
