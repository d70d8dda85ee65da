"""An Ollama ``Modelfile`` for an exported GGUF: ``FROM``, ``TEMPLATE``, ``SYSTEM`` and ``PARAMETER stop``.

Ollama renders prompts with Go's ``text/template``, not Jinja, so the model's chat template is recognised by
its markers and written as the equivalent Go template of its family:

| family | recognised by | turns |
|---|---|---|
| ChatML (SmolLM2, Qwen2) | ``<|im_start|>`` | ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` |
| Llama 3 | ``<|start_header_id|>`` | ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`` |
| Llama 2 / Mistral | ``[INST]`` | ``[INST] {user} [/INST] {assistant}</s>`` (system folded into the first user turn) |

A default system prompt that the Jinja template inserts when the conversation has none (SmolLM2: "You are
a helpful AI assistant named SmolLM...") is found by rendering the template for a one-message conversation
and becomes ``SYSTEM``. Another template family gets no ``TEMPLATE`` (Ollama then uses its own detection
from the GGUF's ``tokenizer.chat_template``), with a comment saying so.
"""

from __future__ import annotations

import re
from pathlib import Path

_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
_LLAMA3 = """<|begin_of_text|>{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

"""
_INST = (
    '{{- range $i, $m := .Messages }}{{- if eq $m.Role "user" }}[INST] {{ if and (eq $i 0) $.System }}{{ $.System }}'
    "\n\n"
    '{{ end }}{{ $m.Content }} [/INST]{{- else if eq $m.Role "assistant" }} {{ $m.Content }}</s>{{- end }}{{- end }}'
)

#: family -> (marker in the Jinja template, Go template, stop strings, regex of the default system prompt).
FAMILIES: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "chatml": ("<|im_start|>", _CHATML, ("<|im_start|>", "<|im_end|>"), r"<\|im_start\|>system\n(.*?)<\|im_end\|>"),
    "llama3": ("<|start_header_id|>", _LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
               r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>"),
    "inst": ("[INST]", _INST, ("[INST]", "[/INST]", "</s>"), r"\[INST\] (.*?)\n\nQ"),
}


def template_family(chat_template: str | None) -> str | None:
    """``chatml``, ``llama3``, ``inst`` or ``None`` for a Jinja chat template (table in the module docstring)."""
    if not chat_template:
        return None
    return next((name for name, (marker, *_rest) in FAMILIES.items() if marker in chat_template), None)


def default_system_prompt(chat_template: str, family: str) -> str | None:
    """The system prompt the Jinja template adds to a conversation without one (``None`` if it adds none)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        text = env.from_string(chat_template).render(
            messages=[{"role": "user", "content": "Q"}], add_generation_prompt=True, bos_token="", eos_token="")
    except Exception:  # a template that needs functions only transformers defines: no default to report
        return None
    match = re.search(FAMILIES[family][3], text, flags=re.S)
    return match.group(1) if match else None


def _quote(text: str) -> str:
    return '"""' + text + '"""'


def modelfile_text(
    model: str, chat_template: str | None, eos_token: str | None = None, adapter: str | None = None
) -> str:
    """The Modelfile text: ``FROM model``, ``ADAPTER adapter`` if given, template, system prompt, stops."""
    lines = ["# Ollama recipe written by qlorakit: ollama create NAME -f THIS_FILE", f"FROM {model}"]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    family = template_family(chat_template)
    if family is None:
        lines.append(
            "# no TEMPLATE: the chat template is not ChatML, Llama 3 or [INST]; Ollama detects it from the GGUF"
        )
        stops: tuple[str, ...] = ()
    else:
        _marker, go_template, stops, _system = FAMILIES[family]
        lines.append(f"TEMPLATE {_quote(go_template)}")
        system = default_system_prompt(chat_template, family)
        if system:
            lines.append(f"SYSTEM {_quote(system)}")
    for stop in dict.fromkeys(stops + ((eos_token,) if eos_token else ())):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | Path, chat_template: str | None, eos_token: str | None = None,
                    base_gguf: str | Path | None = None) -> Path:
    """Write ``<gguf_path>.Modelfile`` beside the export; for an adapter, ``base_gguf`` is the ``FROM`` model.

    The file goes through ``<name>.tmp`` and a rename, like every result file.
    """
    from qlorakit.fileio import write_text_atomic

    path = Path(gguf_path)
    if base_gguf is None:
        text = modelfile_text(f"./{path.name}", chat_template, eos_token)
    else:
        text = modelfile_text(str(Path(base_gguf).resolve()), chat_template, eos_token, adapter=f"./{path.name}")
    return write_text_atomic(path.with_name(path.name + ".Modelfile"), text)
