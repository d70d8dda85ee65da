"""Run tracking (``--report-to``): TensorBoard holds every logged step, W&B offline writes its run directory,
MLflow stores the metric history, and a missing library fails naming the ``tracking`` extra before loading."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from qlorakit.cli.config_args import run_config_from_args
from qlorakit.cli.main import build_parser, main
from qlorakit.config import TrainConfig
from qlorakit.data import build_datasets, collate_fn
from qlorakit.errors import ConfigError
from qlorakit.train import list_checkpoints, read_metrics, train
from qlorakit.train.metrics import MetricsLog
from tests.helpers.train import run_config, tiny_qlora_model

ROWS = [{"step": 1, "loss": 2.5, "lr": 0.1, "grad_norm": 1.5}, {"step": 2, "loss": None, "skipped": "non-finite loss"},
        {"step": 2, "eval_loss": 2.0, "eval_tokens": 40}, {"step": 3, "loss": 1.25, "rewards/chosen": 0.5}]
CONFIG = {"model": "tiny", "train": {"lr": 0.1, "report_to": ["x"]}}


def test_report_to_takes_commas_repeats_and_refuses_unknown_names():
    args = build_parser().parse_args(["train", "--report-to", "tensorboard,wandb", "--report-to", "mlflow"])
    assert run_config_from_args(args).train.report_to == ("tensorboard", "wandb", "mlflow")
    assert TrainConfig().report_to == ("none",)
    assert TrainConfig(report_to="none").report_to == ("none",)
    with pytest.raises(ConfigError, match="report_to.*unknown tracker 'comet'"):
        TrainConfig(report_to=("tensorboard", "comet"))
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        TrainConfig(report_to="none,wandb")


def test_missing_library_names_the_extra_before_the_model_loads(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code = main(["train", "--model", str(tmp_path / "no-such-model"), "--report-to", "wandb",
                 "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "needs the wandb package" in err and "pip install 'qlorakit[tracking]'" in err
    assert "no-such-model" not in err  # it failed before looking at the model


def _scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_every_logged_step_across_a_resume(smol_tokenizer, small_oasst, tmp_path):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    cfg = run_config(small_oasst, run_dir, save_steps=1, max_steps=4, report_to=("tensorboard",))
    train_set, val_set, _ = build_datasets(cfg.data, smol_tokenizer)
    train(tiny_qlora_model(len(smol_tokenizer), cfg.lora), train_set, val_set, collate_fn(smol_tokenizer), cfg,
          run_dir, progress=False, stop_after_steps=2)
    train(tiny_qlora_model(len(smol_tokenizer), cfg.lora), train_set, val_set, collate_fn(smol_tokenizer), cfg,
          run_dir, resume_from=list_checkpoints(run_dir)[-1], progress=False)
    rows = read_metrics(run_dir / "metrics.jsonl")
    scalars = _scalars(run_dir / "tensorboard")
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"):
        expected = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        assert [s for s, _ in scalars[key]] == [s for s, _ in expected], key  # every step once, in order
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in expected], rel=1e-6), key  # fp32
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]


def test_tensorboard_rows_skip_nulls_and_strings(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path, report_to=("tensorboard",), config=CONFIG)
    for row in ROWS:
        log.write(row)
    log.close()
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(1, 2.5), (3, 1.25)] and scalars["eval_loss"] == [(2, 2.0)]
    assert scalars["rewards/chosen"] == [(3, 0.5)] and "skipped" not in scalars


def test_wandb_offline_writes_its_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # ~10 s: wandb starts its service process
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path, report_to=("wandb",), config=CONFIG)
    for row in ROWS:
        log.write(row)
    run = log.trackers.trackers[0].run
    assert run.config["train"]["lr"] == 0.1 and run.summary["grad_norm"] == 1.5  # step 1, committed by step 2
    log.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # the record file's content is flushed asynchronously, so only its presence is checked
    assert [p.stat().st_size > 0 for p in runs[0].glob("run-*.wandb")] == [True]


@pytest.mark.slow
def test_mlflow_stores_the_metric_history(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")  # ~20 s: import and the SQLite schema migrations
    pytest.importorskip("sqlalchemy")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log = MetricsLog(tmp_path, report_to=("mlflow",), config=CONFIG)
    for row in ROWS:
        log.write(row)
    client, run_id = log.trackers.trackers[0].client, log.trackers.trackers[0].run_id
    log.close()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 2.5), (3, 1.25)]
    assert client.get_run(run_id).data.params["train.lr"] == "0.1"
    assert (tmp_path / "mlflow.db").is_file()
