"""Sizes a file claims are checked against the file before anything is allocated for them.

Each case is a few bytes that claim terabytes (a GGUF with 2^40 tensors, a 2^60-byte string, a
safetensors header of 2^60 bytes); it must be refused with the field's byte offset while tracemalloc
sees less than ``SMALL`` bytes allocated.
"""

from __future__ import annotations

import struct
import tracemalloc

import gguf  # noqa: F401  (imported before tracemalloc starts: its import is not what a file claims)
import pytest
import seed_files as seeds

from qlorakit.errors import ModelLoadError, StateDictError
from qlorakit.models import gguf_reader
from qlorakit.models.checkpoint import read_header
from qlorakit.models.gguf_reader import read_gguf_header
from qlorakit.untrusted import MAX_HEADER_BYTES

SMALL = 2**20
U8, STRING, ARRAY = 0, 8, 9


def _string(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def _gguf(tensors: int, kvs: int, body: bytes) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, kvs) + body


ARCH = _string("general.architecture") + struct.pack("<I", STRING) + _string("llama")

HOSTILE_GGUF = {
    "2^40 tensors": (_gguf(2**40, 1, ARCH), r"the tensor count claims 1099511627776, .* \(at byte 8\)"),
    "2^60 metadata entries": (_gguf(0, 2**60, ARCH),
                              r"the metadata count claims 1152921504606846976, .* \(at byte 16\)"),
    "2^60-byte key": (_gguf(0, 1, _string("k", 2**60) + bytes(16)),
                      r"a metadata key claims 1152921504606846976 bytes.*at byte 24"),
    "2^60-byte value": (_gguf(0, 1, _string("general.architecture") + struct.pack("<I", STRING) + _string("x", 2**60)),
                        r"value of key 'general.architecture' claims 1152921504606846976 bytes.*at byte 56"),
    "2^40-element number array": (_gguf(0, 2, ARCH + _string("a") + struct.pack("<IIQ", ARRAY, U8, 2**40)),
                                  r"array length of key 'a' claims 1099511627776 bytes"),
    "2^40-element string array": (_gguf(0, 2, ARCH + _string("a") + struct.pack("<IIQ", ARRAY, STRING, 2**40)),
                                  r"array length of key 'a' claims 1099511627776, at least 8796093022208 bytes"),
    "2^31 dimensions": (_gguf(1, 1, ARCH + _string("t") + struct.pack("<I", 2**31) + bytes(24)),
                        r"tensor 't' claims 2147483648 dimensions; GGUF allows at most 4"),
    "tensor at offset 2^63": (_gguf(1, 1, ARCH + _string("t") + struct.pack("<IQIQ", 1, 32, 0, 2**63)),
                              r"truncated GGUF file .*its tensors need 92233720368547\d+ bytes"),
}


def _peak_while(call) -> int:
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("case", sorted(HOSTILE_GGUF))
def test_gguf_claims_are_refused_before_allocating(tmp_path, case):
    data, message = HOSTILE_GGUF[case]
    path = tmp_path / "claims.gguf"
    path.write_bytes(data)

    def read():
        with pytest.raises(ModelLoadError, match=message):
            read_gguf_header(path)

    assert _peak_while(read) < SMALL


def test_a_number_array_longer_than_the_bound_is_kept_as_its_length(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_reader, "MAX_ARRAY_ITEMS", 4)
    path = tmp_path / "long.gguf"
    data = _gguf(0, 3, ARCH + _string("short") + struct.pack("<IIQ", ARRAY, U8, 4) + bytes(4)
                 + _string("long") + struct.pack("<IIQ", ARRAY, U8, 5) + bytes(5))
    path.write_bytes(data + bytes(-len(data) % 32))  # the (empty) data section starts at the alignment
    metadata = read_gguf_header(path).metadata
    assert metadata["short"] == [0, 0, 0, 0] and metadata["long"] == 5


def _safetensors(path, header_length: int, file_size: int) -> None:
    """``header_length`` claimed, the file made ``file_size`` bytes long (sparse: nothing is written)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", header_length) + b"{")
        f.truncate(file_size)


@pytest.mark.parametrize(("claimed", "size", "message"), [
    (2**60, 64, r"the header length at byte 0 claims 1152921504606846976 bytes, above the limit"),
    (MAX_HEADER_BYTES + 1, 2 * MAX_HEADER_BYTES, r"above the limit of 100000000"),
    (MAX_HEADER_BYTES // 2, 1000, r"truncated safetensors file .*the header alone needs 50000008 bytes"),
])
def test_safetensors_header_length_is_checked_before_reading(tmp_path, claimed, size, message):
    path = tmp_path / "model.safetensors"
    _safetensors(path, claimed, size)

    def read():
        with pytest.raises(ModelLoadError, match=message):
            read_header(path)

    assert _peak_while(read) < SMALL


def test_a_tensor_claiming_a_terabyte_is_refused_from_the_header(tmp_path):
    header = b'{"w": {"dtype": "F32", "shape": [1099511627776], "data_offsets": [0, 4398046511104]}}'
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))

    def read():
        with pytest.raises(ModelLoadError, match=r"header describes 4398046511104 data bytes, the file has 16"):
            read_header(path)

    assert _peak_while(read) < SMALL


def test_adapter_weights_claiming_a_huge_header_fail_before_loading(tmp_path):
    from qlorakit.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter

    config, _ = seeds.adapter_seed()
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / ADAPTER_CONFIG).write_bytes(config)
    _safetensors(directory / ADAPTER_WEIGHTS, 2**60, 64)
    with pytest.raises(StateDictError, match=r"adapter_model\.safetensors: the header length at byte 0 claims"):
        load_adapter(seeds.tiny_model(), directory, replace=True)
