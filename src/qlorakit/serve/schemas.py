"""The request bodies of the OpenAI-compatible endpoints as pydantic models (validated before any work).

Fields follow OpenAI's chat-completions and completions APIs; the ones this server cannot honour are
refused with a 400 naming them (``n`` other than 1, a ``logprobs`` request) rather than ignored. Unknown
fields are ignored, as OpenAI's own clients send optional ones.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: At most this many stop strings (OpenAI's limit).
MAX_STOPS = 4


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Literal[False, None] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"give at most {MAX_STOPS} non-empty stop strings")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: ``messages`` rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Request):
    """``POST /v1/completions``: a plain-text ``prompt`` (OpenAI's default ``max_tokens`` is 16)."""

    prompt: str = Field(min_length=1)


class AdapterRequest(BaseModel):
    """``POST /v1/adapters``: load the PEFT adapter directory ``path`` under ``name``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_@:+-]*$")
    path: str = Field(min_length=1)


_Request.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
