"""Checkpoints: ``checkpoint-<step>/`` with the adapter (PEFT layout), optimizer state and trainer state.

Everything is safetensors or JSON (never pickle). A checkpoint is written into a temporary sibling
directory and renamed into place, so a crash leaves either the whole checkpoint or none of it.

- ``adapter_config.json`` + ``adapter_model.safetensors``: the active adapter (``lora.save_adapter``);
- ``optimizer.safetensors``: ``state.<param index>.<key>`` tensors, ``param_groups`` as JSON metadata;
- ``rng.safetensors``: the torch CPU (and CUDA) generator states;
- ``trainer_state.json``: ``TrainerState`` (step, data position, token count, elapsed time, ...).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qlorakit.errors import StateDictError
from qlorakit.lora import load_adapter, save_adapter

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    """Where training stands: enough to continue exactly."""

    step: int = 0  # optimizer updates done
    micro_index: int = 0  # micro-batches consumed in total (the data position across epochs)
    tokens: int = 0  # input tokens processed, padding excluded
    elapsed_s: float = 0.0  # training wall time before this session (excludes eval and saving)
    total_steps: int = 0


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten ``optimizer.state_dict()`` into safetensors tensors + string metadata."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
    return tensors, {"param_groups": json.dumps(sd["param_groups"])}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Restore state written by ``optimizer_tensors``; the optimizer's own ``load_state_dict`` checks shapes."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path))
    groups = json.loads(metadata.get("param_groups", "[]"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    if len(groups) != len(optimizer.param_groups) or any(i >= len(params) for i in state):
        raise StateDictError(f"{path}: optimizer state is for {sum(len(g['params']) for g in groups)} parameters, "
                             f"this run trains {len(params)}")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except StateDictError as exc:
        raise StateDictError(f"{path}: {exc} (this checkpoint's optimizer state does not match the model being "
                             "trained; resume with the run's own config.yaml settings, or start a new run)") from exc


def save_checkpoint(run_dir: Path, model, optimizer, state: TrainerState, keep: int) -> Path:
    """Write ``checkpoint-<step>`` atomically and delete all but the newest ``keep`` (0 = keep all)."""
    final = Path(run_dir) / f"checkpoint-{state.step}"
    tmp = Path(run_dir) / f".checkpoint-{state.step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_adapter(model, tmp / "adapter", overwrite=True)
    tensors, metadata = optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"), metadata=metadata)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    found = []
    for child in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def load_checkpoint(path: Path, model, optimizer) -> TrainerState:
    """Restore adapter weights, optimizer state and RNG from ``path``; return its ``TrainerState``."""
    load_adapter(model, path / "adapter", name="default", replace=True)
    load_optimizer_tensors(optimizer, path / "optimizer.safetensors")
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))
