"""What the server's model thread works on: a chat request (:class:`Job`), what conditions a user's answers
(:class:`Conditioning`), and a request while it decodes (:class:`Row`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from userllm.llm.base import UserContext


@dataclass(eq=False)  # compared (and hashed) by identity: the engine keeps the jobs in flight in a set
class Job:
    """One chat request as the engine decodes it. ``emit(kind, payload)`` receives ``("delta", text)`` as
    tokens are decoded, then ``("done", {"finish_reason", "usage"})``, or ``("error", exception)``."""

    user: str | None
    messages: list[dict[str, str]]
    max_tokens: int
    emit: Callable[[str, object], None]
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    deadline: float | None = None  # monotonic time after which the request is ended with an error
    cancelled: str | None = None  # why the request was ended early: "client" (it went away) or "shutdown"

    def cancel(self, reason: str) -> None:
        """End the request at the model thread's next token (or before it starts): ``client``, when the
        client went away (nothing more is sent), or ``shutdown``, when the server stops (it gets a 503)."""
        self.cancelled = self.cancelled or reason


@dataclass
class Conditioning:
    """What conditions one user's answers, from their committed events: User-LLM's ``context``, or TP's history
    ``lines`` (and, for a TP run trained with ``llm.candidates``, the ``candidates`` its prompt lists: the
    stage-1 encoder's top titles after the same events, as in training); ``events``: how many events."""

    context: UserContext | None = None
    lines: list[str] | None = None
    candidates: list[str] | None = None
    events: int = 0


@dataclass
class Row:
    """A job while it decodes: its tokens, the text already emitted, and how it ended."""

    job: Job
    prompt_tokens: int
    events: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    finish: str | None = None
