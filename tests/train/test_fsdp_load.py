"""``--fsdp-load stream|broadcast``: each rank loads only its own rows of the 4-bit base, bit for bit the rows that
loading the whole model and sharding it keeps (``parallel.fsdp_load``), on 2 gloo ranks started here.

The tiny Llama on disk has ``intermediate_size`` 67: with double quantization every weight is padded to 512 rows
(2 ranks x 256-block groups); without it, at block size 256, its MLP weights are 16.75 blocks (a partial last
block, and an odd count padded to 18 rows).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from qlorakit.config import LoraConfig, ParallelConfig, QuantConfig, RunConfig
from qlorakit.errors import ConfigError
from tests.helpers.distributed import free_port
from tests.helpers.tiny_llama import save_tiny_llama

CASES = {"dq-64": (True, 64), "plain-256": (False, 256)}  # (double quant, blocksize)
MODES = ("stream", "broadcast")


def _cfg(model_dir: str, double_quant: bool, blocksize: int, mode: str) -> RunConfig:
    return RunConfig(model=model_dir, quant=QuantConfig(double_quant=double_quant, blocksize=blocksize),
                     lora=LoraConfig(r=4, dropout=0.0), parallel=ParallelConfig(distributed="fsdp", fsdp_load=mode))


def _rows(model, names) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from qlorakit.parallel.fsdp import local

    return {n: (local(model.get_submodule(n).packed_rows).clone(), local(model.get_submodule(n).absmax_rows).clone())
            for n in names}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(x.dtype == y.dtype and torch.equal(x, y) for k in a for x, y in zip(a[k], b[k],
                                                                                                            strict=True))


@contextlib.contextmanager
def _no_quantizing(active: bool):
    """``models.fill.quantize_chunked`` raising while ``active``."""
    from qlorakit.models import fill

    def refuse(*_args, **_kw):
        raise AssertionError("rank 1 quantized a weight under --fsdp-load broadcast")

    kept = fill.quantize_chunked
    fill.quantize_chunked = refuse if active else kept
    try:
        yield
    finally:
        fill.quantize_chunked = kept


def _case(rank: int, model_dir: str, double_quant: bool, blocksize: int, dist_info) -> dict:
    from qlorakit.cli.train_cmd import load_for_run
    from qlorakit.parallel import fsdp
    from qlorakit.parallel.fsdp_load import gathering
    from qlorakit.quant.linear import Linear4bit

    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    whole = load_for_run(_cfg(model_dir, double_quant, blocksize, "whole"), "fsdp", dist_info, torch.float32)
    names = [n for n, m in whole.named_modules() if isinstance(m, Linear4bit)]
    weights = {n: whole.get_submodule(n).qweight for n in names}
    with torch.no_grad():
        want_logits = whole(input_ids=ids).logits
    fsdp.shard_for_training(whole, [p for p in whole.parameters() if p.requires_grad], 2, rank, torch.float32)
    want = _rows(whole, names)
    stored, packed = fsdp.padding_bytes([whole.get_submodule(n) for n in names])
    report: dict = {"padded": stored > packed}
    for mode in MODES:
        torch.manual_seed(0)
        with _no_quantizing(rank == 1 and mode == "broadcast"):  # a rank > 0 never quantizes (nor reads) a weight
            model = load_for_run(_cfg(model_dir, double_quant, blocksize, mode), "fsdp", dist_info, torch.float32)
        layers = [model.get_submodule(n) for n in names]
        got = {"loaded_sharded": all(m._preshard is not None for m in layers),
               "rows_before_fully_shard": _same(_rows(model, names), want)}
        try:
            _ = layers[0].qweight
            got["refused_outside_gathering"] = False
        except RuntimeError:
            got["refused_outside_gathering"] = True
        with gathering():
            got["gathered_whole"] = all(
                torch.equal(m.qweight.packed, weights[n].packed) and torch.equal(m.qweight.absmax, weights[n].absmax)
                and (not double_quant or torch.equal(m.qweight.nested.absmax, weights[n].nested.absmax))
                for n, m in zip(names, layers, strict=True))
        fsdp.shard_for_training(model, [p for p in model.parameters() if p.requires_grad], 2, rank, torch.float32)
        got["rows_after_fully_shard"] = _same(_rows(model, names), want)
        got["dtensor"] = all(type(m.packed_rows).__name__ == "DTensor" for m in layers)
        with torch.no_grad():
            got["same_logits"] = bool(torch.equal(model(input_ids=ids).logits, want_logits))
        report[mode] = got
    return report


def _rank0_fails(rank: int, model_dir: str, dist_info) -> str:
    """``broadcast`` with rank 0's quantizer failing: the error each rank raises."""
    from qlorakit.cli.train_cmd import load_for_run
    from qlorakit.errors import QuantizationError
    from qlorakit.models import fill

    def fail(*_args, **_kw):
        raise QuantizationError("a sabotaged weight")

    kept = fill.quantize_chunked
    fill.quantize_chunked = fail if rank == 0 else kept
    try:
        load_for_run(_cfg(model_dir, True, 64, "broadcast"), "fsdp", dist_info, torch.float32)
        return "no error"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        fill.quantize_chunked = kept


