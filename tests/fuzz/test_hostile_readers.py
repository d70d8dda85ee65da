"""Every reader, fed random bytes and mutated valid files, only succeeds or refuses with a qlorakit error.

A refusal must be a ``QlorakitError`` naming the file and a position in it (``fuzz_targets.check_error``);
no input may take more than ``LIMIT_S`` seconds, nor allocate more than ``PEAK_BYTES`` (tracemalloc,
checked on the readers that do not go through ``datasets``: there it doubles the time and misses
pyarrow's own allocations; the benchmark measures every reader). The counts keep the whole directory
near a minute on one core; ``benchmarks/fuzz_readers.py`` runs the same generators at scale.
Hypothesis is derandomized (the same inputs on every run) and keeps no database, so the suite is
reproducible and writes nothing into the checkout.
"""

from __future__ import annotations

import pytest
from fuzz_runner import read_one, warm_up
from fuzz_targets import TARGETS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from seed_files import join_safetensors

LIMIT_S = 10.0
#: The seeds are a few KiB; a 200,000-character CSV cell is the largest input. Reading any input
#: allocates far less than this (the benchmark reports the peaks).
PEAK_BYTES = 64 * 2**20

#: Inputs per reader: fewer for the readers that go through ``datasets`` (~40 ms per file).
EXAMPLES = {"data.json": 100, "data.jsonl": 100, "data.csv": 100, "data.parquet": 80, "data.txt": 200,
            "gguf": 300, "safetensors": 300, "safetensors.index": 200, "adapter": 200, "mmlu": 300,
            "judgements.pairwise": 300, "judgements.relative": 200}
VIA_DATASETS = ("data.json", "data.jsonl", "data.csv", "data.parquet")


def _settings(name: str):
    return settings(max_examples=EXAMPLES[name], deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seed_files_read_without_error(name):
    outcome = read_one(TARGETS[name], TARGETS[name].seed(), LIMIT_S)
    assert outcome.kind == "ok", outcome.message


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_hostile_inputs_are_refused_with_file_and_position(name):
    target = TARGETS[name]
    warm_up(target)  # imports and caches outside the measured inputs

    @_settings(name)
    @given(st.randoms(use_true_random=False))
    def check(rng):
        outcome = read_one(target, target.generate(rng), LIMIT_S, trace_memory=name not in VIA_DATASETS)
        assert outcome.kind in ("ok", "refused"), outcome.message
        assert outcome.peak_bytes < PEAK_BYTES, f"{outcome.peak_bytes} bytes allocated"

    check()


_DEEP = b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n"


def _parquet_with_bad_utf8() -> bytes:
    """A Parquet ``string`` column whose second value is not UTF-8 (pyarrow does not check on write or read)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    data = b"fine" + b"\xe6bad"
    offsets = pa.py_buffer(pa.array([0, 4, 8], type=pa.int32()).buffers()[1])
    text = pa.StringArray.from_buffers(2, offsets, pa.py_buffer(data))
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": text}), sink)
    return sink.getvalue()


#: Inputs the fuzzing found that once crashed the process (pyarrow segfaults) or escaped as a bare error.
FOUND = {
    "first row null (pyarrow segfault)": ("data.jsonl", {"data.jsonl": b"null\n"}),
    "array holding null (pyarrow segfault)": ("data.json", {"data.json": b'[null, {"text": "a"}]'}),
    "50,000 nested brackets (pyarrow segfault)": ("data.jsonl", {"data.jsonl": _DEEP}),
    "an empty object (IndexError)": ("data.json", {"data.json": b"{}"}),
    "a 5,000-digit integer (ValueError)": ("judgements.pairwise", {"a-vs-b-gpt-4-reviewer.jsonl": b'{"score": '
                                                                   + b"1" * 5000 + b"}\n"}),
    "not UTF-8 (UnicodeDecodeError)": ("mmlu", {"x_test.csv": b"Q,a,b,c,d,A\n\xff,a,b,c,d,B\n"}),
    "a 200,000-byte field (csv.Error)": ("mmlu", {"x_test.csv": b"Q," + b"x" * 200_000 + b",b,c,d,A\n"}),
    "a header that is a list (AttributeError)": ("safetensors", {"model.safetensors": join_safetensors("[1]", b"")}),
    "a lone surrogate in a header (SafetensorError)": ("safetensors", {
        "model.safetensors": join_safetensors('{"__metadata__": {"\\ud800": "x"}}', b"")}),
    "a Parquet string that is not UTF-8 (UnicodeDecodeError)": ("data.parquet", {
        "data.parquet": _parquet_with_bad_utf8()}),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_inputs_found_by_fuzzing_are_refused(case):
    name, files = FOUND[case]
    outcome = read_one(TARGETS[name], files, LIMIT_S)
    assert outcome.kind == "refused", outcome.message


def test_check_error_takes_a_key_quoted_either_way_and_refuses_a_message_without_a_position(tmp_path):
    from fuzz_targets import check_error

    from qlorakit.errors import StateDictError

    shown = tmp_path / "adapter_model.safetensors"
    # repr() quotes a key that holds a single quote with double quotes (fuzz input 9031 of the adapter reader).
    assert check_error(StateDictError(f"{shown}: key \"a.lora_A.wei'ht\" is not a LoRA A/B weight"), tmp_path) is None
    assert check_error(StateDictError(f"{shown}: key 'a.lora_A.weiht' is not a LoRA A/B weight"), tmp_path) is None
    assert "no position" in check_error(StateDictError(f"{shown}: something is wrong"), tmp_path)
    assert "not a QlorakitError" in check_error(ValueError(f"{shown}: key 'x'"), tmp_path)
