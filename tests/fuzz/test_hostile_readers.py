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
