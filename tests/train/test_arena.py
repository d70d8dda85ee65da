"""The caching arena (``train.arena``): best fit, split and merge, trim, contents never overlap, training
values unchanged, and ``qlorakit train`` choosing it. The arena replaces torch's CPU allocator for a whole
process, so everything that installs it runs in a child process (tests/conftest.py keeps it off here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import yaml

from qlorakit.train import arena

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or arena.compiler() is None,
                                reason="the arena needs Linux and a C++ compiler")  # fmt: skip


def _child(code: str, *args: str) -> dict:
    env = {**os.environ, "QLORAKIT_ARENA": "1"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                         text=True, timeout=600, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


ALLOCATION = """
import json, random, torch
from qlorakit.train import arena
assert arena.install() and arena.install()  # a repeat changes nothing
MiB = 2**20
def mib(n):
    return torch.empty(int(n * MiB), dtype=torch.uint8)
out = {}
a = mib(1); base = a.data_ptr(); del a
b, c = mib(0.5), mib(0.5)  # the freed MiB is split best fit: both halves of it
out["split"] = [b.data_ptr() - base, c.data_ptr() - base]
del b, c
d = mib(1)  # the halves merged again
out["merged"] = d.data_ptr() - base
del d
small = torch.empty(100, dtype=torch.uint8)  # under MIN_BYTES: glibc's
s = arena.stats()
out["small_outside"] = s.live == 0
random.seed(0)
live, bad = {}, 0
for i in range(3000):  # random sizes and frees; every live tensor keeps its own fill
    if live and random.random() < 0.45:
        k = random.choice(list(live)); t = live.pop(k)
        bad += int((t != k % 251).any())
    else:
        live[i] = torch.full((random.randint(1, 3 * MiB),), i % 251, dtype=torch.uint8)
bad += sum(int((t != k % 251).any()) for k, t in live.items())
out["corrupted"] = bad
del t
s = arena.stats()
out["live_matches"] = s.live >= sum(t.numel() for t in live.values() if t.numel() >= arena.MIN_BYTES)
live.clear()
s = arena.stats()
out["after"] = [s.live, s.mapped > 0, s.reused > 0, s.peak_mapped >= s.peak_live]
out["trimmed"] = arena.trim() == s.mapped and arena.stats().mapped == 0
print(json.dumps(out))
"""


def test_best_fit_splits_and_merges_freed_blocks_and_never_overlaps_live_ones():
    got = _child(ALLOCATION)
    assert got["split"] == [0, 2**19] and got["merged"] == 0
    assert got["small_outside"] and got["corrupted"] == 0 and got["live_matches"]
    assert got["after"] == [0, True, True, True] and got["trimmed"]


TRAIN = """
import json, sys
import torch
from qlorakit.config import DataConfig, LoraConfig, MemoryConfig, RunConfig, TrainConfig
from qlorakit.data import build_datasets, collate_fn
from transformers import AutoTokenizer
from qlorakit.train import arena, train
from qlorakit.train.metrics import read_metrics
from tests.helpers.train import tiny_qlora_model
use, data, tok_dir, out = sys.argv[1] == "1", sys.argv[2], sys.argv[3], sys.argv[4]
lora = LoraConfig(r=4, alpha=8, dropout=0.05)
cfg = RunConfig(data=DataConfig(paths=(data,), val_size=4, source_max_len=64, target_max_len=32),
                lora=lora, train=TrainConfig(batch_size=2, max_steps=3, compute_dtype="float32", seed=0),
                memory=MemoryConfig(arena=use, gradient_checkpointing=False, malloc_mmap_threshold_kib=0))
tok = AutoTokenizer.from_pretrained(tok_dir)
train_set, val_set, _ = build_datasets(cfg.data, tok)
torch.manual_seed(0)
model = tiny_qlora_model(len(tok), lora)
train(model, train_set, val_set, collate_fn(tok), cfg, out, progress=False)
rows = [r for r in read_metrics(f"{out}/metrics.jsonl") if "loss" in r]
s = arena.stats()
print(json.dumps({"losses": [r["loss"] for r in rows], "grad_norms": [r["grad_norm"] for r in rows],
                  "installed": arena.installed(), "reused": s.reused if s else 0}))
