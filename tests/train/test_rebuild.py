"""rebuild_adapter_inputs: LoRA A's inputs rebuilt in backward give bit-identical losses and gradients.

Tolerance: none (``torch.equal``). The recipes are the functions the forwards run (``rmsnorm.normalize``,
``recompute.silu_mul_value``), so the rebuilt tensors, and everything computed from them, match exactly.
The reference is the same model and rewrites with ``memory.rebuild_adapter_inputs: false``.
"""

from __future__ import annotations

import pytest
import torch

from qlorakit.config import DataConfig, LoraConfig, MemoryConfig, RunConfig
from qlorakit.lora.model import lora_layers
from qlorakit.train import rebuild, rewrites
from tests.helpers.train import tiny_qlora_model

VOCAB = 96


def _loss_and_grads(model, ids: torch.Tensor, cfg: RunConfig, seed: int = 5, **inputs):
    model.zero_grad(set_to_none=True)
    model.train()
    with rewrites.apply(model, cfg) as applied:
        torch.manual_seed(seed)  # the same dropout masks in both runs
        loss = model(input_ids=ids, labels=ids, **inputs).loss
        loss.backward()
        record = next(r for r in applied.records if r["name"] == "rebuild_adapter_inputs")
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, record


def _cfg(rebuilt: bool, checkpointing: bool = False, packing: bool = False) -> RunConfig:
    memory = MemoryConfig(gradient_checkpointing=checkpointing, rebuild_adapter_inputs=rebuilt,
                          malloc_mmap_threshold_kib=0)
    return RunConfig(model="tiny", lora=LoraConfig(r=4, alpha=8, dropout=0.3), memory=memory,
                     data=DataConfig(packing=packing))


@pytest.fixture
def model():
    model = tiny_qlora_model(VOCAB, LoraConfig(r=4, alpha=8, dropout=0.3))
    with torch.no_grad():  # B != 0, so every adapter (and so every gradient path) is live
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(std=0.2)
    return model


def _record_rebuilds(monkeypatch) -> list:
    """A list that gets, per saved tensor unpacked in backward, the rebuilding function's name (False: kept)."""
    rebuilt = []
    unpack = rebuild._unpack
    monkeypatch.setattr(rebuild, "_unpack",
                        lambda p: rebuilt.append(isinstance(p, rebuild._Recipe) and p.fn.__name__) or unpack(p))
    return rebuilt


def test_rebuilt_adapter_inputs_give_bit_identical_loss_and_lora_gradients(model, monkeypatch):
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    loss_ref, grads_ref, record_ref = _loss_and_grads(model, ids, _cfg(False))
    rebuilt = _record_rebuilds(monkeypatch)
    loss, grads, record = _loss_and_grads(model, ids, _cfg(True))
    assert record_ref["applied"] == "off" and record["applied"] == "2 blocks"
    names = [n for n in rebuilt if n]  # per block: both norm outputs and the SwiGLU product, once per saver
    assert names.count("silu_mul_value") == 2 and names.count("normalize") >= 2 * 2 and len(set(names)) == 2
    assert torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 7 * 2
    assert all(torch.equal(grads[k], grads_ref[k]) for k in grads)
    assert all(float(g.abs().max()) > 0 for g in grads.values())
    assert all("forward" not in vars(layer) for layer in rebuild.decoder_layers(model))  # undone on exit


