"""The CPU side of the GPU benchmarks: argument checks, byte/FLOP formulas, model writing, table and JSON.

The timings themselves need CUDA; these tests feed hand-made timings to the summaries and check the
arithmetic, and check that without CUDA both scripts stop before any long work with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_kernels
    import gpu_train

    return gpu_kernels, gpu_train


def test_shapes_parse_and_name_the_bad_one(bench):
    kernels, _ = bench
    assert kernels.parse_shapes("4096x4096,11008X4096") == [(4096, 4096), (11008, 4096)]
    with pytest.raises(ValueError, match="'4096x33': K must be even"):
        kernels.parse_shapes("4096x33")
    with pytest.raises(ValueError, match="'4096by4096'"):
        kernels.parse_shapes("4096by4096")


def test_dequant_bytes_count_codes_scales_nested_scales_and_output(bench):
    kernels, _ = bench
    n = 4096 * 4096  # 262144 blocks of 64, 1024 nested blocks
    assert kernels.dequant_bytes(n, 2) == n // 2 + n // 64 + 4 * 1024 + 2 * n
    assert kernels.gemv_bytes(4096, 4096, 2) == n // 2 + n // 64 + 4 * 1024 + 2 * (4096 + 4096)


def test_kernel_rows_medians_rates_ratio_and_fractions(bench):
    kernels, _ = bench
    times = {"ours": [3.0, 1.0, 2.0], "peer": [4.0, 4.0, 5.0]}
    row = kernels.summarize("dequantize", (4096, 4096), times, {"ours": 32.0, "peer": 64.0}, 2e9, "GB/s", 1e-3)
    assert row["ours"]["ms_median"] == 2.0 and row["ratio_ours_over_peer"] == 0.5
    assert row["ours"]["rate"] == pytest.approx(1000.0) and row["peer"]["rate"] == pytest.approx(500.0)
    kernels.add_fractions(row, {"datasheet_gbs": 2000.0, "measured_gbs": 1250.0})
    assert row["ours"]["pct_datasheet"] == pytest.approx(50.0) and row["ours"]["pct_measured"] == pytest.approx(80.0)
    table = kernels.format_table([row], {"datasheet_gbs": 2000.0, "measured_gbs": 1250.0, "measured_tflops": 0.0})
    assert "4096x4096" in table and "1000.0" in table and "0.50" in table


def test_kernel_measurement_code_runs_on_cpu_under_the_interpreter(bench, monkeypatch):
    """The GPU-side code path (bitsandbytes quantizes, qlorakit reads its state, both sides run, rows are
    summarized) on tiny CPU tensors; CUDA-event timing and memory peaks are replaced by stubs."""
    kernels, _ = bench
    pytest.importorskip("bitsandbytes")
    from qlorakit.quant.backends import triton_ops

    if not triton_ops.INTERPRETED:
        pytest.skip("needs the Triton interpreter (tests/conftest.py sets it without CUDA)")
    monkeypatch.setattr(kernels, "DEVICE", "cpu")
    monkeypatch.setattr(kernels, "peak_extra_mib", lambda fn: 0.0)
    monkeypatch.setattr(kernels, "alternate", lambda fns, repeats, iters: {name: [1.0] * repeats for name in fns})
    args = kernels.parse_args(["--shapes", "48x128", "--tokens", "16", "--dtype", "float32", "--repeats", "3"])
    rows = kernels._measure((48, 128), args)
    assert [r["op"] for r in rows] == ["dequantize", "forward", "grad_input", "gemv"]
    assert rows[0]["max_rel_diff"] == 0.0  # the same codes decoded the same way
    assert all(r["max_rel_diff"] < 1e-5 for r in rows)  # fp32 sums in another order


def test_llama_7b_shape_counts_match_the_published_model(bench):
    _, train = bench
    shape = train.LlamaShape()
    total = 6_738_415_616  # Llama-2-7B's parameter count
    embedding, norms = 32000 * 4096, (2 * 32 + 1) * 4096
    assert shape.matmul_params() == total - embedding - norms
    assert shape.lora_params(64) == 159_907_840  # peft's "trainable params" for r 64 on all seven linears


def test_random_model_is_written_once_and_trains_in_both_stacks_on_cpu(bench, tmp_path, monkeypatch):
    """The speed child of each stack on a tiny random Llama on CPU (CUDA statistics read as 0 there)."""
    import math

    pytest.importorskip("bitsandbytes")
    _, train = bench
    shape = train.LlamaShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256, max_positions=128)
    out = train.write_model(tmp_path / "tiny", shape)
    index = out / "model.safetensors.index.json"
    stamp = index.stat().st_mtime_ns
    assert train.write_model(tmp_path / "tiny", shape) == out and index.stat().st_mtime_ns == stamp  # reused
    params = sum(torch.Size(s).numel() for layer in [None, 0, 1] for s in shape.tensors(layer).values())
    assert json.loads(index.read_text())["metadata"]["total_size"] == 2 * params  # bf16
    monkeypatch.setattr(train, "DEVICE", "cpu")
    flags = ["--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
             "--vocab", "256", "--max-positions", "128", "--seq-len", "16", "--steps", "2", "--warmup", "1",
             "--rank", "4", "--fit-lengths", "16", "--model-dir", str(out)]  # fmt: skip
    for worker in ("ours", "theirs"):
        run = train.run_speed(train.parse_args([*flags, "--worker", worker, "--mode", "speed"]))
        assert run["trainable_params"] == shape.lora_params(4) and run["tokens_per_s"] > 0
        # Weights of std 0.02 give near-uniform predictions: the first loss is close to ln(vocab).
        assert abs(run["steps"][0]["loss"] - math.log(256)) < 0.1


def test_train_summary_ratios_mfu_and_table(bench):
    _, train = bench
    args = train.parse_args([])
    shape = train.LlamaShape()
    run = {"tokens_per_s": 1000.0, "peak_allocated_mib": 9000.0, "peak_reserved_mib": 9500.0, "load_s": 30.0,
           "steps": [{"loss": 10.4}]}  # fmt: skip
    peer = run | {"tokens_per_s": 800.0, "peak_allocated_mib": 12000.0}
    fits = {"ours": {"longest_fitting": 8192}, "theirs": {"longest_fitting": 4096}}
    summary = train.summarize({"ours": [run], "theirs": [peer]}, fits, shape, 64, {"datasheet_tflops": 989.0})
    assert summary["ratio_ours_over_theirs"]["tokens_per_s"] == pytest.approx(1.25)
    flops = 8 * (shape.matmul_params() + shape.lora_params(64))
    assert summary["median"]["ours"]["mfu_datasheet"] == pytest.approx(1000.0 * flops / 989e12)
    assert summary["median"]["ours"]["mfu_measured"] is None
    table = train.format_table(summary, args)
    assert "qlorakit" in table and "8192" in table and "1.25" in table


@no_cuda
def test_without_cuda_both_scripts_stop_with_status_2_and_write_nothing(bench, tmp_path, capsys):
    kernels, train = bench
    assert kernels.main(["--output", str(tmp_path / "k.json")]) == 2
    assert train.main(["--output", str(tmp_path / "t.json"), "--workdir", str(tmp_path / "work")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_train_arguments_are_checked(bench):
    _, train = bench
    with pytest.raises(SystemExit):
        train.parse_args(["--fit-lengths", "4096,2048"])
    with pytest.raises(SystemExit):
        train.parse_args(["--warmup", "8", "--steps", "8"])
    assert train.parse_args([]).fit_length_list == [2048, 3072, 4096, 6144, 8192]
