"""``qlorakit.quant.report``: the quant-report JSON is complete, sane and written atomically."""

import argparse
import json
import math

import pytest

from qlorakit.errors import ConfigError
from qlorakit.quant import report

NUMEL = 65536


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, object]:
    out_dir = tmp_path_factory.mktemp("report")
    args = argparse.Namespace(output=str(out_dir / "quant_report.json"), numel=NUMEL, repeats=1, gguf=None)
    assert report.main_from_args(args) == 0
    return json.loads((out_dir / "quant_report.json").read_text()), out_dir


def _row(data: dict, source: str, quant_type: str, double_quant: bool) -> dict:
    (row,) = [
        r for r in data["errors"]
        if (r["source"], r["quant_type"], r["double_quant"]) == (source, quant_type, double_quant)
    ]
    return row


def test_json_is_written_without_a_leftover_tmp_file(written):
    _, out_dir = written
    assert sorted(p.name for p in out_dir.iterdir()) == ["quant_report.json"]


@pytest.mark.parametrize("source", ["normal", "student_t3"])
def test_every_quant_type_and_double_quant_has_a_positive_finite_error(written, source):
    data, _ = written
    for quant_type in ("nf4", "fp4", "int4"):
        for double_quant in (True, False):
            row = _row(data, source, quant_type, double_quant)
            assert row["numel"] == NUMEL
            for key in ("mean_abs_error", "rms_error", "rel_rms_error"):
                assert math.isfinite(row[key]) and row[key] > 0, (quant_type, double_quant, key)
            assert row["mean_abs_error"] <= row["rms_error"]


def test_nf4_error_is_below_int4_on_normal_data(written):
    data, _ = written
    for double_quant in (True, False):
        nf4 = _row(data, "normal", "nf4", double_quant)
        int4 = _row(data, "normal", "int4", double_quant)
        assert nf4["rms_error"] < int4["rms_error"]
        assert nf4["mean_abs_error"] < int4["mean_abs_error"]


def test_bits_per_param_with_and_without_double_quant(written):
    data, _ = written
    assert round(_row(data, "normal", "nf4", True)["bits_per_param"], 3) == 4.127
    assert _row(data, "normal", "nf4", False)["bits_per_param"] == 4.5


def test_throughput_has_quantize_and_both_dequantize_rows(written):
    data, _ = written
    tp = data["throughput"]
    assert [r["op"] for r in tp["rows"]] == ["quantize", "dequantize_fp32", "dequantize_bf16"]
    assert all(r["ours_gbps"] > 0 for r in tp["rows"])
    assert tp["shape"] == [NUMEL // 4096, 4096]
    assert {"torch", "torch_threads", "cpu"} <= set(data["environment"])


def test_student_t_data_has_unit_std():
    x = report.student_t_data(1 << 20)
    assert abs(float(x.std()) - 1.0) < 0.05


def test_throughput_without_bitsandbytes_reports_only_ours(monkeypatch):
    monkeypatch.setattr(report, "_bnb_ops", lambda x: None)
    tp = report.throughput(4096, repeats=1)
    assert tp["bitsandbytes"] == "bitsandbytes not installed"
    assert all("bnb_gbps" not in r for r in tp["rows"])
    assert "bitsandbytes not installed" in report.format_throughput(tp)


def test_too_small_numel_is_rejected():
    with pytest.raises(ConfigError, match="--numel 100 is too small"):
        report.build_report(100, 1)
