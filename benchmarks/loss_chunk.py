"""The chunked head + cross-entropy at several chunk sizes vs the full-logits loss (the standard stack's), on CPU.

    OMP_NUM_THREADS=1 python benchmarks/loss_chunk.py [--tokens 1024 --vocab 49152 --hidden 576 --repeats 5
                                                       --chunks 256,128,64 --dtype bfloat16]

One forward + backward of ``sum_t CE(h_t W^T, y_t)`` (SmolLM2-135M's tied head by default: V 49,152, H 576;
1,024 target tokens = seq 512 x batch 2): ``qlorakit.train.loss.chunked_linear_cross_entropy`` at each chunk
and ``reference_loss_sum``'s formula (full logits, ``F.cross_entropy``, as transformers computes the loss).
Each configuration runs in a fresh interpreter (its ``ru_maxrss`` less its RSS before the first pass is the
loss's peak; ``--repeats`` timed passes after one warm-up, median). Same random inputs in every child
(seed 0). The losses of all configurations are printed and must agree to fp32 rounding. Never asserts a time.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

from _harness import cpu_header, git_head, run_child, vector_flags, write_result


def child(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from qlorakit.hardware import current_rss_mb
    from qlorakit.train.loss import chunked_linear_cross_entropy

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * 0.02).to(dtype)  # (V, H)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).to(dtype)  # (N, H)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=gen)  # (N,)
    baseline = current_rss_mb()

    def once() -> tuple[float, float]:
        h = hidden.clone().requires_grad_(True)
        start = time.perf_counter()
        if args.chunk == 0:
            loss = F.cross_entropy((h @ weight.T).float(), labels, reduction="sum")  # (N, V) logits at once
        else:
            loss = chunked_linear_cross_entropy(h, weight, labels, args.chunk)
        loss.backward()
        return time.perf_counter() - start, float(loss)

    once()
    runs = [once() for _ in range(args.repeats)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"chunk": args.chunk, "seconds": statistics.median(t for t, _ in runs), "loss": runs[0][1],
            "peak_over_baseline_mib": peak - baseline}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunks", default="256,128,64", help="chunk sizes, comma-separated (0 = full logits)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--output", default="")
    p.add_argument("--chunk", type=int, default=-1, help=argparse.SUPPRESS)  # a child's one configuration
    args = p.parse_args(argv)
    if args.chunk >= 0:
        print(json.dumps(child(args)))
        return 0
    print(cpu_header(vector_flags()))
    shared = ["--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
              "--repeats", str(args.repeats), "--dtype", args.dtype]  # fmt: skip
    rows = [run_child(__file__, [*shared, "--chunk", str(c)]) for c in [0, *map(int, args.chunks.split(","))]]
    full = rows[0]
    print(f"{'chunk':>8} {'ms':>8} {'vs full':>8} {'peak MiB':>9} {'loss':>14}")
    for row in rows:
        name = "full" if row["chunk"] == 0 else str(row["chunk"])
        print(f"{name:>8} {row['seconds'] * 1e3:8.0f} {full['seconds'] / row['seconds']:7.2f}x "
              f"{row['peak_over_baseline_mib']:9.0f} {row['loss']:14.4f}")  # fmt: skip
    if args.output:
        write_result(args.output, {"benchmark": "loss_chunk", "git": git_head(), "command": " ".join(sys.argv),
                                   "dtype": args.dtype, "tokens": args.tokens, "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
