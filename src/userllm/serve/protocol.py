"""The wire format of ``userllm serve``: OpenAI's Chat Completions request, the events endpoint's request,
the server's settings, and errors in OpenAI's JSON shape (``{"error": {"message", "type", "param", "code"}}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from userllm.errors import InputError


@dataclass
class ServeConfig:
    """The server's settings (``userllm serve`` flags)."""

    api_key: str | None = None
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_body_bytes: int = 1 << 20  # 1 MiB
    max_events_per_request: int = 1000
    max_tokens: int = 256  # the longest completion a request may ask for (and the default)
    allow_unknown_users: bool = False  # answer a user without events (or no ``user``) unpersonalized
    max_prompt_tokens: int | None = None  # the longest prompt accepted (None: the model's context, less max_tokens)
    request_timeout_s: float = 300.0  # a chat still decoding after this long is ended with an error (504)


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
) -> dict:
    kind = kind or (
        "server_error" if status >= 500 else "authentication_error" if status == 401 else "invalid_request_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: str = Field(min_length=1, max_length=128)
    rating: float | None = Field(None, allow_inf_nan=False)
    timestamp: int = Field(ge=0, le=32503680000, description="seconds since the Unix epoch")
    text: str | None = Field(None, max_length=20000)
    event_id: str | None = Field(None, min_length=1, max_length=128)

    @field_validator("item_id", "event_id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is not None and (v != v.strip() or not v.isprintable()):
            raise ValueError("ids are printable text without surrounding spaces")
        return v


class EventsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(min_length=1)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    user: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    ignore_eos: bool = Field(
        False, description="(vLLM's extension) decode max_tokens tokens whatever the model says: for benchmarks"
    )


WEIGHTS = ("float32", "int4")  # how the served backbone holds its weights


def check_weights(weights: str) -> str:
    if weights not in WEIGHTS:
        raise InputError(f"weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
    return weights
