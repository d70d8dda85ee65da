"""The real launchers: ``torchrun`` and ``accelerate launch`` start ``qlorakit train`` on 2 gloo ranks.

The other distributed tests spawn their ranks with ``multiprocessing`` and call ``train()``; these run the
command lines users type (docs/distributed.md), in fresh processes, and compare the run directory with one
process of the same job: the per-step losses and the held-out losses to rtol 1e-5, the final adapter to
rtol/atol 1e-5 (fp32; only the order of the sums differs, as in tests/train/test_distributed.py).
``accelerate launch --multi_gpu`` hands the job to torchrun's launcher with the same environment
(``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...); on a machine without CUDA qlorakit picks gloo. torchrun runs
FSDP, accelerate the default strategy (``auto``, which picks DDP for this small model).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlorakit.cli.main import main
from tests.helpers.distributed import assert_close_rows, free_port, metric_rows, small_oasst_file
from tests.helpers.tiny_llama import save_tiny_llama

RTOL = ATOL = 1e-5
TIMEOUT_S = 240  # one launch: two interpreters importing torch, a tiny model, two steps


def _args(model: Path, data: Path, out: Path) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--batch-size", "4",
            "--grad-accum", "1", "--lora-r", "4", "--lora-dropout", "0", "--val-size", "4", "--compute-dtype",
            "float32", "--no-progress", "--source-max-len", "64", "--target-max-len", "32", "--lr", "1e-2",
            "--no-gradient-checkpointing", "--max-steps", "2", "--dist-timeout-s", "60"]


def _launch(prefix: list[str], args: list[str], log: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2] / "src"),
                                                      env.get("PYTHONPATH", "")]))
    done = subprocess.run([*prefix, "-m", "qlorakit", *args], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
    log.write_text(done.stdout + done.stderr)
    return done


LAUNCHERS = {
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-port", str(port)],
    "accelerate": lambda port: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                                "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                "--main_process_port", str(port)],
}
EXTRA = {"torchrun": ["--distributed", "fsdp"], "accelerate": []}


@pytest.fixture(scope="module")
def runs(smol_tokenizer, shared_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    data = small_oasst_file(shared_dir, root / "small.jsonl")
    model = save_tiny_llama(root / "tiny", smol_tokenizer, vocab_size=len(smol_tokenizer), tie_word_embeddings=True)
    assert main(_args(model, data, root / "one")) == 0
    done = {}
    for name, prefix in LAUNCHERS.items():
        if name == "accelerate" and importlib.util.find_spec("accelerate") is None:
            continue
        done[name] = _launch(prefix(free_port()), _args(model, data, root / name) + EXTRA[name], root / f"{name}.log")
    return root, done


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_a_launcher_on_two_ranks_writes_the_run_of_one_process(runs, launcher):
    root, done = runs
    if launcher not in done:
        pytest.skip(f"{launcher} is not installed")
    result = done[launcher]
    assert result.returncode == 0, (root / f"{launcher}.log").read_text()[-3000:]
    assert "per rank         peak RSS" in result.stdout  # the summary of a 2-rank job (rank 0 alone prints it)
    one, two = root / "one", root / launcher
    assert_close_rows(metric_rows(two, "loss"), metric_rows(one, "loss"), RTOL)
    assert_close_rows(metric_rows(two, "eval_loss"), metric_rows(one, "eval_loss"), RTOL)
    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL)
    strategy = "fsdp" if EXTRA[launcher] else "ddp"  # the plan line names the world and the strategy run
    assert f"parallel   2 ranks (gloo), {strategy}" in result.stdout
