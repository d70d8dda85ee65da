"""Measured constants of the CPU memory model (the GPU model uses none: it is arithmetic only).

Each value comes from one documented measurement on this project's reference machine (x86-64 Linux, glibc,
torch 2.13 CPU, transformers 5.23, Python 3.11, 1 thread). They describe the software stack, not the
model; re-measure them with the command given when the stack changes.
"""

#: Resident memory of a training process before any model-sized tensor exists: Python, torch,
#: transformers and qlorakit imported, plus what loading a model adds besides its tensors (lazily imported
#: transformers modules, the tokenizer libraries, mapped files). Measured as the RSS after
#: ``load_model`` of a 2-layer, width-64 random Llama minus that model's own tensors:
#: ``OMP_NUM_THREADS=1 python benchmarks/plan_accuracy.py --measure-framework`` -> 458 MiB.
CPU_FRAMEWORK_BYTES = 458 * 2**20

#: Simultaneous fp32 copies of the ``(batch, seq, vocab)`` logits at the start of backward with the
#: full-logits loss (``train.loss.reference_loss_sum``): the log-softmax output saved by cross-entropy, the
#: gradient of the NLL and the log-softmax gradient. A training loop on the tiny model above at seq 128 and
#: 512 grew by 3.4-3.9 copies (the remainder is its activations and adapters).
LOGITS_FP32_COPIES = 3

#: fp32 ``(chunk, vocab)`` blocks alive at once in the chunked head + cross-entropy
#: (``train.loss.chunked_loss_sum``): the chunk's logits (turned into its softmax in place) and the
#: temporary of ``logsumexp``; read from the code, not fitted.
CHUNK_FP32_COPIES = 2
#: One decoder block's backward temporaries, in ``(B, T, f)`` tensors at the compute dtype: the SwiGLU backward's
#: gradients of its product, gate and up and the recomputed ``silu(gate)`` (``train.recompute``). They meet the
#: peak only when they exceed the loss's (long sequences): SmolLM2, one 8,192-token row, fp32, the first 16 of 30
#: blocks recomputing, planned 4,084 MiB without this term and peaked at 4,207; with it the chooser picked 17
#: blocks, planned 4,014 and the run peaked at 4,044 (issue 14).
BLOCK_BACKWARD_MLP_COPIES = 4

#: Heap memory glibc keeps resident per quantized parameter when the trainer leaves glibc's mmap threshold
#: dynamic (``MemoryConfig.malloc_mmap_threshold_kib = 0``; the default fixes it and this term is not used).
#: glibc raises the threshold (up to 32 MiB) after freeing a large block, so the per-layer dequantize and
#: loss buffers come from the heap, which fragments between long-lived tensors and is not returned.
#: Calibrated on ONE case, ``llama-350m`` of ``benchmarks/plan_accuracy.py`` (seq 256, r 16, paged AdamW,
#: chunked loss; the run of commit ebfdedf, ``benchmarks/results/plan_accuracy_ebfdedf.json``): measured
#: median 2,516 MiB minus every other predicted term (1,065.5 MiB since the checkpoint save counts only
#: beyond the step's transients; it was 4.34 with the old 1,239), over its 308,281,344 quantized parameters.
#: It is not proportional in truth: the same runs imply 6.9 bytes for SmolLM2 and 3.5 for ``llama-700m``.
CPU_HEAP_RETENTION_PER_QPARAM = 4.93

#: ``(B, T, d)`` blocks per decoder layer by which glibc's main heap grows during the first training steps
#: when such a block is smaller than the trainer's fixed mmap threshold (1 MiB by default): the block's
#: activations and temporaries then come from the heap instead of their own ``mmap``, and the freed ones stay
#: resident (``mallinfo2`` shows the heap grown and mostly free after step 1; it does not grow in later steps).
#: Measured on a shape that is not a benchmark case, ``llama-heap`` of ``benchmarks/plan_accuracy.py``
#: (random Llama, d 512, 8 layers, ffn 1408, 8 heads; 256 tokens, r 16, paged AdamW, 3 steps, 1 MiB threshold
#: set before loading): ``OMP_NUM_THREADS=1 python benchmarks/plan_accuracy.py --measure-heap`` -> heap growth
#: over ``train`` / (layers x 512 KiB) = 21.8, 19.5, 18.8, 17.4, 22.8 in five runs (median 19.5) at commit
#: 99920e2, after the trainer stopped allocating several full-size temporaries per layer (SwiGLU recompute,
#: fused RMSNorm, in-place LoRA addmm, the reused dequantization buffer); the trainer of commit 71eb2a7 gave
#: 18.7, 26.1, 23.9, 22.7, 27.3 (median 23.9). Not a law: at 128 tokens the same shape gave 31 blocks (old
#: trainer), and at 512 tokens (1 MiB blocks, mmapped) 2.5.
CPU_SMALL_BLOCK_HEAP_ROWS = 19.5

#: Heap growth with glibc's dynamic mmap threshold and no gradient checkpointing, per byte of predicted
#: activations and per doubling of the micro-batches of a step: ``excess = K log2(M) activations``. The saved
#: activations of one micro-batch are freed into the heap after its backward; the next micro-batch's (packed
#: rows of other lengths) do not fit the holes exactly and the heap grows, micro-batch after micro-batch.
#: Measured on the README's ``qlorakit train --max-steps 1`` case (SmolLM2-135M, r 64, dropout 0.05, rows of
#: 1,280 packed tokens, batch 1, bf16 compute, fp32 adapters; saved_tensors_hooks give 1,603 MiB per
#: micro-batch, the planner 1,804): peak RSS 3,726 / 4,889 / 6,367 MiB after M = 2 / 6 / 16 micro-batches,
#: i.e. 0.53 / 1.18 / 2.00 activations above the other predicted parts (2,767 MiB); the fixed 1 MiB
#: threshold on the same run: 2,953 MiB at M = 6. excess / log2(M) = 0.53, 0.46, 0.50 activations:
#: K = 0.5 fitted on those three points (one case, in-sample; beyond M = 16 not measured).
CPU_HEAP_GROWTH_PER_LOG2_MICRO = 0.5

