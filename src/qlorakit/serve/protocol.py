"""OpenAI's wire format for answers: completion objects, stream chunks, usage, and the error body.

Every error is ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status of its kind, as
OpenAI's API returns them (the official client raises ``BadRequestError`` for 400, ``AuthenticationError``
for 401, ``NotFoundError`` for 404, ``RateLimitError`` for 429, ...).
"""

from __future__ import annotations

import json
import time
from typing import Any

from qlorakit.serve.engine import Outcome

#: HTTP status -> OpenAI's error ``type``.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}  # fmt: skip


class ApiError(Exception):
    """An answer with an error status; ``body`` is OpenAI's error object."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def usage(outcome: Outcome) -> dict[str, int]:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


def chat_completion(job_id: str, model: str, outcome: Outcome) -> dict[str, Any]:
    message = {"role": "assistant", "content": outcome.text}
    return {"id": f"chatcmpl-{job_id}", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": outcome.finish_reason, "logprobs": None}],
            "usage": usage(outcome)}


def text_completion(job_id: str, model: str, outcome: Outcome) -> dict[str, Any]:
    choice = {"index": 0, "text": outcome.text, "finish_reason": outcome.finish_reason, "logprobs": None}
    return {"id": f"cmpl-{job_id}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage(outcome)}


def chunk(chat: bool, job_id: str, model: str, text: str | None, finish_reason: str | None = None,
          first: bool = False) -> dict[str, Any]:
    """One stream chunk: a text delta, or (``finish_reason`` set) the last one of the choice."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"id": f"chatcmpl-{job_id}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model, "choices": [choice]}
    choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    return {"id": f"cmpl-{job_id}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice]}


def usage_chunk(chat: bool, job_id: str, model: str, outcome: Outcome) -> dict[str, Any]:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
    prefix, kind = ("chatcmpl", "chat.completion.chunk") if chat else ("cmpl", "text_completion")
    return {"id": f"{prefix}-{job_id}", "object": kind, "created": int(time.time()), "model": model,
            "choices": [], "usage": usage(outcome)}


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` (or ``data: [DONE]``) and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
