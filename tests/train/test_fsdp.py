"""FSDP2 with the 4-bit base sharded, on CPU with gloo: 2 ranks x batch b train exactly as 1 process x batch 2b.

One job of 2 spawned ranks runs the FSDP scenarios (``parallel.fsdp``); the 1-process references run in the test
process. Tolerances are the DDP tests' (tests/train/test_distributed.py): rtol 1e-5 on losses and gradient
norms; the adapters also atol 1e-5 (AdamW divides by sqrt(v): the fp32 rounding of a near-zero gradient entry
shows at the scale of lr). "paged" uses the reference loss (``loss_chunk_tokens`` 0) on both sides, "accum8bit"
the chunked head (16 target rows at a time; under FSDP a forward of the root module).

With 8-bit state one more effect of the fp32 order shows: a moment that lies at a rounding edge of the 8-bit map
gets the neighbouring code (observed: 5 to 31 codes of 261,120, never more than one code apart), and that
element's next update moves by a fraction of lr (observed here: none beyond rtol/atol 1e-5; with r 64, 2 of
131,072 adapter elements, at most 3.6e-5). ``assert_adapters_close`` allows such elements: at most 1 in 10,000
beyond rtol/atol 1e-5, none beyond 1e-3 (0.1 lr); a block mapped to the wrong shard would move whole 256-element
blocks by about lr. A block's absmax is one moment entry, and an entry whose gradient sums terms that cancel
carries more fp32-order error than rtol 1e-5 (observed: 2 of 34 blocks of one tensor at 2.5e-5 in exp_avg and
5e-5 in exp_avg_sq, which squares it), so the scales are held to ``ABSMAX_RTOL`` 1e-4 and the codes to at most 1 in
1,000 moved by one; a wrong block would differ by O(1) in its scale and move most of its 256 codes. A block
whose entries all nearly cancel has a scale far below the others', and its error is relative to the terms, not
to itself. A whole tensor can be such (observed on an AVX2-only CPU: an exp_avg whose largest scale is 5.1e-6,
one scale of 4.2e-6 moved by 6.6e-9 = 1.6e-3 of itself), so the scales also get ``ABSMAX_RTOL`` of the largest
scale of that moment over all tensors as an absolute tolerance; the codes still catch a wrong block there.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlorakit.cli.main import main
from qlorakit.data import build_datasets, collate_fn
from qlorakit.train import train
from tests.helpers.distributed import (
    Scenario,
    assert_close_rows,
    copy_until,
    final_adapter,
    free_port,
    metric_rows,
    read_report,
    run_ranks,
    small_oasst_file,
)
from tests.helpers.tiny_llama import save_tiny_llama
from tests.helpers.train import run_config, tiny_qlora_model

RTOL = 1e-5
ABSMAX_RTOL = 1e-4  # 8-bit scales: one moment entry each (docstring)
ATOL = 1e-5  # as tests/train/test_distributed.py: 1e-3 of one AdamW update at lr 1e-2
#: scenario -> (grad_accum, optimizer, lora r, loss_chunk_tokens); 3 steps each. 10 train examples in micro-batches
#: of 4: every epoch ends with a micro-batch of 2, all of it on rank 0 (rank 1's share is empty: it runs the
#: collectives with weight 0). "paged" (the default optimizer) pages every shard's state (PAGED_MIN: all r 4
#: shards have 64-128 elements), within the default budget of two blocks, so blocks are paged out and in every
#: step. r 68 makes most adapters 4352-8704 elements: at least bitsandbytes' min_8bit_size, so "accum8bit" keeps
#: 8-bit state for them. The 8-bit rule of parallel.fsdp: gate/up lora_B (128 x 68) and down lora_A (68 x 128)
#: shard on whole 256-element blocks (4352 = 17 x 256 per rank); the other nine per block (2176 per rank) break it
#: and are kept whole on every rank. k/v lora_B (32 x 68, 2176) keep 32-bit state and are sharded.
KEPT_WHOLE = 18
SCENARIOS = {"paged": (1, "paged_adamw", 4, 0), "accum8bit": (2, "adamw8bit", 68, 16)}  # ..., loss_chunk_tokens
RESUMED = "accum8bit"  # saves at step 2; resumed 1 -> 2 and 2 -> 1 ranks, FSDP -> DDP and DDP -> FSDP
PAGED_MIN = 64  # page_min_size for "paged" (the default 16384 is above every tiny shard)
PAGED_PATCH = (("qlorakit.optim.adamw", "PAGE_MIN_SIZE", PAGED_MIN),)


def _cfg(data: Path, out: Path, grad_accum: int, optim: str, r: int, chunk: int, distributed: str = "auto"):
    cfg = run_config(data, out, batch_size=4, grad_accum=grad_accum, optim=optim, max_steps=3, save_steps=2,
                     save_total_limit=0, loss_chunk_tokens=chunk)
    return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, r=r, dropout=0.0),
                               parallel=dataclasses.replace(cfg.parallel, dist_timeout_s=60, distributed=distributed))


def _fsdp(cfg, out: Path, distributed: str = "fsdp"):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(out)),
                               parallel=dataclasses.replace(cfg.parallel, distributed=distributed))


def _one_process(cfg, sets, vocab, resume: Path | None = None):
    train_set, val_set, collate = sets
    model = tiny_qlora_model(vocab, cfg.lora, seed=0)
    train(model, train_set, val_set, collate, cfg, Path(cfg.train.output_dir), resume, progress=False)
    return model


@pytest.fixture(scope="module")
def job(smol_tokenizer, shared_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data = small_oasst_file(shared_dir, root / "small.jsonl")
    cfgs = {name: _cfg(data, root / f"{name}-1", *spec) for name, spec in SCENARIOS.items()}
    train_set, val_set, _ = build_datasets(cfgs["paged"].data, smol_tokenizer)
    sets, vocab = (train_set, val_set, collate_fn(smol_tokenizer)), len(smol_tokenizer)
    for name, cfg in cfgs.items():
        with pytest.MonkeyPatch.context() as patch:
            for module, attribute, value in PAGED_PATCH if name == "paged" else ():
                patch.setattr(f"{module}.{attribute}", value)
            _one_process(cfg, sets, vocab)
    scenarios = [Scenario(name, _fsdp(cfg, root / f"{name}-2"), patches=PAGED_PATCH if name == "paged" else ())
                 for name, cfg in cfgs.items()]
    resumed_12 = copy_until(root / f"{RESUMED}-1", root / "resume-1to2", 2)
    scenarios.append(Scenario("resume-1to2", _fsdp(cfgs[RESUMED], resumed_12.parent), resume_from=str(resumed_12)))
    scenarios += [  # across strategies: the DDP run first, then each resumes the other's checkpoint-2
        Scenario("ddp", _fsdp(cfgs[RESUMED], root / f"{RESUMED}-ddp", "ddp")),
        Scenario("ddp-to-fsdp", _fsdp(cfgs[RESUMED], root / "ddp-to-fsdp"),
                 copy_from=(str(root / f"{RESUMED}-ddp"), 2)),
        Scenario("fsdp-to-ddp", _fsdp(cfgs[RESUMED], root / "fsdp-to-ddp", "ddp"),
                 copy_from=(str(root / f"{RESUMED}-2"), 2)),
    ]
    model_dir = save_tiny_llama(root / "tiny", smol_tokenizer, vocab_size=vocab, tie_word_embeddings=True)
    assert main(_cli_args(model_dir, data, root / "cli-1")) == 0
    scenarios.append(Scenario("cli", cfgs["paged"], cli_args=_cli_args(model_dir, data, root / "cli-2")
                              + ["--distributed", "fsdp"]))
    out = root / "reports"
    out.mkdir()
    codes = run_ranks(2, (scenarios, train_set, val_set, sets[2], vocab, str(out)), timeout_s=300)
    assert codes == [0, 0], codes
    for s in scenarios:
        for rank in (0, 1):
            assert read_report(out, s.name, rank)["ok"], read_report(out, s.name, rank)
    resumed_21 = copy_until(root / f"{RESUMED}-2", root / "resume-2to1", 2)
    cfg_21 = dataclasses.replace(cfgs[RESUMED], train=dataclasses.replace(cfgs[RESUMED].train,
                                                                           output_dir=str(resumed_21.parent)))
    _one_process(cfg_21, sets, vocab, resume=resumed_21)
    return root, out, vocab


def _cli_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--batch-size", "4",
            "--grad-accum", "1", "--lora-r", "4", "--lora-dropout", "0", "--val-size", "4", "--compute-dtype",
            "float32", "--no-progress", "--source-max-len", "64", "--target-max-len", "32", "--lr", "1e-2",
            "--no-gradient-checkpointing", "--max-steps", "2", "--dist-timeout-s", "60", "--loss-chunk-tokens", "0"]


def assert_adapters_close(got: dict, want: dict, eight_bit: bool) -> None:
    """rtol/atol 1e-5 per element; with 8-bit state up to 1 element in 10,000 beyond, within 1e-3 (docstring)."""
    assert got.keys() == want.keys()
    beyond, total = 0, 0
    for key in want:
        if not eight_bit:
            torch.testing.assert_close(got[key], want[key], rtol=RTOL, atol=ATOL)
            continue
        torch.testing.assert_close(got[key], want[key], rtol=0.0, atol=1e-3)
        beyond += int(((got[key] - want[key]).abs() > ATOL + RTOL * want[key].abs()).sum())
        total += want[key].numel()
    assert beyond <= total // 10_000, (beyond, total)


#: equality runs: name -> (the 1-process run, the 2-rank run, whether it keeps 8-bit state)
EQUAL = {name: (f"{name}-1", f"{name}-2", optim.endswith("8bit")) for name, (_, optim, *_) in SCENARIOS.items()}
EQUAL["ddp"] = (f"{RESUMED}-1", f"{RESUMED}-ddp", True)  # the DDP side of the cross-strategy resumes, 8-bit too


@pytest.mark.parametrize("name", list(EQUAL))
def test_fsdp_on_two_ranks_gives_the_losses_grad_norms_and_adapter_of_one_process(job, name):
    root, out, _ = job
    one, two, eight_bit = (root / EQUAL[name][0], root / EQUAL[name][1], EQUAL[name][2])
    for key in ("loss", "grad_norm", "eval_loss"):
        assert_close_rows(metric_rows(two, key), metric_rows(one, key), RTOL)
    a, b = final_adapter(one), final_adapter(two)
    assert len(a) == 28
    assert_adapters_close(b, a, eight_bit)
    assert max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k) > 1e-3  # the adapters did move
    r0, r1 = load_file(str(out / f"{name}.rank0.safetensors")), load_file(str(out / f"{name}.rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # gathered whole on each rank: one adapter
    if name in ("accum8bit", "paged"):  # FSDP: the parameters the 8-bit rule kept whole
        assert read_report(out, name, 0)["kept_whole"] == (KEPT_WHOLE if name == "accum8bit" else 0)
    after = load_file(str(out / f"{name}.adapter" / "adapter_model.safetensors"))  # saved after train() returned
    assert after.keys() == b.keys() and all(torch.equal(after[k], b[k]) for k in b)  # = the last checkpoint's


def test_paged_adamw_pages_the_fsdp_shards():
    """The "paged" scenario's smallest shards (r 4: lora_A (2, 64), k/v lora_B (16, 4)) are paged under the patch."""
    from qlorakit.optim import make_optimizer

    def paged() -> list[bool]:
        shards = [torch.zeros(2, 64, requires_grad=True), torch.zeros(16, 4, requires_grad=True)]
        opt = make_optimizer("paged_adamw", shards, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        return [opt._is_paged(p) for p in shards]

    assert paged() == [False, False]  # the default page_min_size
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(f"{PAGED_PATCH[0][0]}.{PAGED_PATCH[0][1]}", PAGED_MIN)
        assert paged() == [True, True]


def _optimizer_state(run_dir: Path, step: int) -> dict:
    return load_file(str(run_dir / f"checkpoint-{step}" / "optimizer.safetensors"))


def test_fsdp_8bit_state_is_blockwise_on_the_shards_and_consolidates_to_the_one_process_state(job):
    root, _, _ = job
    for two in (f"{RESUMED}-2", f"{RESUMED}-ddp"):
        one, got = _optimizer_state(root / f"{RESUMED}-1", 3), _optimizer_state(root / two, 3)
        assert got.keys() == one.keys()
        codes = [k for k in one if k.endswith("exp_avg_codes")]
        assert len(codes) == 24  # all but the four 2176-element lora_B of k/v keep 8-bit state
        flipped = 0
        largest = {kind: max(float(one[k].abs().max()) for k in one if k.endswith(kind))
                   for kind in (".exp_avg_absmax", ".exp_avg_sq_absmax")}  # fmt: skip
        for key in one:
            assert got[key].dtype == one[key].dtype and got[key].shape == one[key].shape, key
            if key.endswith("_codes"):  # uint8: a code may move by one where fp32 reduction order crossed a bin edge
                differ = (got[key].int() - one[key].int()).abs()
                assert int(differ.max()) <= 1, key
                flipped += int(differ.sum())
            elif key.endswith("_absmax"):  # one scale per 256-element block: the shards' blocks are the whole's
                torch.testing.assert_close(got[key], one[key], rtol=ABSMAX_RTOL,
                                           atol=ABSMAX_RTOL * largest["." + key.rsplit(".", 1)[-1]],
                                           msg=lambda m, key=key: f"{key}: {m}")
            else:  # step, and the 32-bit moments of the small parameters (near-zero entries: atol at their scale)
                torch.testing.assert_close(got[key], one[key], rtol=RTOL, atol=RTOL * float(one[key].abs().max()))
        assert flipped <= sum(one[k].numel() for k in one if k.endswith("_codes")) // 1_000


@pytest.mark.parametrize("resumed", ["resume-1to2", "resume-2to1", "ddp-to-fsdp", "fsdp-to-ddp"])
def test_fsdp_resume_across_world_sizes_and_strategies_continues_the_uninterrupted_losses(job, resumed):
    root, _, _ = job
    want = metric_rows(root / f"{RESUMED}-1", "loss")
    got = metric_rows(root / resumed, "loss")
    assert [s for s, _ in got] == [1, 2, 3]
    assert_close_rows(got, want, RTOL)
    assert_adapters_close(final_adapter(root / resumed), final_adapter(root / f"{RESUMED}-1"), eight_bit=True)


def test_the_fsdp_adapter_loads_in_peft_with_the_same_logits(job):
    peft = pytest.importorskip("peft")
    from qlorakit.config import LoraConfig
    from qlorakit.lora import lora_layers
    from qlorakit.lora.peft_io import load_adapter

    root, _, vocab = job
    last = max((p for p in (root / "paged-2").iterdir() if p.name.startswith("checkpoint-")),
               key=lambda p: int(p.name[11:]))
    ours = tiny_qlora_model(vocab, LoraConfig(r=4, dropout=0.0), seed=0)
    load_adapter(ours, last / "adapter", name="default", replace=True)
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours.eval()(input_ids=ids, use_cache=False).logits
    import transformers

    from tests.helpers.tiny_llama import tiny_llama_config

    reference = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=vocab, tie_word_embeddings=True))
    reference.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" not in k and "weight." not in k},
                              strict=False)
    with torch.no_grad():
        for path, layer in lora_layers(ours).items():
            reference.get_submodule(path).weight.copy_(layer.base_layer.dequantize(torch.float32))
    theirs = peft.PeftModel.from_pretrained(reference, last / "adapter").eval()
    with torch.no_grad():
        got = theirs(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_qlorakit_train_with_distributed_fsdp_writes_the_run_of_one_process(job):
    root, out, _ = job
    one, two = root / "cli-1", root / "cli-2"
    assert_close_rows(metric_rows(two, "loss"), metric_rows(one, "loss"), RTOL)
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()}  # adapter, plot, config, checkpoint
    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL)