"""


def test_training_with_the_arena_gives_the_same_values(small_oasst, smol_tokenizer, tmp_path):
    smol_tokenizer.save_pretrained(tmp_path / "tok")
    runs = [_child(TRAIN, flag, str(small_oasst), str(tmp_path / "tok"), str(tmp_path / f"run{flag}"))
            for flag in ("0", "1")]  # fmt: skip
    assert not runs[0]["installed"] and runs[1]["installed"] and runs[1]["reused"] > 0
    assert runs[1]["losses"] == runs[0]["losses"] and runs[1]["grad_norms"] == runs[0]["grad_norms"]


def test_qlorakit_train_picks_the_arena_and_writes_it_down(save_tiny_llama, smol_tokenizer, small_oasst, tmp_path):
    model = save_tiny_llama("tiny_llama_arena", smol_tokenizer, vocab_size=len(smol_tokenizer),
                            tie_word_embeddings=True)
    out = tmp_path / "run"
    code = """
    import json, sys
    from qlorakit.cli.main import main
    from qlorakit.train import arena
    status = main(sys.argv[1:])
    print(json.dumps({"status": status, "installed": arena.installed()}))
    """
    got = _child(code, "train", "--model", str(model), "--data", str(small_oasst), "--output-dir", str(out),
                 "--batch-size", "2", "--lora-r", "4", "--val-size", "4", "--compute-dtype", "float32", "--no-progress",
                 "--source-max-len", "64", "--target-max-len", "32", "--max-steps", "1")  # fmt: skip
    assert got == {"status": 0, "installed": True}
    text = (out / "config.yaml").read_text()
    memory = yaml.safe_load(text)["memory"]
    assert memory["arena"] is True and memory["malloc_mmap_threshold_kib"] == 0
    assert "allocator = arena  (fastest" in text and "heap guard" not in text  # nothing for the guard to do


def test_without_a_compiler_or_when_the_build_fails_the_arena_says_why(monkeypatch):
    monkeypatch.setenv(arena.ARENA_ENV, "1")
    monkeypatch.setattr(arena, "_library", None)
    monkeypatch.setattr(arena, "_build_error", None)
    monkeypatch.setattr(arena, "compiler", lambda: None)
    assert arena.unavailable_reason() == "no C++ compiler (c++/g++) on PATH"
    monkeypatch.setattr(arena, "compiler", lambda: "/usr/bin/c++")

    def broken():
        raise OSError("c10 headers not found")

    monkeypatch.setattr(arena, "_load", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert arena.install() is False and not arena.installed()
    assert "c10 headers not found" in str(caught[0].message)
    assert arena.unavailable_reason() == "build failed: c10 headers not found"
    monkeypatch.setenv(arena.ARENA_ENV, "0")
    assert arena.unavailable_reason() == "QLORAKIT_ARENA=0" and arena.stats() is None and arena.trim() == 0


OUT_OF_ADDRESS_SPACE = """
import json, resource, torch
from qlorakit.train import arena
assert arena.install()
MiB = 2**20
big = torch.empty(512 * MiB, dtype=torch.uint8); del big  # a free 512 MiB segment the arena keeps
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + 300 * MiB, resource.RLIM_INFINITY))
t = torch.empty(600 * MiB, dtype=torch.uint8)  # larger than the free segment: no room until it is unmapped
t.fill_(1)
print(json.dumps({"ok": int(t[-1]) == 1, "mapped_mib": arena.stats().mapped // MiB}))
"""


def test_a_failed_mmap_gives_the_free_segments_back_and_tries_again():
    got = _child(OUT_OF_ADDRESS_SPACE)
    assert got == {"ok": True, "mapped_mib": 600}
