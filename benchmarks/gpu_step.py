"""GPU optimizer-step benchmark on LLaMA-1B (or 7B) matrix shapes, every optimizer side by side in one run.

Compared: torch's fused AdamW, SinkGD L=1 and L=5 with fp32 and with bf16 weights+gradients, SCALE (fp32),
and a device-to-device copy as the bandwidth reference. Gradients are random, set once and kept; a timed
rep is ``opt.step()`` alone, bracketed by CUDA events after a synchronize (so host-bound launch overhead is
counted). Each rep runs every configuration once, the order rotated by one per rep, so drift hits all alike.
Configurations of one dtype share one set of weights and gradients (the values do not change the step time,
and LLaMA-7B would not fit otherwise); every name is ``layers.{i}.attn.q.weight``-like, so each matrix
takes the matrix rule (nothing looks like an embedding or an LM head).

Per configuration: median step time, its ratio to fused AdamW, CUDA launches and blocking host syncs in one
step (torch.profiler: runtime/driver API calls inside the step; launches = cudaLaunch*/cuLaunch*, syncs =
cuda{Stream,Device,Event}Synchronize, blocking cudaMemcpy, and driver equivalents; a blocking D2H copy
shows up as its stream synchronize; "kernels" counts the kernels seen on the device, a cross-check of the
launch count), and achieved GB/s = the step's minimum bytes / time. Byte model,
per matrix element, s = bytes of the dtype:
  fused AdamW    read W, G, m, v; write W, m, v                          28 B (fp32)
  SinkGD L       L normalisation passes over G + the update's read of G,
                 W read and written (the one-pass schedule of unsharded
                 matrices; its partial buffer adds ~0.5 B per iteration)  (L + 1) s + 2 s  (fp32 L=5: 32 B)
  SCALE          one row-normalisation pass over G + update as above      2 s + 2 s        (fp32: 16 B)
  d2d copy       read + write of the buffer                               2 x buffer bytes
Targets (informational; exit 1 only with --strict): SinkGD fp32 L=5 <= 1.25x and L=1 <= 0.6x fused AdamW;
every SinkGD row <= 4L+4 launches per step; 0 host syncs per step for SinkGD and SCALE.

    python benchmarks/gpu_step.py [--model 1b|7b] [--layers N] [--reps 20] [--warmup 3] [--json out.json]
    python benchmarks/gpu_step.py --device cpu --layers 1 --scale 32 --reps 2   # CPU rehearsal
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

import sinkgd_ds

MODELS = {"1b": (2048, 5461, 24), "7b": (4096, 11008, 32)}  # hidden, intermediate, layers (LLaMA)
REF = "adamw_fused"
COPY = "d2d_copy"
MARK = "gpu_step_benchmark.step"
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpy2D",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize", "cuMemcpy", "cuMemcpyDtoH",
              "cuMemcpyDtoH_v2"}
API_PREFIXES = ("cuda", "cuLaunch", "cuStream", "cuCtx", "cuEvent", "cuMemcpy")
CONFIGS: dict[str, tuple[str, int, torch.dtype]] = {  # name -> (optimizer, sinkhorn iters, dtype)
    REF: ("adamw", 0, torch.float32),
    "sinkgd_L1_fp32": ("sinkgd", 1, torch.float32),
    "sinkgd_L5_fp32": ("sinkgd", 5, torch.float32),
    "sinkgd_L1_bf16": ("sinkgd", 1, torch.bfloat16),
    "sinkgd_L5_bf16": ("sinkgd", 5, torch.bfloat16),
    "scale_fp32": ("scale", 1, torch.float32),
}


def shapes(hidden: int, inter: int, layers: int) -> list[tuple[str, tuple[int, int]]]:
    """(name, [out, in]) of every matrix: q, k, v, o, gate, up, down per layer."""
    per_layer = [(f"attn.{m}", (hidden, hidden)) for m in "qkvo"]
    per_layer += [("mlp.gate", (inter, hidden)), ("mlp.up", (inter, hidden)), ("mlp.down", (hidden, inter))]
    return [(f"layers.{i}.{m}.weight", s) for i in range(layers) for m, s in per_layer]


def make_params(specs: list[tuple[str, tuple[int, int]]], dtype: torch.dtype,
                device: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Random weights with random gradients attached once (kept for every rep)."""
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for name, s in specs:
        p = torch.nn.Parameter((torch.randn(s, generator=gen, device=device) * 0.02).to(dtype))
        p.grad = torch.randn(s, generator=gen, device=device).to(dtype)
        out.append((name, p))
    return out