# --- the sharded 4-bit storage ---------------------------------------------------------------------------------

def _storage_rank(rank: int, world: int, port: int, vocab: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from qlorakit.config import LoraConfig
    from qlorakit.parallel import fsdp
    from qlorakit.quant.linear import Linear4bit

    dist.init_process_group("gloo")
    report: dict = {}
    try:
        model = tiny_qlora_model(vocab, LoraConfig(r=4, dropout=0.0), seed=0)
        whole = {n: m.qweight for n, m in model.named_modules() if isinstance(m, Linear4bit)}
        ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = model(input_ids=ids).logits
        trainable = [p for p in model.parameters() if p.requires_grad]
        run = fsdp.shard_for_training(model, trainable, world, rank, torch.float32)
        layers = {n: model.get_submodule(n) for n in whole}
        report["local_bytes"] = sum(m.packed_rows.to_local().numel() for m in layers.values())
        report["stored_bytes"], report["packed_bytes"] = fsdp.padding_bytes(list(layers.values()))
        report["whole_bytes"] = sum(q.packed.numel() for q in whole.values())
        report["sharded_is_dtensor"] = all(type(m.packed_rows).__name__ == "DTensor" for m in layers.values())
        try:
            _ = next(iter(layers.values())).qweight
            report["sharded_refused"] = False
        except RuntimeError:
            report["sharded_refused"] = True
        with run.unsharded():
            report["bit_identical"] = all(
                layers[n].qweight.packed.dtype == torch.uint8 and torch.equal(layers[n].qweight.packed, q.packed)
                and layers[n].qweight.absmax.dtype == q.absmax.dtype and torch.equal(layers[n].qweight.absmax, q.absmax)
                and torch.equal(layers[n].qweight.nested.absmax, q.nested.absmax) for n, q in whole.items())
        with torch.no_grad():
            report["same_logits"] = bool(torch.equal(model(input_ids=ids).logits, want))
        report["ok"] = True
    except Exception as exc:  # the test reads it
        report.update(ok=False, error=repr(exc))
    Path(out, f"storage.rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_each_rank_holds_half_the_packed_bytes_and_the_gathered_weight_is_bit_identical(smol_tokenizer, tmp_path):
    vocab, port = len(smol_tokenizer), free_port()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_storage_rank, args=(r, 2, port, vocab, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    reports = [json.loads((tmp_path / f"storage.rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["ok"], report
        assert report["bit_identical"] and report["same_logits"] and report["sharded_is_dtensor"]
        assert report["sharded_refused"]  # outside a forward the weight is sharded: qweight refuses
        assert report["packed_bytes"] == report["whole_bytes"]
        assert report["local_bytes"] * 2 == report["stored_bytes"]  # exactly half of what is stored ...
    print(reports[0])
