"""The readers under fuzzing: for each, a generator of hostile files and the call that reads them.

A ``Target`` turns a ``random.Random`` into ``{relative path: bytes}`` (the files of one input, written
into an empty directory) and reads them with the public qlorakit call a user's file goes through. The
oracle ``check_error`` is what every target must satisfy: reading either succeeds or raises a
``QlorakitError`` whose message names a file of the input (or its directory) and a position in it.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import seed_files as seeds
from hostile_inputs import (
    WRONG_VALUES,
    mutate_bytes,
    mutate_json,
    mutate_json_lines,
    mutate_rows,
    random_bytes,
    random_text,
)

from qlorakit.errors import QlorakitError

Files = dict[str, bytes]

#: A position in a message: ``file:line``, a row, line, record, byte offset, row group, a field, key or
#: tensor by name (``field 'x'``, ``key 'x'``, or ``key "x'y"`` when repr() picks double quotes; ``x = value``
#: for a JSON config key), or the header/footer.
POSITION = re.compile(r":\d+\b|\b(?:row|line|record|byte|bytes|offset|row group|rows|element|entry) \d+|"
                      r"\b(?:field|key|tensor|column|value of) ['\"\w]|\b[a-z_]+ = |\b(?:header|footer)\b")
#: Conditions of a whole file (or of all the files of an input), where no position applies.
WHOLE_FILE = re.compile(r"the file is empty|has no rows|no rows \(|no questions in the file|no countable matches|"
                        r"holds no LoRA weights|no parsed judgements|no answer ids|sum to 0|cannot tell the data "
                        r"format|cannot tell the reference's answer|expected a JSON object|must hold an array")

_HUGE_HEADERS = (2**60, 2**40, 2**64 - 1)
JSON_ALPHABET = '[]{}",:0123456789.eE+- \n\\tuflsanr'
CSV_ALPHABET = 'ab,"\n\r\x00 \\;'


@dataclass(frozen=True)
class Target:
    """One reader: ``generate(rng) -> files``, ``read(directory)``, ``seed() -> files`` (valid, read without
    error); ``name`` labels the benchmark's rows."""

    name: str
    generate: Callable[[random.Random], Files]
    read: Callable[[Path], Any]
    seed: Callable[[], Files]
    warm: Callable[[], None] = lambda: None  # imports that only some inputs reach


def check_error(exc: BaseException, directory: Path) -> str | None:
    """None when ``exc`` is an acceptable refusal of a hostile file, else what is wrong with it."""
    if not isinstance(exc, QlorakitError):
        return f"{type(exc).__name__} is not a QlorakitError: {exc}"
    message = str(exc)
    if str(directory) not in message:
        return f"the message does not name the file: {message}"
    if not (POSITION.search(message.replace(str(directory), "")) or WHOLE_FILE.search(message)):
        return f"the message names no position: {message}"
    return None


def _pick(rng: random.Random, *choices: tuple[float, Callable[[], bytes]]) -> bytes:
    """Call one of ``choices`` (weight, thunk) at random."""
    roll, total = rng.random() * sum(w for w, _ in choices), 0.0
    for weight, make in choices:
        total += weight
        if roll < total:
            return make()
    return choices[-1][1]()


# --- data files ------------------------------------------------------------------------------------


def _data_read(name: str) -> Callable[[Path], Any]:
    def read(directory: Path) -> Any:
        from qlorakit.data import load_examples

        return load_examples([directory / name])

    return read


def _json_file(rng: random.Random) -> Files:
    rows = rng.choice(seeds.DATA_ROWS)
    text = json.dumps(rows, indent=rng.choice((None, 1))).encode()
    data = _pick(rng, (0.1, lambda: random_bytes(rng)), (0.1, lambda: random_text(rng, JSON_ALPHABET)),
                 (0.5, lambda: mutate_json(rows, rng).encode("utf-8", "surrogatepass")),
                 (0.3, lambda: mutate_bytes(text, rng)))
    return {"data.json": data}