def make_optimizer(name: str, named: list, impl: str) -> torch.optim.Optimizer:
    kind, iters, _ = CONFIGS[name]
    if kind == "adamw":
        return torch.optim.AdamW([p for _, p in named], lr=1e-3, fused=True)
    if kind == "sinkgd":
        return sinkgd_ds.SinkGD(named, lr=0.02, sinkhorn_iters=iters, implementation=impl)
    return sinkgd_ds.SCALE(named, implementation=impl)


def backend_of(opt: torch.optim.Optimizer) -> str:
    """The engine backend that ran the optimizer's matrices (after a step), or "-" for torch's AdamW."""
    batches = getattr(opt, "_batches", {})
    return ",".join(sorted({b.backend.name for b in batches.values() if b.backend is not None})) or "-"


def bytes_per_element(name: str) -> int:
    """The byte model of the module docstring: the least a step must move per matrix element."""
    kind, iters, dtype = CONFIGS[name]
    s = torch.finfo(dtype).bits // 8
    return 28 if kind == "adamw" else (iters + 1) * s + 2 * s


def timer(device: str) -> Callable[[Callable[[], Any]], float]:
    """Seconds one call takes: CUDA events after a synchronize on a GPU, perf_counter on the CPU."""
    if device == "cpu":
        def run_cpu(fn: Callable[[], Any]) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        return run_cpu

    def run_cuda(fn: Callable[[], Any]) -> float:
        torch.cuda.synchronize()  # the start event fires now, not after queued work: host time counts
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return run_cuda