def test_rebuild_is_off_under_checkpointing_and_rebuilds_the_views_dropout_free_adapters_keep(monkeypatch):
    model = tiny_qlora_model(VOCAB, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(std=0.2)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    _, _, record = _loss_and_grads(model, ids, _cfg(True, checkpointing=True))
    assert record["applied"] == "off (checkpointing on)"
    loss_ref, grads_ref, _ = _loss_and_grads(model, ids, _cfg(False))
    rebuilt = _record_rebuilds(monkeypatch)
    loss, grads, _ = _loss_and_grads(model, ids, _cfg(True))
    names = [n for n in rebuilt if n]  # no dropout: the A matmul saves a 2-D view of its input, rebuilt as that view
    assert names.count("silu_mul_value") == 2 and names.count("normalize") >= 2 * 2 and len(set(names)) == 2
    assert torch.equal(loss, loss_ref) and all(torch.equal(grads[k], grads_ref[k]) for k in grads_ref)


def test_trim_blocks_trims_before_each_block_forward_with_a_graph_only(model, monkeypatch):
    from qlorakit.train import allocator

    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    loss_ref, grads_ref, _ = _loss_and_grads(model, ids, _cfg(True))
    calls = []
    monkeypatch.setattr(allocator, "trim_heap", lambda: calls.append(1) or True)
    cfg = _cfg(True)
    cfg = RunConfig(model="tiny", lora=cfg.lora, memory=MemoryConfig(
        gradient_checkpointing=False, malloc_mmap_threshold_kib=0, malloc_trim_blocks=True))
    loss, grads, record = _loss_and_grads(model, ids, cfg)
    assert record["applied"] == "2 blocks, heap trimmed before each" and len(calls) == 2
    assert torch.equal(loss, loss_ref) and all(torch.equal(grads[k], grads_ref[k]) for k in grads_ref)
    with rewrites.apply(model, cfg), torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == 2  # no graph, no trim (evaluation)


@pytest.mark.parametrize("fp32_norms", [False, True])
def test_bf16_compute_rebuilds_the_swiglu_product_and_the_loaders_norm_outputs_bit_identically(monkeypatch, fp32_norms):
    """bf16 base, fp32 adapters: the lean dropout keeps down_proj's input uncast, so the SwiGLU product is the saved
    tensor itself and is rebuilt. With fp32 norms hooked to return bf16 (as ``models.loader`` builds a bf16 model)
    the fused 16-bit RMSNorm offers its outputs too; bf16 norm weights keep the module's forward, outputs kept."""
    import transformers

    from qlorakit.lora import add_lora
    from qlorakit.models import quantize_model
    from qlorakit.models.build import keep_norm_outputs_in_input_dtype
    from qlorakit.train.rmsnorm import rmsnorms
    from tests.helpers.tiny_llama import tiny_llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, tie_word_embeddings=True))
    model.to(torch.bfloat16)
    if fp32_norms:
        for norm in rmsnorms(model):
            norm.float()
        keep_norm_outputs_in_input_dtype(model)
    quantize_model(model, compute_dtype=torch.bfloat16)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.3))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(std=0.2)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    loss_ref, grads_ref, _ = _loss_and_grads(model, ids, _cfg(False))
    rebuilt = _record_rebuilds(monkeypatch)
    loss, grads, _ = _loss_and_grads(model, ids, _cfg(True))
    per_block = ["normalize_16bit", "normalize_16bit", "silu_mul_value"] if fp32_norms else ["silu_mul_value"]
    assert sorted(n for n in rebuilt if n) == sorted(per_block * 2)  # q/k/v's and gate/up's inputs, down_proj's
    assert torch.equal(loss, loss_ref) and all(torch.equal(grads[k], grads_ref[k]) for k in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_rebuild_the_attention_output_from_what_sdpa_keeps_bit_identically(monkeypatch, dtype):
    """With packing (train.varlen) o_proj's adapter input, a copy of the kernels' kept outputs, is offered: each
    block rebuilds it (``stitch``) once, for rows of several spans and for a batch of one span each, and the loss
    and every LoRA gradient stay bit-identical; the rebuilt tensor is the reshaped view o_proj got."""
    from qlorakit.train import varlen

    model = tiny_qlora_model(VOCAB, LoraConfig(r=4, alpha=8, dropout=0.3))
    model.to(dtype)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(std=0.2)
            for p in layer.lora_A["default"].parameters():
                p.data = p.data.float()
            layer.lora_B["default"].weight.data = layer.lora_B["default"].weight.data.float()
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    two_spans = torch.tensor([list(range(6)) + list(range(7)), list(range(13))])
    for positions, spans in ((two_spans, 3), (torch.arange(13).expand(2, 13), 1)):
        loss_ref, grads_ref, _ = _loss_and_grads(model, ids, _cfg(False, packing=True), position_ids=positions)
        rebuilt, shapes = _record_rebuilds(monkeypatch), []
        stitch = varlen.stitch
        def counted(rows, shapes=shapes, stitch=stitch):
            shapes.append(sum(map(len, rows)))
            return stitch(rows)

        monkeypatch.setattr(varlen, "stitch", counted)
        loss, grads, _ = _loss_and_grads(model, ids, _cfg(True, packing=True), position_ids=positions)
        assert [n for n in rebuilt if n].count("counted") == 2 and shapes == [spans, spans]  # one per block
        assert torch.equal(loss, loss_ref) and all(torch.equal(grads[k], grads_ref[k]) for k in grads)
        monkeypatch.undo()


@pytest.mark.parametrize("blocks", [0, 1])
def test_checkpointed_blocks_with_packed_rows_run_attention_once_in_forward_and_once_in_recompute(monkeypatch,
                                                                                                  blocks):
    """A block that checkpointing recomputes has no rebuild scope, so train.varlen must not read SDPA's saved
    output there: reading a saved tensor back inside a checkpointed forward makes checkpoint recompute the block
    at once (more attention calls, and the recomputed tensors held until backward: a 1,275 MiB fp32 run peaked
    at 2,043). Counted: each checkpointed block's attention runs twice a step, each other block's once."""
    from qlorakit.train import varlen

    model = tiny_qlora_model(VOCAB, LoraConfig(r=4, alpha=8, dropout=0.3))
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([list(range(6)) + list(range(7)), list(range(13))])
    calls = []
    forward = varlen.varlen_sdpa_forward
    monkeypatch.setattr(varlen, "varlen_sdpa_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    cfg = _cfg(True, checkpointing=True, packing=True)
    memory = MemoryConfig(gradient_checkpointing=True, checkpoint_blocks=blocks, malloc_mmap_threshold_kib=0)
    cfg = RunConfig(model="tiny", lora=cfg.lora, data=cfg.data, memory=memory)
    loss_ref, grads_ref, _ = _loss_and_grads(model, ids, _cfg(True, packing=True), position_ids=positions)
    calls.clear()
    loss, grads, record = _loss_and_grads(model, ids, cfg, position_ids=positions)
    checkpointed = 2 if blocks == 0 else blocks
    assert len(calls) == 2 * checkpointed + (2 - checkpointed)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    assert all(torch.allclose(grads[k], grads_ref[k], rtol=1e-5, atol=1e-7) for k in grads)