def _jsonl_file(rng: random.Random) -> Files:
    rows = rng.choice(seeds.DATA_ROWS)
    data = _pick(rng, (0.1, lambda: random_bytes(rng)), (0.1, lambda: random_text(rng, JSON_ALPHABET)),
                 (0.5, lambda: mutate_json_lines(rows, rng).encode("utf-8", "surrogatepass")),
                 (0.3, lambda: mutate_bytes(seeds.jsonl(rows).encode(), rng)))
    return {"data.jsonl": data}


def _csv_text(rows: list[list[str]]) -> bytes:
    import csv
    import io

    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue().encode()


def _csv_file(rng: random.Random) -> Files:
    rows = rng.choice(seeds.CSV_ROWS)
    data = _pick(rng, (0.1, lambda: random_bytes(rng)), (0.15, lambda: random_text(rng, CSV_ALPHABET)),
                 (0.45, lambda: mutate_rows(rows, rng).encode("utf-8", "surrogatepass")),
                 (0.3, lambda: mutate_bytes(_csv_text(rows), rng)))
    return {"data.csv": data}


def _parquet_rows(rng: random.Random) -> bytes:
    """A valid Parquet file whose rows hold values of the wrong type (pyarrow picks the column types)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(row) for row in rng.choice(seeds.DATA_ROWS)]
    for row in rng.sample(rows, k=len(rows)):
        key = rng.choice(list(row))
        row[key] = rng.choice(WRONG_VALUES)
        buffer = io.BytesIO()
        try:
            pq.write_table(pa.Table.from_pylist(rows), buffer)
        except (pa.ArrowException, OverflowError):
            row[key] = str(row[key])
            continue
        return buffer.getvalue()
    return seeds.parquet_seed(0)


def _parquet_file(rng: random.Random) -> Files:
    seed = seeds.parquet_seed(rng.randrange(len(seeds.DATA_ROWS)))
    data = _pick(rng, (0.1, lambda: random_bytes(rng)), (0.3, lambda: _parquet_rows(rng)),
                 (0.3, lambda: mutate_bytes(seed, rng)),
                 (0.3, lambda: mutate_bytes(seed, rng, fields=(len(seed) - 8,))))  # the footer length
    return {"data.parquet": data}


def _text_file(rng: random.Random) -> Files:
    seed = seeds.TEXT.encode()
    data = _pick(rng, (0.3, lambda: random_bytes(rng)), (0.1, lambda: random_text(rng, " \n\t\r\x0b\x0c")),
                 (0.6, lambda: mutate_bytes(seed, rng)))
    return {"data.txt": data}


# --- models ----------------------------------------------------------------------------------------


def _gguf_read(directory: Path) -> Any:
    from qlorakit.models.gguf import check_tensor_types, gguf_config
    from qlorakit.models.gguf_reader import read_gguf_header, read_tensor_bytes

    header = read_gguf_header(directory / "model.gguf")
    check_tensor_types(header)
    gguf_config(header)
    with open(header.path, "rb") as f:
        for info in header.tensors:
            read_tensor_bytes(f, header, info)
    return header


def _gguf_file(rng: random.Random) -> Files:
    seed, fields, header_end = seeds.gguf_seed()
    data = _pick(rng, (0.05, lambda: random_bytes(rng)), (0.05, lambda: b"GGUF\x03\0\0\0" + random_bytes(rng)),
                 (0.7, lambda: mutate_bytes(seed, rng, fields, region=header_end)),
                 (0.2, lambda: mutate_bytes(seed, rng, fields)))
    return {"model.gguf": data}


def _gguf_warm() -> None:
    """Import the config class of every architecture a mutated GGUF may name (seconds each, lazily)."""
    from transformers import CONFIG_MAPPING

    from qlorakit.models.gguf import RENAME_ONLY_ARCHS

    for arch in RENAME_ONLY_ARCHS:
        CONFIG_MAPPING[arch]


def _checkpoint_read(directory: Path) -> Any:
    from qlorakit.models.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(directory)
    return [name for name, _ in checkpoint.tensors()]


def _hostile_safetensors(seed: bytes, rng: random.Random) -> bytes:
    header, body = seeds.split_safetensors(seed)
    length = 8 + len(json.dumps(header).encode())
    return _pick(rng, (0.05, lambda: random_bytes(rng)),
                 (0.45, lambda: seeds.join_safetensors(mutate_json(header, rng), body)),
                 (0.05, lambda: seeds.join_safetensors(json.dumps(header), body, rng.choice(_HUGE_HEADERS))),
                 (0.3, lambda: mutate_bytes(seed, rng, fields=(0,), region=length)),
                 (0.15, lambda: mutate_bytes(seed, rng, fields=(0,))))


def _safetensors_file(rng: random.Random) -> Files:
    return {"model.safetensors": _hostile_safetensors(seeds.safetensors_seed(0), rng)}


def _safetensors_index(rng: random.Random) -> Files:
    index = seeds.safetensors_index()
    files = {"model-00001-of-00002.safetensors": seeds.safetensors_seed(0),
             "model-00002-of-00002.safetensors": seeds.safetensors_seed(1)}
    text = _pick(rng, (0.8, lambda: mutate_json(index, rng).encode("utf-8", "surrogatepass")),
                 (0.2, lambda: mutate_bytes(json.dumps(index).encode(), rng)))
    return {"model.safetensors.index.json": text, **files}


def _adapter_read(directory: Path) -> Any:
    from qlorakit.lora import check_adapter_dir, load_adapter

    return load_adapter(seeds.tiny_model(), check_adapter_dir(directory / "adapter"), replace=True)


def _adapter_files(rng: random.Random) -> Files:
    config, weights = seeds.adapter_seed()
    values = json.loads(config)
    config = _pick(rng, (0.1, lambda: config), (0.2, lambda: mutate_bytes(config, rng)),
                   (0.7, lambda: mutate_json(values, rng).encode("utf-8", "surrogatepass")))
    weights = _pick(rng, (0.5, lambda: weights), (0.5, lambda: _hostile_safetensors(weights, rng)))
    return {"adapter/adapter_config.json": config, "adapter/adapter_model.safetensors": weights}


# --- evaluation files ------------------------------------------------------------------------------


def _mmlu_read(directory: Path) -> Any:
    from qlorakit.eval.mmlu_data import few_shot_prefix, format_question, read_questions

    questions = read_questions(directory / "x_test.csv")
    return few_shot_prefix("x", questions) + format_question(questions[0], with_answer=False)


def _mmlu_file(rng: random.Random) -> Files:
    rows = rng.choice(seeds.MMLU_ROWS)
    data = _pick(rng, (0.1, lambda: random_bytes(rng)), (0.1, lambda: random_text(rng, CSV_ALPHABET + "ABCD0123")),
                 (0.5, lambda: mutate_rows(rows, rng).encode("utf-8", "surrogatepass")),
                 (0.3, lambda: mutate_bytes(_csv_text(rows), rng)))
    return {"x_test.csv": data}


def _hostile_jsonl(rows: list[dict[str, Any]], rng: random.Random) -> bytes:
    return _pick(rng, (0.1, lambda: random_bytes(rng)), (0.1, lambda: random_text(rng, JSON_ALPHABET)),
                 (0.6, lambda: mutate_json_lines(rows, rng).encode("utf-8", "surrogatepass")),
                 (0.2, lambda: mutate_bytes(seeds.jsonl(rows).encode(), rng)))


def _elo_read(directory: Path) -> Any:
    from qlorakit.eval.elo import elo_tournament, read_pairwise

    return elo_tournament(read_pairwise([directory / seeds.PAIRWISE_NAME]), orderings=2)


def _elo_file(rng: random.Random) -> Files:
    return {seeds.PAIRWISE_NAME: _hostile_jsonl(seeds.PAIRWISE_ROWS, rng)}


def _relative_read(directory: Path) -> Any:
    from qlorakit.eval.relative import relative_scores

    answers = directory / seeds.ANSWERS_NAME
    return relative_scores([directory / "judgements"], reference_answers=[answers] if answers.exists() else None)


def _relative_files(rng: random.Random) -> Files:
    hostile, plain = seeds.RELATIVE_NAMES
    files = {f"judgements/{hostile}": _hostile_jsonl(seeds.relative_rows("s"), rng),
             f"judgements/{plain}": seeds.jsonl(seeds.relative_rows("o")).encode()}
    if rng.random() < 0.3:
        files[f"judgements/{hostile}"] = seeds.jsonl(seeds.relative_rows("s")).encode()
        files[seeds.ANSWERS_NAME] = _hostile_jsonl(seeds.REFERENCE_ANSWERS, rng)
    return files


def _seeds() -> dict[str, Callable[[], Files]]:
    """The unmutated files of each target (what the mutations start from)."""
    relative = {f"judgements/{name}": seeds.jsonl(seeds.relative_rows(system)).encode()
                for name, system in zip(seeds.RELATIVE_NAMES, ("s", "o"), strict=True)}
    return {
        "data.json": lambda: {"data.json": json.dumps(seeds.ALPACA).encode()},
        "data.jsonl": lambda: {"data.jsonl": seeds.jsonl(seeds.MESSAGES).encode()},
        "data.csv": lambda: {"data.csv": _csv_text(seeds.CSV_ROWS[0])},
        "data.parquet": lambda: {"data.parquet": seeds.parquet_seed(0)},
        "data.txt": lambda: {"data.txt": seeds.TEXT.encode()},
        "gguf": lambda: {"model.gguf": seeds.gguf_seed()[0]},
        "safetensors": lambda: {"model.safetensors": seeds.safetensors_seed(0)},
        "safetensors.index": lambda: {"model.safetensors.index.json": json.dumps(seeds.safetensors_index()).encode(),
                                      "model-00001-of-00002.safetensors": seeds.safetensors_seed(0),
                                      "model-00002-of-00002.safetensors": seeds.safetensors_seed(1)},
        "adapter": lambda: dict(zip(("adapter/adapter_config.json", "adapter/adapter_model.safetensors"),
                                    seeds.adapter_seed(), strict=True)),
        "mmlu": lambda: {"x_test.csv": _csv_text(seeds.MMLU_ROWS[0])},
        "judgements.pairwise": lambda: {seeds.PAIRWISE_NAME: seeds.jsonl(seeds.PAIRWISE_ROWS).encode()},
        "judgements.relative": lambda: relative,
    }


_READERS = (
    ("data.json", _json_file, _data_read("data.json")),
    ("data.jsonl", _jsonl_file, _data_read("data.jsonl")),
    ("data.csv", _csv_file, _data_read("data.csv")),
    ("data.parquet", _parquet_file, _data_read("data.parquet")),
    ("data.txt", _text_file, _data_read("data.txt")),
    ("gguf", _gguf_file, _gguf_read),
    ("safetensors", _safetensors_file, _checkpoint_read),
    ("safetensors.index", _safetensors_index, _checkpoint_read),
    ("adapter", _adapter_files, _adapter_read),
    ("mmlu", _mmlu_file, _mmlu_read),
    ("judgements.pairwise", _elo_file, _elo_read),
    ("judgements.relative", _relative_files, _relative_read),
)
TARGETS = {name: Target(name, generate, read, _seeds()[name], _gguf_warm if name == "gguf" else lambda: None)
           for name, generate, read in _READERS}


def write_files(directory: Path, files: Files) -> None:
    """Write one input's files under ``directory`` (which must be empty or hold the previous input only)."""
    for relative, data in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
