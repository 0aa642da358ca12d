"""Optimizer-step benchmark on LLaMA-60M-shaped matrices, all optimizers side by side in one run.

Each round times every optimizer once, in a shuffled order, so a noisy moment of the (shared) host
hits all of them alike. Prints, per optimizer:
  * the min-of-N step time and its ratio to the min-of-N of torch's fused AdamW;
  * the median of the per-round ratios (each optimizer's step divided by the AdamW step of the same
    round, taken milliseconds apart) and their quartiles. On a VM whose memory bandwidth is shared
    with other tenants the two minima are often taken minutes apart under different load, so the
    paired median is the steadier of the two numbers; both are printed and both are judged;
  * the persistent state and the transient memory of a step (VmHWM above the pre-step RSS, Linux).
Targets from the issue: SinkGD L=5 <= 1.25x and L=1 <= 0.6x fused AdamW (the one-pass byte budget
allows ~1.14x). ``sinkgd_L*_torch`` rows run the same optimizer with the native kernels switched off
(the pure-torch reference path of sinkgd_ds.sinkhorn). ``sinkgd_L1_permat`` is SinkGD L=1 with
``nonfinite="matrix"`` (a non-finite gradient skips only its own matrix, so each matrix is updated right
after its normalisation and G is read from DRAM once); it is printed for comparison, the targets are
judged on the default (whole-step skip).

    python benchmarks/step_benchmark.py [--layers 2] [--reps 31] [--threads 2] [--no-torch-path]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time

import torch

from sinkgd_ds import SinkGD, kernels

HIDDEN, INTER = 512, 1376  # LLaMA-60M (GaLore benchmark): hidden 512, intermediate 1376


def llama_matrices(layers: int) -> list[torch.Tensor]:
    shapes = [(HIDDEN, HIDDEN)] * 4 + [(INTER, HIDDEN)] * 2 + [(HIDDEN, INTER)]
    gen = torch.Generator().manual_seed(0)
    ps = []
    for _ in range(layers):
        for s in shapes:
            p = torch.randn(s, generator=gen) * 0.02
            p.grad = torch.randn(s, generator=gen)
            ps.append(p)
    return ps


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB, -1 where absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def make(name: str, params):
    if name == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    if name == "adamw_foreach":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, foreach=True)
    if name == "sinkgd_L1_permat":  # nonfinite="matrix": G read once from DRAM (not the default; not judged)
        return SinkGD([{"params": params, "kind": "sinkgd"}], lr=0.02, sinkhorn_iters=1, nonfinite="matrix")
    if name.startswith("sinkgd_L"):
        iters = int(name[len("sinkgd_L"):].removesuffix("_torch"))
        return SinkGD([{"params": params, "kind": "sinkgd"}], lr=0.02, sinkhorn_iters=iters)
    raise ValueError(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-torch-path", action="store_true", help="skip the sinkgd_L*_torch rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = ["adamw_fused", "adamw_foreach", "sgd", "sinkgd_L1", "sinkgd_L5", "sinkgd_L1_permat"]
    if not args.no_torch_path:
        names += ["sinkgd_L1_torch", "sinkgd_L5_torch"]
    params = {n: llama_matrices(args.layers) for n in names}
    opts = {n: make(n, params[n]) for n in names}
    numel = sum(p.numel() for p in params[names[0]])
    have_kernels = kernels.available()  # builds them on first use (cached afterwards)

    def step(n: str) -> None:
        prev = kernels.set_enabled(not n.endswith("_torch"))
        try:
            opts[n].step()
        finally:
            kernels.set_enabled(prev)

    for n in names:  # warm up: lazy imports, state allocation
        step(n)
    times: dict[str, list[float]] = {n: [] for n in names}
    transient = {n: 0 for n in names}
    order = list(names)
    shuffle = random.Random(0).shuffle
    for _ in range(args.reps):  # interleaved, so machine noise hits every optimizer alike
        shuffle(order)
        for n in order:
            gc.collect()
            base = status_kib("VmRSS")
            reset_hwm()
            t = time.perf_counter()
            step(n)
            times[n].append(time.perf_counter() - t)
            transient[n] = max(transient[n], status_kib("VmHWM") - base)
    best = {n: min(ts) for n, ts in times.items()}
    paired = {n: [a / b for a, b in zip(times[n], times["adamw_fused"])] for n in names}
    ratio = {n: statistics.median(r) for n, r in paired.items()}
    quart = {n: statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3 for n, r in paired.items()}
    ref = best["adamw_fused"]
    print(f"{numel / 1e6:.1f}M params in {len(params[names[0]])} LLaMA-60M-shaped matrices, "
          f"{args.threads} threads, min of {args.reps}; native kernels: {'yes' if have_kernels else 'NO'}")
    header = ("optimizer", "ms/step", "ns/param", "x fused AdamW", "median ratio", "quartiles", "state MiB",
              "transient MiB")
    print(f"{header[0]:<17}{header[1]:>9}{header[2]:>10}{header[3]:>15}{header[4]:>14}{header[5]:>13}{header[6]:>11}"
          f"{header[7]:>15}")
    for n in names:
        state = sum(t.numel() * t.element_size() for st in opts[n].state.values() for t in st.values()
                    if torch.is_tensor(t))
        q = f"{quart[n][0]:.2f}-{quart[n][2]:.2f}"
        print(f"{n:<17}{best[n] * 1e3:>9.2f}{best[n] / numel * 1e9:>10.2f}{best[n] / ref:>15.2f}{ratio[n]:>14.2f}"
              f"{q:>13}{state / 2**20:>11.1f}{transient[n] / 1024:>15.1f}")
    for n, target in (("sinkgd_L5", 1.25), ("sinkgd_L1", 0.6)):
        verdict = [f"{label} {value:.2f}x {'met' if value <= target else 'NOT met'}"
                   for label, value in (("min-of-N", best[n] / ref), ("paired median", ratio[n]))]
        print(f"target {n} <= {target:.2f}x fused AdamW: {'; '.join(verdict)}")


if __name__ == "__main__":
    main()