def _rank(rank: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from qlorakit.parallel import init_from_env, shutdown

    dist_info = init_from_env("fsdp", 60)
    reports: dict = {}
    try:
        for name, (double_quant, blocksize) in CASES.items():
            reports[name] = _case(rank, model_dir, double_quant, blocksize, dist_info)
        reports["rank0_fails"] = _rank0_fails(rank, model_dir, dist_info)
        reports["ok"] = True
    except Exception:  # the test reads it
        import traceback

        reports.update(ok=False, error=traceback.format_exc())
    Path(out, f"load.rank{rank}.json").write_text(json.dumps(reports))
    shutdown()


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-load")
    model_dir = save_tiny_llama(root / "tiny", intermediate_size=67, tie_word_embeddings=True)
    ctx, port = multiprocessing.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(model_dir), str(root))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        if p.is_alive():
            p.kill()
    out = [json.loads((root / f"load.rank{r}.json").read_text()) for r in range(2)]
    for report in out:
        assert report["ok"], report.get("error")
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_loads_the_rows_that_sharding_the_whole_model_keeps(reports, case, mode):
    for rank in (0, 1):
        got = reports[rank][case][mode]
        assert got == {"loaded_sharded": True, "rows_before_fully_shard": True, "refused_outside_gathering": True,
                       "gathered_whole": True, "rows_after_fully_shard": True, "dtensor": True,
                       "same_logits": True}, (rank, got)


def test_the_cases_include_a_layer_that_needs_padding(reports):
    assert reports[0]["dq-64"]["padded"] and reports[0]["plain-256"]["padded"]


def test_under_broadcast_a_rank_above_0_never_quantizes_a_weight(reports):
    assert all(reports[1][case]["broadcast"]["loaded_sharded"] for case in CASES)  # loaded with quantizing refused


def test_under_broadcast_an_error_on_rank_0_stops_the_other_ranks_with_it(reports):
    assert reports[0]["rank0_fails"].startswith("ModelLoadError: cannot quantize")
    assert reports[1]["rank0_fails"].startswith("DistributedError: rank 1: rank 0 failed to load the model")
    assert "a sabotaged weight" in reports[1]["rank0_fails"]


def test_a_bad_fsdp_load_value_is_refused_naming_the_field():
    from qlorakit.parallel import SINGLE
    from qlorakit.parallel.fsdp_load import load_hooks

    with pytest.raises(ConfigError, match=r"fsdp_load.*stream"):
        ParallelConfig(fsdp_load="scatter")
    with pytest.raises(ConfigError, match="--fsdp-load 'scatter'"):
        load_hooks("scatter", SINGLE)
    with pytest.raises(ConfigError, match="needs a process group"):
        load_hooks("stream", SINGLE)


def test_qlorakit_train_refuses_a_bad_fsdp_load_before_loading_anything(capsys):
    from qlorakit.cli.main import main

    assert main(["train", "--fsdp-load", "scatter", "--dry-run"]) == 2
    assert "fsdp_load" in capsys.readouterr().err
