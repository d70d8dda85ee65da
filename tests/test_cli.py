"""Tests of the ``qlorakit`` command line: version, help, subcommand table and the console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import qlorakit
from qlorakit.cli.main import main
from qlorakit.errors import QlorakitError

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_version_prints_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"qlorakit {qlorakit.__version__}"


def test_help_lists_quant_report(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "quant-report" in capsys.readouterr().out


def test_quant_report_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["quant-report", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--output", "--numel", "--repeats", "--gguf"):
        assert flag in out


def test_unknown_subcommand_exits_nonzero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code != 0
    assert "no-such-command" in capsys.readouterr().err


def test_no_subcommand_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "quant-report" in capsys.readouterr().err


def test_qlorakit_error_is_reported_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qlorakit.cli import quant_report

    def fail(args: object) -> int:
        raise QlorakitError("something went wrong; do this instead")

    # add_parser binds quant_report.run when main() builds the parser, so patching here takes effect.
    monkeypatch.setattr(quant_report, "run", fail)
    assert main(["quant-report"]) == 2
    err = capsys.readouterr().err
    assert err == "error: something went wrong; do this instead\n"


def test_console_script_is_declared() -> None:
    tomllib = pytest.importorskip("tomllib")  # standard library from Python 3.11
    with PYPROJECT.open("rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"]["qlorakit"] == "qlorakit.cli.main:main"


def test_python_dash_m_qlorakit_prints_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qlorakit", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"qlorakit {qlorakit.__version__}"


def test_import_does_not_load_torch() -> None:
    code = "import sys, qlorakit, qlorakit.cli.main; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_quickstart_has_its_own_lr_and_a_data_flag_keeps_the_papers() -> None:
    from qlorakit.cli.main import build_parser
    from qlorakit.cli.train_cmd import build_config

    quick, _ = build_config(build_parser().parse_args(["train"]))
    assert (quick.optim.lr, quick.train.max_steps, quick.train.batch_size, quick.lora.r) == (1e-3, 20, 4, 16)
    given, _ = build_config(build_parser().parse_args(["train", "--data", "my.jsonl"]))
    assert given.optim.lr == 2e-4 and given.lora.r == 64  # the paper's defaults
    assert build_config(build_parser().parse_args(["train", "--lr", "3e-4"]))[0].optim.lr == 3e-4  # a flag wins