#: ``(B, T, d)`` blocks per decoder layer of glibc heap kept as holes by one forward without checkpointing under
#: the dynamic mmap threshold: the block's temporaries (norm outputs and the SwiGLU product once their adapters
#: have taken them, base outputs, RoPE intermediates) are freed between tensors kept for backward, and later
#: requests of other sizes do not fill them; ``mallinfo2`` after the forward showed 639 MiB free inside a 1,767 MiB
#: heap. Fitted IN-SAMPLE on one case: SmolLM2-135M, 2 x 512 tokens of the OASST1 sample (group-by-length), fp32,
#: r 16, dropout 0.05, 3 steps, ``qlorakit train`` defaults after the lean dropout and ``train.rebuild`` (commit
#: 7364934): peak RSS 2,560 MiB minus every other predicted part (1,582 MiB) = 978 MiB = 14.5 blocks per layer
#: (the heap probe of docs/memory.md; comparable to ``CPU_SMALL_BLOCK_HEAP_ROWS``, 19.5, the same effect under
#: a fixed threshold). Not validated on another shape.
CPU_DYNAMIC_HEAP_ROWS = 14.5

#: The same with ``memory.malloc_trim_blocks`` (``malloc_trim(0)`` before each block's forward returns the holes
#: as they form): peak 1,975 MiB on the case above, 393 MiB above the other parts = 5.8 blocks per layer
#: (in-sample, one case; below the per-parameter floor there, which wins), at 0.58-0.73 M minor page faults
#: and 1.7-1.9 s of system time a step (the freed pages are faulted in again) against 13-129 K and 0.06-0.35 s.
CPU_DYNAMIC_TRIMMED_HEAP_ROWS = 5.8

#: With qlorakit's caching arena (``train.arena``, ``MemoryConfig.arena``) the step's tensors come from its
#: segments, carved best fit; ``arena_slack`` is what best fit cannot place, as a fraction of the step's
#: transients (activations, logits, LoRA gradients). Measured on SmolLM2 at 2 x 512 tokens, bf16, 12 steps:
#: 1,244 MiB mapped for a live peak of 1,215 MiB (``benchmarks/step_heap.py``; docs/memory.md).
CPU_ARENA_SLACK_FRACTION = 0.05
#: With the arena, glibc's heap holds the small blocks: Python's objects, the tokenizer, the data, kernel caches.
#: Measured at the end of step 1 (``benchmarks/step_heap.py``, mallinfo2's heap): 237 MiB for SmolLM2 at 2 x 512
#: tokens in fp32, 243 MiB at 4 x 512 in bf16. In 16-bit it then grows by about 4 MiB a step (oneDNN and the
#: flash-attention kernel keep buffers per shape; docs/memory.md), which the plan does not count.
CPU_ARENA_HEAP_BYTES = 240 * 2**20

# --- step-time costs the budget chooser ranks by (``planner.choose``) --------------------------------------
# Each is the time a setting adds to a training step, as a fraction of the step with the fastest settings.
# The chooser only compares them (it never prints a time from them), so they need to be right in order and
# rough size, not exact. Measured on CPU (SmolLM2-135M, 2 x 512 tokens, r 16); a GPU run ranks by the same.

#: Every decoder block recomputed in backward: 165 against 120 tokens/s in fp32 (issue 14's table, checkpointing
#: off / on, the same allocator); ``k`` of ``L`` blocks cost ``k / L`` of it (each recomputes one block's forward).
CHECKPOINT_ALL_STEP_COST = 0.375
#: The allocator policies (``planner.choose.ALLOCATORS``) against the caching arena: CPU seconds per step of
#: ``benchmarks/allocator_policies.py`` (docs/memory.md: fixed 15.19 against dynamic 12.09, i.e. +0.26 on top of
#: dynamic; ``malloc_trim`` before each block 1.7-1.9 s of system time against 0.06-0.35 in a ~12 s step) and
#: ``benchmarks/step_heap.py`` (dynamic 0.17-0.34 s of system time a step against the arena's 0.01-0.08).
ALLOCATOR_STEP_COST = {"arena": 0.0, "dynamic": 0.03, "dynamic-trim-blocks": 0.16, "fixed": 0.29}
#: Paged AdamW against resident AdamW: +0.098 s per optimizer step of 50 M values with 3/4 of the state paged
#: (``benchmarks/optim_paging.py``: 0.376 against 0.277 s), i.e. about 0.01 s for SmolLM2's 4.9 M adapter values
#: on a ~6 s step (0.002), rounded up to cover adapters of larger rank.
PAGED_OPTIM_STEP_COST = 0.01
#: A quarter of the default loss chunk (32 rows instead of 128): 1,732 against 954 ms per head + cross-entropy
#: forward and backward of 1,024 fp32 tokens (``benchmarks/loss_chunk.py``) on a 6.15 s fp32 step.
QUARTER_LOSS_CHUNK_STEP_COST = 0.13
