"""Paged AdamW: the same numbers as unpaged, with the resident paged state held under the budget."""

import pytest
import torch

from qlorakit.optim import AdamW, PagedStateStore
from tests.helpers.optim import (
    HYPER,
    SHAPES,
    clone_params,
    gradients,
    load_state,
    make_params,
    run_steps,
    save_state,
)

#: Page the two larger parameters; the 2,310-element one stays resident.
PAGE_MIN = 4096


def _budget(bits: int) -> int:
    """Room for the largest block only: 64,000 x 8 B (32-bit) or 64,000 x 2 B + absmax (8-bit), page-rounded."""
    return 512_000 if bits == 32 else 131_072


@pytest.mark.parametrize("bits", [32, 8])
def test_paged_equals_unpaged_after_50_steps_within_budget(bits):
    grads = gradients(SHAPES, 50)
    plain_p, paged_p = make_params(), make_params()
    plain = AdamW(plain_p, optim_bits=bits, **HYPER)
    paged = AdamW(paged_p, optim_bits=bits, paged=True, page_budget_bytes=_budget(bits), page_min_size=PAGE_MIN,
                  measure_pages=True, **HYPER)
    run_steps(plain, plain_p, grads)
    run_steps(paged, paged_p, grads)
    store = paged.store
    assert all(torch.equal(p, q) for p, q in zip(plain_p, paged_p, strict=True))
    assert store.total_bytes > store.budget_bytes  # the budget really is below the paged state
    assert 0 < store.peak_resident_bytes <= store.budget_bytes
    if store.backend.measured_bytes() is not None:  # the kernel's count (Linux): pages actually resident
        assert 0 < store.peak_measured_bytes <= store.budget_bytes
        assert store.backend.measured_bytes() <= store.budget_bytes
    assert store.page_ins == 2 * 50  # both paged blocks are paged in every step
    assert set(paged.state[paged_p[1]]) == {"step"}  # paged tensors live in the store only
    sd_plain, sd_paged = plain.state_dict()["state"], paged.state_dict()["state"]
    for index in range(3):
        assert sd_plain[index].keys() == sd_paged[index].keys()
        assert all(torch.equal(sd_plain[index][k], sd_paged[index][k]) for k in sd_plain[index])


def test_mru_eviction_keeps_all_but_one_fitting_block_resident_across_steps():
    shapes = [(64, 256)] * 4  # four blocks of 64 KiB fp32 x 2 = 131,072 bytes each
    params = make_params(shapes)
    opt = AdamW(params, paged=True, page_budget_bytes=3 * 131_072, page_min_size=PAGE_MIN, **HYPER)
    run_steps(opt, params, gradients(shapes, 1))
    assert opt.store.page_ins == 4
    run_steps(opt, params, gradients(shapes, 5))
    # MRU with room for 3 of 4 blocks: misses per step cycle 1, 1, 2 (LRU would miss all 4 every step)
    assert opt.store.page_ins == 4 + (1 + 1 + 2 + 1 + 1)
    assert opt.store.peak_resident_bytes == 3 * 131_072


@pytest.mark.parametrize("bits", [32, 8])
def test_paged_state_round_trips_through_safetensors_between_paged_and_unpaged(tmp_path, bits):
    grads = gradients(SHAPES, 20)
    straight_p, moved_p = make_params(), make_params()
    straight = AdamW(straight_p, optim_bits=bits, **HYPER)
    run_steps(straight, straight_p, grads)
    first = AdamW(moved_p, optim_bits=bits, paged=True, page_min_size=PAGE_MIN, **HYPER)
    run_steps(first, moved_p, grads[:7])
    save_state(first, tmp_path / "a.safetensors")
    second = AdamW(moved_p, optim_bits=bits, **HYPER)  # paged -> unpaged
    second.load_state_dict(load_state(tmp_path / "a.safetensors"))
    run_steps(second, moved_p, grads[7:14])
    save_state(second, tmp_path / "b.safetensors")
    third = AdamW(moved_p, optim_bits=bits, paged=True, page_min_size=PAGE_MIN, **HYPER)  # unpaged -> paged
    third.load_state_dict(load_state(tmp_path / "b.safetensors"))
    run_steps(third, moved_p, grads[14:])
    assert all(torch.equal(p, q) for p, q in zip(straight_p, moved_p, strict=True))


def test_default_budget_is_twice_the_largest_paged_block():
    params = make_params()
    opt = AdamW(params, paged=True, page_min_size=PAGE_MIN, **HYPER)
    assert opt.store.budget_bytes == 2 * 512_000


def test_store_pages_a_block_out_of_the_process_after_eviction():
    store = PagedStateStore("cpu", budget_bytes=1 << 20)
    layout = {"a": ((1 << 18,), torch.float32)}  # exactly 1 MiB
    store.allocate(0, layout)
    store.allocate(1, layout)
    store.acquire(0)["a"].fill_(3.0)
    store.release(0)
    measured = store.backend.measured_bytes()
    if measured is None:
        pytest.skip("no /proc/self/pagemap")
    assert measured == 1 << 20
    store.acquire(1)["a"].fill_(5.0)  # evicts block 0: its pages leave the process, its contents stay
    assert store.backend.measured_bytes() == 1 << 20
    store.release(1)
    assert torch.equal(store.read(0)["a"], torch.full((1 << 18,), 3.0))  # paged back in, block 1 out
    assert store.backend.measured_bytes() == 1 << 20 and store.peak_resident_bytes == 1 << 20


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [32, 8])
def test_cuda_paged_equals_unpaged_with_prefetch_within_budget(bits):
    shapes = [(33, 70), (300, 77), (64, 1000), (128, 700), (90, 333)]
    grads = [[g.cuda() for g in step] for step in gradients(shapes, 20)]
    plain_p = [p.detach().cuda().requires_grad_() for p in make_params(shapes)]
    paged_p = clone_params(plain_p)
    plain = AdamW(plain_p, optim_bits=bits, **HYPER)
    paged = AdamW(paged_p, optim_bits=bits, paged=True, page_min_size=PAGE_MIN, **HYPER)
    run_steps(plain, plain_p, grads)
    run_steps(paged, paged_p, grads)
    torch.cuda.synchronize()
    assert all(torch.equal(p, q) for p, q in zip(plain_p, paged_p, strict=True))
    assert 0 < paged.store.peak_resident_bytes <= paged.store.budget_bytes < paged.store.total_bytes
    sd_plain, sd_paged = plain.state_dict()["state"], paged.state_dict()["state"]
    for index in sd_plain:
        assert all(torch.equal(sd_plain[index][k].cpu(), sd_paged[index][k].cpu()) for k in sd_plain[index])
