"""A chat session: the conversation so far, rendered with the tokenizer's chat template each turn.

Each user turn appends ``{"role": "user", "content": text}`` to the history, renders the whole history with
``tokenizer.apply_chat_template(history, add_generation_prompt=True)`` (so the prompt ends where the
assistant's reply begins), generates, and appends the reply as ``{"role": "assistant", ...}``.
Lines that start with ``/`` are commands: ``/adapter NAME`` (``/adapter base``: no adapter) switches the
adapter for the following turns, ``/reset`` clears the history, ``/quit`` ends the session.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qlorakit.errors import ConfigError, QlorakitError
from qlorakit.generate.adapters import BASE_ONLY, use_adapter
from qlorakit.generate.decode import Generation, generate_text
from qlorakit.generate.sampling import GREEDY, SamplingConfig


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` in the tokenizer's chat template, ending with the assistant prefix."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the tokenizer has no chat template; use `qlorakit generate --chat-template off` instead")
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


@dataclass
class ChatSession:
    """History plus the settings of the replies; ``say`` runs one turn, ``handle_line`` one input line."""

    model: Any
    tokenizer: Any
    sampling: SamplingConfig = GREEDY
    max_new_tokens: int = 256
    adapter: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        use_adapter(self.model, self.adapter)

    def say(self, text: str, on_text: Callable[[str], None] | None = None) -> Generation:
        """One user turn: generate the reply (streamed to ``on_text``) and add both to the history."""
        messages = [*self.history, {"role": "user", "content": text}]
        reply = generate_text(
            self.model, self.tokenizer, chat_prompt_ids(self.tokenizer, messages), self.max_new_tokens,
            self.sampling, on_text,
        )
        self.history = [*messages, {"role": "assistant", "content": reply.text}]
        return reply

    def switch_adapter(self, name: str) -> None:
        use_adapter(self.model, name)
        self.adapter = None if name == BASE_ONLY else name

    def handle_line(self, line: str, write: Callable[[str], None]) -> bool:
        """Process one input line, writing output through ``write``; return ``False`` after ``/quit``."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self._command(text, write)
        self.say(text, on_text=write)
        write("\n")
        return True

    def _command(self, text: str, write: Callable[[str], None]) -> bool:
        command, _, argument = text.partition(" ")
        if command == "/quit":
            return False
        if command == "/reset":
            self.history = []
            write("[history cleared]\n")
        elif command == "/adapter" and argument.strip():
            try:
                self.switch_adapter(argument.strip())
            except QlorakitError as exc:
                write(f"[error: {exc}]\n")
            else:
                write(f"[adapter: {self.adapter or BASE_ONLY}]\n")
        else:
            write(f"[unknown command {text!r}; commands: /adapter NAME, /reset, /quit]\n")
        return True
