"""The text-prompt (TP) baseline: the backbone alone, reading the user's history written out in its prompt."""

from __future__ import annotations

from contextlib import contextmanager

from torch import Tensor, nn

from userllm.config import UserLLMConfig
from userllm.errors import InputError
from userllm.llm.base import ConditionedLM, apply_llm_strategy
from userllm.llm.decoding import positions


class TextPromptLM(ConditionedLM):
    """The text-prompt (TP) baseline: the backbone alone, reading the user's history written out as text in
    its prompt. Trained like User-LLM's LLM (``full`` or ``lora``); ``user_batch`` arguments are ignored.

    Example::

        tp = TextPromptLM(UserLLMConfig(strategy="lora"), llm=backbone.model)
        loss = tp(None, input_ids, attention_mask, labels).loss
    """

    method = "textprompt"

    def __init__(self, cfg: UserLLMConfig, *, llm: nn.Module) -> None:
        super().__init__()
        if cfg.strategy not in ("full", "lora"):
            raise InputError(
                f"the text-prompt baseline has no encoder or connectors to train: strategy must be full or "
                f"lora, got {cfg.strategy!r}"
            )
        self.cfg = cfg
        self.llm = apply_llm_strategy(llm, cfg)

    def forward(self, user_batch, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None):
        return self.llm(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask), labels=labels
        )

    @contextmanager
    def conditioned(self, user_batch, input_ids: Tensor, attention_mask: Tensor, *, context=None):
        yield self.llm.get_input_embeddings()(input_ids), attention_mask.long()

    @contextmanager
    def context_rows(self, rows: Tensor):
        """No user context besides the prompt, which lives in the KV cache."""
        yield
