"""Run tracking: the rows of ``metrics.jsonl`` and the run's config, mirrored to TensorBoard, W&B or MLflow.

``TrainConfig.report_to`` names the trackers (``--report-to tensorboard,wandb``; "none" by default).
``metrics.MetricsLog.write`` is the one place a row is written, and it hands every row to
``Trackers.log``, so each tracker sees exactly the rows of ``metrics.jsonl``: every numeric field of a row
becomes a scalar under its own name at the row's ``step`` (``null`` values, e.g. the loss of a skipped
step, and strings are left out). The config (``config.as_dict``) is written once when the trackers open.

- **tensorboard**: ``torch.utils.tensorboard.SummaryWriter`` into ``<run>/tensorboard/``; the config as the
  text summary ``config``. A resumed session purges the events after the checkpoint's step (``purge_step``),
  as ``metrics.jsonl`` drops its rows.
- **wandb**: ``wandb.init(dir=<run>, project="qlorakit", name=<run dir name>, config=...)``. ``WANDB_MODE`` is
  respected; when it is unset the run is ``offline`` (no network, no login; ``wandb sync <run>/wandb/...``
  uploads it later), and that choice is printed.
- **mlflow**: an ``MlflowClient`` on ``MLFLOW_TRACKING_URI``, or when unset on ``sqlite:///<run>/mlflow.db``
  (MLflow 3 keeps its file store in maintenance mode; the SQLite store needs ``sqlalchemy``), experiment
  ``qlorakit``; the config as flattened params ``section.field``; characters MLflow refuses in a metric name
  become ``_``.

Each resumed session opens a new W&B / MLflow run. The libraries are the optional extra ``tracking``
(``pip install 'qlorakit[tracking]'``); ``check_available`` fails naming it before anything loads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Protocol

from qlorakit.constants import REPORT_TARGETS
from qlorakit.errors import ConfigError

EXTRA = "tracking"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
PROJECT = "qlorakit"


class Tracker(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def check_available(report_to: tuple[str, ...]) -> None:
    """Every named tracker's library is installed (found without importing it), else a ConfigError naming the
    extra; cheap, so ``qlorakit train`` calls it before the model loads."""
    for name in report_to:
        module = REPORT_TARGETS[name]
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--report-to {name} needs the {module} package, which is not installed; install the "
                              f"'{EXTRA}' extra (pip install 'qlorakit[{EXTRA}]') or drop {name} from --report-to")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics row other than ``step`` (bools, strings and nulls left out)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": "1"}`` (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, type(None))) else str(value)
    return flat


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=purge)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", global_step=resume_step or 0)
        self.writer.flush()

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or "offline"
        if "WANDB_MODE" not in os.environ:
            print("wandb: WANDB_MODE is not set, so the run is offline (no network); upload it later with "
                  f"`wandb sync {run_dir / 'wandb'}/offline-run-*`, or set WANDB_MODE=online")
        self.run = wandb.init(project=PROJECT, name=run_dir.name, dir=str(run_dir), config=config, mode=mode,
                              reinit="create_new")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, run_dir: Path, config: dict[str, Any], resume_step: int | None) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / MLFLOW_DB).resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(PROJECT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(PROJECT)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        for key, value in flatten(config).items():
            self.client.log_param(self.run_id, key, value)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.client.log_metric(self.run_id, re.sub(r"[^\w\-. /]", "_", key), value, step=step)  # MLflow's names

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_OPENERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}


class Trackers:
    """The run's trackers: ``log(row)`` sends a metrics row to each, ``close()`` ends them."""

    def __init__(self, report_to: tuple[str, ...], run_dir: Path, config: dict[str, Any] | None,
                 resume_step: int | None = None) -> None:
        names = [n for n in report_to if n != "none"]
        check_available(tuple(names))
        self.names = names
        self.trackers: list[Tracker] = []
        try:
            for name in names:
                self.trackers.append(_OPENERS[name](Path(run_dir), config or {}, resume_step))
        except BaseException:
            self.close()
            raise

    def log(self, row: dict[str, Any]) -> None:
        values = scalars(row)
        if values and "step" in row:
            for tracker in self.trackers:
                tracker.log(int(row["step"]), values)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()
