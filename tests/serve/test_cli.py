"""``qlorakit serve``: the wiring from flags to a running app, the exposure warning, the missing-extra message."""

from __future__ import annotations

import importlib.util

import uvicorn
from fastapi.testclient import TestClient

from qlorakit.cli import serve_cmd
from qlorakit.cli.main import main


def test_serve_loads_the_base_and_adapters_and_warns_on_all_interfaces(base_dir, adapter_dirs, monkeypatch, capsys):
    seen = {}

    def fake_run(app, host, port, log_level):  # instead of blocking in uvicorn: ask the app what it serves
        seen.update(host=host, port=port)
        with TestClient(app) as http:
            seen["models"] = [m["id"] for m in http.get("/v1/models").json()["data"]]

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["serve", "--model", str(base_dir), "--adapter", f"x={adapter_dirs['x']}", "--host", "0.0.0.0",
                 "--port", "8123"]) == 0
    assert seen == {"host": "0.0.0.0", "port": 8123, "models": [base_dir.name.lower(), "x"]}
    assert "without --api-key" in capsys.readouterr().err


def test_serve_without_the_extra_names_it(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", "--model", "whatever"]) == 2
    err = capsys.readouterr().err
    assert "fastapi" in err and "pip install 'qlorakit[serve]'" in err
    assert serve_cmd.SERVE_PACKAGES == ("fastapi", "uvicorn")


def test_bad_limits_are_refused_before_loading(capsys):
    assert main(["serve", "--model", "whatever", "--max-batch", "0"]) == 2
    assert "max_batch" in capsys.readouterr().err
