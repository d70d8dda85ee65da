"""Checkpoints: ``checkpoint-<step>/`` with the adapter (PEFT layout), optimizer state and trainer state.

Everything is safetensors or JSON (never pickle). A checkpoint is written durably: into
``.checkpoint-<step>.tmp-<pid>``, every file fsynced, renamed into place, the run directory fsynced
(``fileio.write_dir_atomic``), so a kill or a power cut leaves either the whole checkpoint or none of it.

- ``adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors``): the active adapter (``lora.save_adapter``);
  a full fine-tuning run (``full=True``, ``train.full``) has ``model.safetensors`` instead: every trained weight;
- ``optimizer.safetensors``: ``state.<param index>.<key>`` tensors, ``param_groups`` as JSON metadata;
- ``rng.safetensors``: the torch CPU (and CUDA) generator states; of a multi-process run also every other
  rank's (``torch_cpu.rank<r>``, ``torch_cuda.rank<r>``: each rank draws its own dropout masks);
- ``trainer_state.json``: ``TrainerState`` (step, data position, token count, elapsed time, ...);
- ``manifest.json``: every other file's size and sha256 (``train.manifest``), checked before a resume;
  ``newest_verified`` picks the newest checkpoint that matches its manifest and reports the others.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qlorakit.errors import StateDictError, StorageError
from qlorakit.fileio import remove_dir, write_dir_atomic
from qlorakit.lora import load_adapter, save_adapter
from qlorakit.train.faults import pause_point
from qlorakit.train.full import WEIGHTS_FILE, load_trainable, save_trainable
from qlorakit.train.manifest import MANIFEST, manifest_bytes, verify, write_manifest

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
REQUIRED_FILES = ("adapter", "optimizer.safetensors", "rng.safetensors", "trainer_state.json")
#: Bytes a checkpoint holds beyond its tensors (JSON files, safetensors headers, manifest), for the estimate.
CHECKPOINT_SLACK = 1 << 20


@dataclass
class TrainerState:
    """Where training stands: enough to continue exactly."""

    step: int = 0  # optimizer updates done
    micro_index: int = 0  # micro-batches consumed in total (the data position across epochs)
    tokens: int = 0  # input tokens processed, padding excluded
    elapsed_s: float = 0.0  # training wall time before this session (excludes eval and saving)
    total_steps: int = 0
    bad_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient norm, in total
    bad_streak: int = 0  # ... in a row, up to this step


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


def save_checkpoint(run_dir: Path, model, optimizer, state: TrainerState, keep: int,
                    rank_rng: dict[str, torch.Tensor] | None = None, full: bool = False) -> Path:
    """Write ``checkpoint-<step>`` durably (``fileio.write_dir_atomic``) and keep the newest ``keep`` (0 = all).

    ``full``: a full fine-tuning run; the trained weights go to ``model.safetensors`` instead of ``adapter/``.

    A failed write (disk full, I/O error) leaves every earlier checkpoint as it was and raises
    ``StorageError`` with the space the checkpoint needs.
    """
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{state.step}"
    tensors, metadata = optimizer_tensors(optimizer)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    rng.update(rank_rng or {})  # the other ranks' generators (``rank_rng_key``)

    def fill(directory: Path) -> None:
        if full:
            save_trainable(model, directory / WEIGHTS_FILE)
        else:
            save_adapter(model, directory / "adapter", overwrite=True)
        save_file(tensors, str(directory / "optimizer.safetensors"), metadata=metadata)
        save_file(rng, str(directory / "rng.safetensors"))
        (directory / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        write_manifest(directory)  # last: it describes the files above

    try:
        write_dir_atomic(final, fill, at=lambda point: pause_point(point, final.name))
    except OSError as exc:
        needed = _tensor_bytes(tensors.values()) + _tensor_bytes(rng.values()) + adapter_bytes(model)
        raise storage_error(exc, final, needed) from exc
    _prune(run_dir, state.step, keep)
    return final


def _prune(run_dir: Path, step: int, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints up to ``step`` (newer ones, left by an abandoned
    attempt that failed verification, are replaced when training reaches their step)."""
    if not keep:
        return
    older = [path for path in list_checkpoints(run_dir) if checkpoint_step(path) <= step]
    for old in older[:-keep]:
        remove_dir(old)


def storage_error(exc: OSError, target: Path, needed: int) -> StorageError:
    """The ``StorageError`` for a failed checkpoint write: what failed, the space needed and free, what is kept."""
    free = shutil.disk_usage(target.parent).free
    kept = [p.name for p in list_checkpoints(target.parent) if p.name != target.name]
    intact = f"the previous checkpoint ({kept[-1]}) is intact" if kept else "no earlier checkpoint exists"
    return StorageError(
        f"writing {target} failed: {exc.strerror or exc} (errno {exc.errno}). The checkpoint needs about "
        f"{needed / 2**20:,.1f} MiB; {free / 2**20:,.1f} MiB are free on that filesystem. Nothing was replaced: "
        f"{intact}. Free some space (or move the run directory), then continue with "
        f"`qlorakit train --resume {target.parent}`."
    )


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def adapter_bytes(model) -> int:
    """Bytes of the trainable (adapter) parameters, as the checkpoint's adapter file stores them."""
    return _tensor_bytes(p for p in model.parameters() if p.requires_grad)


