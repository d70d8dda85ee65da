"""GGUF metadata of an export: copied from a GGUF source, or built from a Hugging Face tokenizer.

A GGUF source keeps every key it has (hyper-parameters, rope settings, ``tokenizer.ggml.*``: tokens, merges,
scores, token types, special ids, ``add_bos_token``; ``tokenizer.chat_template``; ``general.*``) except those
that describe the stored tensors (``general.file_type``, ``general.quantization_version``,
``general.alignment``, split keys), which the writer sets anew.

A Hugging Face source needs a byte-level BPE ``tokenizer.json`` (GPT-2 style: SmolLM, Llama 3, Qwen2,
Mistral Nemo), written as llama.cpp's ``convert_hf_to_gguf.py`` does: tokens by id (added special tokens
``CONTROL``, other added ``USER_DEFINED``), merges, special ids and chat template via ``gguf.SpecialVocab``,
and ``tokenizer.ggml.pre`` found by hashing the tokenization of llama.cpp's probe text (``PRE_TOKENIZERS``).
SentencePiece tokenizers (Llama 2, Mistral 7B v0.1, ``tokenizer.model``) and unknown pre-tokenizers are
refused: llama.cpp would tokenize them differently without a word of warning.
"""

from __future__ import annotations

from hashlib import sha256
from pathlib import Path
from typing import Any

from qlorakit.errors import ConfigError

#: Keys of a source GGUF that describe its tensors, not the model; the export writes its own.
_TENSOR_KEYS = ("general.file_type", "general.quantization_version", "general.alignment", "split.")

#: The probe text of llama.cpp's ``convert_hf_to_gguf.py`` (``get_vocab_base_pre``, MIT licence): its token
#: ids identify a BPE pre-tokenizer.
CHKTXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated)'
    ' ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～'
    ' ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s'
    " there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

#: sha256 of ``str(tokenizer.encode(CHKTXT))`` -> ``tokenizer.ggml.pre``, from the same function of llama.cpp.
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def read_source_metadata(path: Path) -> dict[str, tuple[Any, Any, Any]]:
    """``{key: (value, value type, array element type)}`` of a GGUF file, string arrays in full.

    ``gguf.GGUFReader`` parses every vocabulary entry (seconds for 49k tokens); the project's own header
    reader skips them, so this is only called by an export.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith(_TENSOR_KEYS):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        out[key] = (field.contents(), field.types[0], sub)
    return out


def copy_metadata(writer: Any, metadata: dict[str, tuple[Any, Any, Any]]) -> None:
    """Write ``read_source_metadata``'s keys, except ``general.architecture`` (the writer's own)."""
    for key, (value, vtype, sub) in metadata.items():
        if key != "general.architecture":
            writer.add_key_value(key, value, vtype, sub_type=sub)


def pre_tokenizer(tokenizer: Any) -> str:
    """``tokenizer.ggml.pre`` for a transformers tokenizer; ``ConfigError`` when llama.cpp's hash is unknown."""
    digest = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise ConfigError(
            f"the tokenizer's pre-tokenizer (hash {digest[:16]}...) is not one qlorakit knows "
            f"({', '.join(sorted(set(PRE_TOKENIZERS.values())))}); convert this model with llama.cpp's "
            f"convert_hf_to_gguf.py, which has the full table"
        )
    return PRE_TOKENIZERS[digest]


def _check_bpe(directory: Path) -> None:
    import json

    path = directory / "tokenizer.json"
    if not path.is_file():
        has_spm = (directory / "tokenizer.model").is_file()
        what = "only a SentencePiece tokenizer.model" if has_spm else "no tokenizer.json"
        raise ConfigError(
            f"{directory} has {what}; qlorakit's GGUF export writes byte-level BPE tokenizers (tokenizer.json) "
            f"only. Export from the model's GGUF instead, or use llama.cpp's convert_hf_to_gguf.py"
        )
    model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConfigError(
            f"{path}: tokenizer model {model.get('type')!r} (byte_fallback={model.get('byte_fallback')}) is a "
            f"SentencePiece-style tokenizer; qlorakit's GGUF export writes byte-level BPE only"
        )


def write_hf_tokenizer(writer: Any, directory: Path, vocab_size: int) -> None:
    """Tokenizer keys for a Hugging Face directory (module docstring); ``ConfigError`` if it cannot."""
    import gguf
    from transformers import AutoTokenizer

    _check_bpe(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(str(directory), load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
