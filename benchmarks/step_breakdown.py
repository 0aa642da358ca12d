"""Where a SinkGD L=1 step goes, and the floor that an all-or-nothing step cannot get under.

A SinkGD step that is skipped whole when any gradient is non-finite must read every gradient once
(the normalisation, which also yields the verdict) before it may write any weight, and then read the
gradient again with the weight (the update). This script times, side by side in one run (shuffled
order, caches flushed before each timing as the other optimizers of a training step would leave them):

  adamw_fused     torch's fused AdamW step (the reference: reads W, G, m, v; writes W, m, v)
  sinkgd_L1       a whole SinkGD L=1 step
  normalize       the engine's normalisation alone (one pass over G, native kernels)
  update          the engine's update alone (W <- W - lr diag(r) G diag(c), native kernels)
  read_G          g.sum() of every gradient (torch's vectorised, multi-threaded reduction): a bare read of G,
                  about the least the normalisation pass can cost
  sgd_update      torch._foreach_add_(W, G): read G and W, write W, about the least the update pass can cost
  floor           read_G + sgd_update of the same round: what an all-or-nothing step costs at least

and prints each as a ratio to the fused AdamW step of the same round (median over the rounds).

    python benchmarks/step_breakdown.py [--layers 2] [--reps 31] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from step_benchmark import llama_matrices  # (same directory)

from sinkgd_ds import SinkGD, kernels
from sinkgd_ds.layout import dense_spec
from sinkgd_ds.optim.base import grad_of
from sinkgd_ds.sinkhorn import MatrixBatch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit("native kernels unavailable (no C++ compiler): nothing to break down")
    adam_params = llama_matrices(args.layers)
    adam = torch.optim.AdamW(adam_params, lr=1e-3, fused=True)
    sink_params = llama_matrices(args.layers)
    sink = SinkGD([{"params": sink_params, "kind": "sinkgd"}], lr=0.02, sinkhorn_iters=1)
    parts = llama_matrices(args.layers)
    batch = MatrixBatch([dense_spec(p, f"w{i}") for i, p in enumerate(parts)], grad_of)
    grads = [p.grad for p in parts]
    flush = torch.zeros(32 * 2**20)  # 128 MiB, four times the last-level cache

    steps = {
        "adamw_fused": adam.step,
        "sinkgd_L1": sink.step,
        "normalize": lambda: batch.normalize(("row", "col")),
        "update": lambda: batch.apply_(1e-9),
        "read_G": lambda: [g.sum() for g in grads],
        "sgd_update": lambda: torch._foreach_add_(parts, grads, alpha=-1e-9),
    }
    for f in steps.values():  # warm up: lazy imports, state allocation, kernel build
        f()
    batch.normalize(("row", "col"))
    times: dict[str, list[float]] = {n: [] for n in steps}
    order = list(steps)
    shuffle = random.Random(0).shuffle
    for _ in range(args.reps):
        shuffle(order)
        for n in order:
            flush.add_(1.0)
            t = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t)
    times["floor"] = [a + b for a, b in zip(times["read_G"], times["sgd_update"])]
    ref = times["adamw_fused"]
    numel = sum(p.numel() for p in parts)
    print(f"{numel / 1e6:.1f}M params in {len(parts)} LLaMA-60M-shaped matrices, {args.threads} threads, "
          f"{args.reps} rounds, caches flushed before each timing")
    print(f"{'part':<13}{'min ms':>9}{'median ms':>11}{'median ratio to fused AdamW':>30}")
    for n, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, ref))
        print(f"{n:<13}{min(ts) * 1e3:>9.2f}{statistics.median(ts) * 1e3:>11.2f}{ratio:>30.2f}")


if __name__ == "__main__":
    main()