def checkpoint_bytes_estimate(model, run_dir: Path) -> int:
    """Disk bytes of one checkpoint: the newest existing one's, else an upper bound from the adapter size.

    The bound counts the adapter plus two fp32 moments per trainable element (32-bit AdamW; the 8-bit state
    is smaller) plus ``CHECKPOINT_SLACK`` for the JSON files and headers.
    """
    existing = [manifest_bytes(path) for path in list_checkpoints(run_dir)]
    if existing and existing[-1]:
        return existing[-1]
    elements = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return adapter_bytes(model) + 8 * elements + CHECKPOINT_SLACK


def check_free_space(run_dir: Path, model, checkpoints_at_once: int) -> str | None:
    """Raise ``StorageError`` if one checkpoint does not fit on ``run_dir``'s filesystem; a warning line when
    ``checkpoints_at_once`` of them (the kept ones plus the one being written) would not."""
    one = checkpoint_bytes_estimate(model, run_dir)
    free = shutil.disk_usage(run_dir).free
    def mib(n):
        return f"{n / 2**20:,.1f} MiB"
    if free < one:
        raise StorageError(f"{run_dir}: {mib(free)} free, but one checkpoint needs about {mib(one)}; free some space "
                           "or choose another --output-dir before training")
    if free < one * checkpoints_at_once:
        return (f"warning: {mib(free)} free in {run_dir}; keeping {checkpoints_at_once - 1} checkpoint(s) while "
                f"writing the next needs about {mib(one * checkpoints_at_once)} "
                "(lower --save-total-limit or free space)")
    return None


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_RE.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint-<step> directory")
    return int(match.group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run (verified or not), oldest first."""
    found = [child for child in (Path(run_dir).iterdir() if Path(run_dir).is_dir() else [])
             if CHECKPOINT_RE.match(child.name) and child.is_dir()]
    return sorted(found, key=checkpoint_step)


def newest_verified(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match its manifest, and one report line per newer one that fails.

    A checkpoint written before manifests existed (no ``manifest.json`` at all, every file present) is used
    only when no checkpoint verifies, with a line saying so.
    """
    reports: list[str] = []
    legacy = None
    for path in reversed(list_checkpoints(run_dir)):
        problems = verify(path)
        if not problems:
            if reports:
                reports.append(f"resuming from {path.name}, the newest checkpoint that verifies")
            return path, reports
        if not (path / MANIFEST).exists() and legacy is None and all((path / f).exists() for f in REQUIRED_FILES):
            legacy = path
            continue
        reports.append(f"{path.name} fails verification: " + "; ".join(problems))
    if legacy is not None:
        reports.append(f"resuming from {legacy.name}, written without a manifest (not verified)")
    return legacy, reports


def rank_rng_key(name: str, rank: int) -> str:
    """The key of rank ``rank``'s generator state ``name`` (``torch_cpu``, ``torch_cuda``) in rng.safetensors."""
    return name if rank == 0 else f"{name}.rank{rank}"


def _rank_state(rng: dict[str, torch.Tensor], name: str, rank: int) -> torch.Tensor:
    """Rank ``rank``'s saved state; for a rank the checkpoint has none (resumed on more ranks), rank 0's state
    after seeding from it and the rank (deterministic, distinct per rank)."""
    key = rank_rng_key(name, rank)
    if key in rng or rank == 0:
        return rng[key]
    seed = int.from_bytes(hashlib.sha256(bytes(rng[name].tolist()) + rank.to_bytes(4, "little")).digest()[:8], "little")
    return torch.Generator().manual_seed(seed % 2**63).get_state()


def load_checkpoint(path: Path, model, optimizer, rank: int = 0, full: bool = False) -> TrainerState:
    """Restore adapter weights (``full``: every trained weight), optimizer state and RNG (``rank``'s own) from
    ``path``; return its ``TrainerState``.

    ``path`` must verify against its manifest (a checkpoint without one is loaded as it is).
    """
    problems = verify(path) if (path / MANIFEST).exists() else []
    if problems:
        raise StateDictError(f"{path} fails verification ({'; '.join(problems)}); resume from an earlier checkpoint")
    has_full = (path / WEIGHTS_FILE).is_file()
    if has_full != full:
        kinds = ("a LoRA run's (adapter/)", "a full fine-tuning run's (model.safetensors)")
        raise StateDictError(f"{path} is {kinds[has_full]} checkpoint, but this run has train.finetune = "
                             f"{'full' if full else 'lora'}; resume with the run's own config.yaml setting")
    if full:
        load_trainable(model, path / WEIGHTS_FILE)
    else:
        load_adapter(model, path / "adapter", name="default", replace=True)
    load_optimizer_tensors(optimizer, path / "optimizer.safetensors")
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(_rank_state(rng, "torch_cpu", rank))
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(_rank_state(rng, "torch_cuda", rank))
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))
