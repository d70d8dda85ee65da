"""Prompt templates: render a canonical example into text segments that are either prompt or answer.

* Instruction formats (alpaca, dolly, self-instruct) use the QLoRA paper's Alpaca prompt, exactly as
  ``ALPACA_PROMPT_DICT`` in artidoro/qlora's ``qlora.py`` (with and without the ``### Input:`` part);
  the answer follows ``### Response: `` and ends with EOS.
* Conversations (messages, oasst1) use the tokenizer's chat template when it has one (and
  ``DataConfig.chat_template`` is on), otherwise the Guanaco format of the paper's OA data:
  ``[system ]### Human: {user} ### Assistant: {answer}<eos> ### Human: ...``.

With a chat template the turn boundaries come from rendering prefixes of the conversation: for each
assistant turn ``k``, ``render(messages[:k], add_generation_prompt=True)`` is the prompt so far and
``render(messages[:k + 1])`` adds the answer. Each render must extend the previous one (the prefix
property); a template that rewrites earlier turns raises DataError. The answer segment is the message
content through the template's EOS token (``<|im_end|>`` for ChatML); formatting after the EOS (a
newline) belongs to the next prompt. A template that writes no EOS after an answer gets one appended
right after the content (its own formatting then follows as prompt text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qlorakit.data.schema import Example, Turn
from qlorakit.errors import DataError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)
GUANACO_HUMAN = "### Human: "
GUANACO_ASSISTANT = " ### Assistant: "


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text; ``is_target`` pieces are answers (loss), ``add_eos`` appends EOS."""

    text: str
    is_target: bool
    add_eos: bool = False


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(example: Example, tokenizer: Any, chat_template: bool) -> bool:
    """Whether ``example`` is rendered with the tokenizer's chat template."""
    return chat_template and not example.is_instruction and not example.is_text and has_chat_template(tokenizer)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The paper's Alpaca prompt; the ``### Input:`` section only when ``input`` is non-empty."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def render(example: Example, tokenizer: Any, chat_template: bool = True) -> list[Segment]:
    """Prompt/answer segments of a conversation example (see the module docstring)."""
    if example.is_text:
        raise DataError(f"{example.origin}: a text document is packed, not rendered as a conversation")
    if example.is_instruction:
        user, answer = example.turns
        return [Segment(alpaca_prompt(user.content, example.context), False), Segment(answer.content, True, True)]
    if uses_chat_template(example, tokenizer, chat_template):
        return chat_segments(example.turns, tokenizer, example.origin)
    return guanaco_segments(example.turns)


def guanaco_segments(turns: Sequence[Turn]) -> list[Segment]:
    segments, pending = [], ""
    for turn in turns:
        if turn.role == "system":
            pending += turn.content + " "
        elif turn.role == "user":
            pending += GUANACO_HUMAN + turn.content + GUANACO_ASSISTANT
        else:
            segments += [Segment(pending, False), Segment(turn.content, True, True)]
            pending = " "
    return segments


def generation_prompt(turns: Sequence[Turn], tokenizer: Any = None, chat_template: bool = True) -> str:
    """The text a model continues to answer the last (user) turn, rendered as in training."""
    messages = [{"role": t.role, "content": t.content} for t in turns]
    if chat_template and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(s.text for s in guanaco_segments([*turns, Turn("assistant", "")]))


def chat_segments(turns: Sequence[Turn], tokenizer: Any, origin: str) -> list[Segment]:
    """Split a chat-template rendering at the answers by rendering growing prefixes."""
    messages = [{"role": t.role, "content": t.content} for t in turns]
    eos = getattr(tokenizer, "eos_token", None)
    segments: list[Segment] = []
    done, consumed = "", 0  # ``done``: rendering of the turns so far; ``consumed``: its chars in segments
    for k, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        prompt = _render(tokenizer, messages[:k], True, origin)
        full = _render(tokenizer, messages[: k + 1], False, origin)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(f"{origin}: the tokenizer's chat template is not prefix-stable (rendering more turns "
                            "changes the text of earlier ones), so answer tokens cannot be located; "
                            "set chat_template=False to use the Guanaco format")
        answer = full[len(prompt):]
        start, content_end = _find_content(answer, turn.content, origin)
        end = answer.find(eos, content_end) if eos else -1
        stop = end + len(eos) if end >= 0 else content_end
        segments.append(Segment(prompt[consumed:] + answer[:start], False))
        segments.append(Segment(answer[start:stop], True, add_eos=end < 0))
        done, consumed = full, len(prompt) + stop
    return segments


def _render(tokenizer: Any, messages: list[dict[str, str]], generation: bool, origin: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as exc:  # jinja raises its own errors (e.g. a template's raise_exception)
        raise DataError(f"{origin}: the tokenizer's chat template failed on this conversation ({exc}); "
                        "fix the conversation or set chat_template=False to use the Guanaco format") from exc


def _find_content(answer: str, content: str, origin: str) -> tuple[int, int]:
    """Where the assistant's content starts and ends inside its rendered turn (templates may trim it)."""
    for probe in (content, content.strip()):
        start = answer.find(probe)
        if start >= 0:
            return start, start + len(probe)
    raise DataError(f"{origin}: the chat template does not reproduce the assistant's answer verbatim, so its "
                    "tokens cannot be located; set chat_template=False to use the Guanaco format")
