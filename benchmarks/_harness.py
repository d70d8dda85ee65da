"""What the benchmarks share: a measurement in a fresh interpreter, the commit, the CPU, medians, the JSON file.

A benchmark script imports this as ``import _harness`` (Python puts the script's directory first on
``sys.path``). Nothing here imports torch: a driver that imported it would hand its peak RSS to every
child (Linux keeps ``ru_maxrss`` across fork + exec), so the CPU readings import it only when called.

- ``run_child(script, args)``: run ``python script *args`` in a fresh interpreter, return the JSON value of
  the last line of its stdout that is JSON (the child prints its measurements as ``json.dumps(...)`` last);
- ``git_head()``: the commit of this checkout; ``cpu_model()``, ``vector_flags()``, ``cpu_header()``;
- ``median_of(runs, key)`` / ``medians(runs_by_side, keys)``: the median over repeats;
- ``write_result(path, payload)``: ``qlorakit.fileio.write_json_atomic``, then ``wrote <path>`` printed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qlorakit.fileio import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
#: How much of a failed child's stderr goes into the error (its end: the traceback).
STDERR_TAIL = 4000
#: CPU flags that decide the speed of the fp32 / bf16 kernels (SIMD width, FMA, half and bf16 converts, AMX).
VECTOR_FLAG_PREFIXES = ("avx", "amx", "fma", "f16c")
#: The repeats of one measurement, each a child's JSON result.
Runs = Sequence[Mapping[str, Any]]


class ChildError(RuntimeError):
    """A benchmark child failed, or printed no JSON line."""


def last_json_line(stdout: str, what: str, prefix: str = "") -> Any:
    """The JSON value of the last stdout line that starts with ``prefix`` and parses (after the prefix)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith(prefix):
            try:
                return json.loads(line[len(prefix):])
            except json.JSONDecodeError:
                continue
    shown = stdout.strip()[-500:] or "(nothing)"
    raise ChildError(f"{what} printed no JSON line{f' starting with {prefix!r}' if prefix else ''}; its stdout "
                     f"ends with:\n{shown}\nthe child must print its result as json.dumps(...) last")  # fmt: skip


def run_child(script: str | os.PathLike[str], args: Sequence[str], *, env: Mapping[str, str] | None = None,
              show_stderr: bool = False, prefix: str = "") -> Any:  # fmt: skip
    """Run ``python script *args`` in a fresh interpreter and return its last JSON line (``last_json_line``).

    ``env`` is added to this process's environment. The child's stderr is kept and its tail put into the
    error when it fails, or passed through to the terminal with ``show_stderr`` (progress shown live).
    """
    what = f"{Path(script).name} {' '.join(args)}".strip()
    done = subprocess.run([sys.executable, str(Path(script).resolve()), *args], stdout=subprocess.PIPE,
                          stderr=None if show_stderr else subprocess.PIPE, text=True,
                          env={**os.environ, **env} if env is not None else None, check=False)  # fmt: skip
    if done.returncode != 0:
        why = "its stderr is above" if show_stderr else f"its stderr ends with:\n{done.stderr[-STDERR_TAIL:]}"
        raise ChildError(f"{what} failed with status {done.returncode}; {why}")
    return last_json_line(done.stdout, what, prefix)


#: Packages outside both stacks' own requirements that torch or transformers import whenever they are installed
#: (torch._dynamo probes triton, transformers' losses import scipy): the test extra brings them, a user's install
#: does not, and they add about 107 MiB resident to every child (``benchmarks/user_env.sh``, docs/benchmarks.md).
IMPORTED_IF_PRESENT = ("triton", "scipy")


def extras_present() -> list[str]:
    """Which of ``IMPORTED_IF_PRESENT`` this interpreter (and so every child) has: [] in ``user_env.sh``'s venv."""
    import importlib.util

    return [name for name in IMPORTED_IF_PRESENT if importlib.util.find_spec(name) is not None]


def git_head() -> str:
    """The commit this checkout is at (``git rev-parse HEAD``); "" outside a git checkout or without git."""
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=False)  # fmt: skip
    except OSError:
        return ""
    return done.stdout.strip()


def cpu_model() -> str:
    """The ``model name`` of the first CPU in ``/proc/cpuinfo`` ("?" where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return "?"


def vector_flags() -> list[str]:
    """The CPU's flags that start with ``VECTOR_FLAG_PREFIXES``, sorted (``qlorakit.hardware``: imports torch)."""
    from qlorakit.hardware import cpu_flags

    return sorted(f for f in cpu_flags() if f.startswith(VECTOR_FLAG_PREFIXES))


def cpu_header(flags: Iterable[str]) -> str:
    """The first line a CPU benchmark prints: ``CPU: <n> cores, flags <flags>``."""
    return f"CPU: {os.cpu_count()} cores, flags {' '.join(flags)}"


def median_of(runs: Runs, key: str) -> float:
    """The median of ``run[key]`` over the repeats ``runs``."""
    return statistics.median(run[key] for run in runs)


def medians(runs_by_side: Mapping[str, Runs], keys: Iterable[str]) -> dict[str, dict[str, float]]:
    """``{side: {key: median over that side's runs}}`` (e.g. sides "ours" and "theirs")."""
    keys = tuple(keys)
    return {side: {key: median_of(runs, key) for key in keys} for side, runs in runs_by_side.items()}


def write_result(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically (``qlorakit.fileio.write_json_atomic``), print ``wrote``."""
    out = write_json_atomic(path, payload)
    print(f"wrote {path}")
    return out


def train_on_prepared(workdir: Path, steps: int, flags: Sequence[str]) -> int:
    """``qlorakit train`` in this process on ``train_throughput.py``'s prepared ``workdir`` (SmolLM2-135M as fp32
    safetensors, its OASST1 sample): ``steps`` steps, 2 rows of <= 512 tokens, LoRA r 16 / alpha 16, into a
    temporary run directory; ``flags`` are added (and win). Returns the command's exit status."""
    import tempfile

    from qlorakit.cli.main import main as qlorakit_main

    data = json.loads((Path(workdir) / "data.json").read_text())
    model = next(p for p in Path(workdir).iterdir() if p.is_dir() and (p / "model.safetensors").is_file())
    with tempfile.TemporaryDirectory() as run_dir:
        return qlorakit_main(["train", "--model", str(model), "--data", data["data_path"], "--output-dir", run_dir,
                              "--overwrite", "--max-steps", str(steps), "--batch-size", "2", "--max-seq-len", "512",
                              "--lora-r", "16", "--lora-alpha", "16", "--no-progress", *flags])  # fmt: skip
