"""Stage 1 of User-LLM: the user encoder, its pretraining, evaluation and embedding export."""

from userllm.encoder.model import EncoderState, UserEncoder

__all__ = ["EncoderState", "UserEncoder"]