def api_calls(fn: Callable[[], Any]) -> tuple[Counter, Counter]:
    """CUDA runtime/driver API calls made inside one call of fn, and the GPU activities (kernels, copies) of
    the whole profile (only fn runs in it), from torch.profiler; the second cross-checks the first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function(MARK):
            fn()
        torch.cuda.synchronize()  # outside the marked range, so not counted
    events = prof.events()
    mark = next(e for e in events if e.name == MARK and e.device_type == DeviceType.CPU)
    lo, hi = mark.time_range.start, mark.time_range.end
    api = Counter(e.name for e in events if e.device_type == DeviceType.CPU and e.name.startswith(API_PREFIXES)
                  and lo <= e.time_range.start <= hi)
    gpu = Counter(e.name.split(" (")[0] if e.name.startswith(("Memcpy", "Memset")) else "kernel"
                  for e in events if e.device_type == DeviceType.CUDA and e.name != MARK)
    return api, gpu


def launches(calls: Counter) -> int:
    return sum(n for name, n in calls.items() if name.startswith(("cudaLaunch", "cuLaunch")))


def syncs(calls: Counter) -> int:
    return sum(n for name, n in calls.items() if name in SYNC_CALLS)


def versions() -> dict[str, str | None]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "sinkgd_ds": sinkgd_ds.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="1b")
    ap.add_argument("--layers", type=int, default=None, help="cut the layer count (default: the model's; 1 on CPU)")
    ap.add_argument("--scale", type=int, default=None, help="divide hidden/intermediate (default 1; 16 on CPU)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a rehearsal of the code paths")
    ap.add_argument("--implementation", choices=["auto", "torch", "native", "triton"], default="auto")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--copy-mib", type=int, default=1024, help="d2d copy buffer (capped at the fp32 G size)")
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available, so nothing was measured (--device cpu runs a CPU rehearsal).")
        return 0
    hidden, inter, layers = MODELS[args.model]
    scale = args.scale or (16 if dev == "cpu" else 1)
    layers = args.layers or (1 if dev == "cpu" else layers)
    specs = shapes(hidden // scale, inter // scale, layers)
    numel = sum(a * b for _, (a, b) in specs)
    copy_numel = min(args.copy_mib * 2**20 // 4, numel)
    what = (f"LLaMA-{args.model.upper()} shapes / {scale}, {layers} layers: {len(specs)} matrices, "
            f"{numel / 1e6:.1f}M elements")
    if dev == "cuda":
        free, total = torch.cuda.mem_get_info()
        need = numel * (8 + 8 + 4) + 2 * 4 * copy_numel  # fp32 W+G, AdamW m+v, bf16 W+G, copy src+dst
        if need * 1.05 + 2**30 > free:
            print(f"skipped: {what} needs ~{need / 2**30:.1f} GiB (+5% and 1 GiB of workspace), "
                  f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free on {torch.cuda.get_device_name()}")
            return 0

    notes: list[str] = []  # (anything the reader of the numbers must know)
    time_it = timer(dev)
    try:  # AdamW's state and the optimizers' buffers appear in the first (warm-up) step
        params = {dt: make_params(specs, dt, dev) for dt in (torch.float32, torch.bfloat16)}
        opts = {n: make_optimizer(n, params[dt], args.implementation) for n, (_, _, dt) in CONFIGS.items()}
        src = torch.randn(copy_numel, device=dev)
        dst = torch.empty_like(src)
        steps: dict[str, Callable[[], Any]] = {n: o.step for n, o in opts.items()}
        steps[COPY] = lambda: dst.copy_(src)
        names = list(steps)
        for _ in range(args.warmup):  # lazy state, kernel compilation, allocator growth
            for n in names:
                time_it(steps[n])
    except torch.cuda.OutOfMemoryError as e:
        print(f"skipped: {what} did not fit: {str(e).splitlines()[0]}")
        return 0
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):  # round-robin, rotated by one each rep
        k = rep % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(time_it(steps[n]))
    calls = {n: api_calls(steps[n]) for n in names} if dev == "cuda" else {}

    med = {n: statistics.median(ts) for n, ts in times.items()}
    copy_gbps = 2 * 4 * copy_numel / med[COPY] / 1e9
    rows: dict[str, dict[str, Any]] = {}
    for n in CONFIGS:
        moved = bytes_per_element(n) * numel
        rows[n] = {"backend": backend_of(opts[n]), "median_ms": med[n] * 1e3, "times_ms": [t * 1e3 for t in times[n]],
                   "ratio_to_adamw": med[n] / med[REF],
                   "bytes_per_element": bytes_per_element(n), "min_bytes": moved, "gbps": moved / med[n] / 1e9,
                   "launches": launches(calls[n][0]) if calls else None,
                   "host_syncs": syncs(calls[n][0]) if calls else None,
                   "gpu_kernels": calls[n][1]["kernel"] if calls else None,
                   "api_calls": dict(calls[n][0]) if calls else None,
                   "gpu_activities": dict(calls[n][1]) if calls else None}

    device_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"{what}; {device_name}; implementation={args.implementation}; median of {args.reps} reps "
          f"after {args.warmup} warm-up")
    for note in notes:
        print(f"note: {note}")
    print(f"{'config':<16}{'backend':>8}{'ms/step':>10}{'x AdamW':>9}{'launches':>10}{'kernels':>9}{'syncs':>7}"
          f"{'B/el':>6}{'GB/s':>9}{'% copy':>8}")
    for n, r in rows.items():
        la, ke, sy = ("n/a" if r[k] is None else str(r[k]) for k in ("launches", "gpu_kernels", "host_syncs"))
        print(f"{n:<16}{r['backend']:>8}{r['median_ms']:>10.3f}{r['ratio_to_adamw']:>9.2f}{la:>10}{ke:>9}{sy:>7}"
              f"{r['bytes_per_element']:>6}{r['gbps']:>9.1f}{100 * r['gbps'] / copy_gbps:>8.1f}")
    print(f"{COPY:<16}{'':>8}{med[COPY] * 1e3:>10.3f}{'':>9}{'':>10}{'':>9}{'':>7}{'':>6}{copy_gbps:>9.1f}{100.0:>8.1f}"
          f"   ({4 * copy_numel / 2**20:.2f} MiB buffer)")

    targets = []
    for n, limit in (("sinkgd_L5_fp32", 1.25), ("sinkgd_L1_fp32", 0.6)):
        targets.append((f"{n} <= {limit}x fused AdamW", rows[n]["ratio_to_adamw"], limit))
    for n, (kind, iters, _) in CONFIGS.items():
        if kind == "sinkgd":
            targets.append((f"{n} launches/step <= 4L+4 = {4 * iters + 4}", rows[n]["launches"], 4 * iters + 4))
        if kind != "adamw":
            targets.append((f"{n} host syncs/step = 0", rows[n]["host_syncs"], 0))
    verdicts = []
    for label, value, limit in targets:
        ok = None if value is None or dev == "cpu" else value <= limit  # (the targets are a GPU's)
        verdicts.append({"target": label, "value": value, "limit": limit, "pass": ok})
        shown = "n/a" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))
        print(f"{'n/a ' if ok is None else 'PASS' if ok else 'FAIL'}  {label}: {shown}")

    if args.json:
        doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": device_name, "versions": versions(), "args": vars(args), "model": args.model,
               "hidden": hidden // scale, "intermediate": inter // scale, "layers": layers, "matrices": len(specs),
               "elements": numel, "notes": notes, "configs": rows,
               "copy": {"median_ms": med[COPY] * 1e3, "times_ms": [t * 1e3 for t in times[COPY]],
                        "bytes": 2 * 4 * copy_numel, "gbps": copy_gbps},
               "targets": verdicts}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if args.strict and any(v["pass"] is False for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
