"""The whole stack on a GPU machine, in one command: ``python tools/gpu_check.py --out DIR [--kit gpu_kit]``.

Each phase runs in its own subprocess with its own time limit and is reported as passed, failed (with the
error) or skipped (with the reason), so one failure hides nothing else. ``DIR/summary.json`` holds the
verdicts and figures, ``DIR/gpu_check.log`` every phase's output. The script exits 0 when no phase failed.

Phases (``--phases`` picks some):
  environment  device, compute mode, driver / CUDA, versions of torch, triton, deepspeed, megatron-core
  engine       the engine on CUDA against the float64 reference: dense, fused blocks, flat cuts, TP slices
               (threads stand in for ranks), fp32 / bf16, zero rows, NaN; SinkGD and SCALE end to end
  deepspeed    the main job (launch/pretrain.py) at ZeRO-1/2/3, bf16, ~20 steps: loss finite and falling,
               exact resume at ZeRO-3; the suite's DeepSpeed exactness configs on one GPU
  gloo2        two processes on one GPU over gloo with CUDA tensors: which collectives work, and the sharded
               engine across them where they do
  fsdp2        the FSDP2 entry (launch/pretrain_fsdp.py), bf16 mixed precision, 20 steps: loss finite and falling
  megatron     the Megatron-Core entry (launch/pretrain_megatron.py), DistributedOptimizer, bf16, 20 steps
  megatron_lm  Megatron-LM's own pretrain_gpt.py through ``python -m megatron_patch.run --optimizer sinkgd``,
               mock data, local transformer, save and resume (needs the kit's Megatron-LM files)
  benchmarks   every ``benchmarks/gpu_*.py``
On a machine without CUDA every CUDA phase is skipped with that reason. ``--rehearse`` runs the CUDA phases'
plumbing on the CPU instead (what can run there), to check the kit before a GPU is spent on it.

``--kit DIR`` (made by ``tools/prepare_gpu_kit.py``): wheels that the GPU machine lacks are installed into
``DIR/site`` (``pip --no-index --target``) and put on every phase's path; ``DIR/cache`` is the main job's
data cache (the embedded corpus travels there); ``DIR/megatron_lm`` holds Megatron-LM's training files.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = 3  # a phase's exit code for "skipped" (the reason is its last output line)


@dataclass
class Phase:
    name: str
    timeout: float  # seconds
    cuda: bool  # needs a CUDA device (or --rehearse)
    what: str


PHASES = [  # (limits add up to 570 s: the whole check fits one 10-minute call with room to start)
    Phase("environment", 20, False, "device, driver, versions"),
    Phase("engine", 45, True, "engine vs float64 reference on CUDA"),
    Phase("triton", 50, True, "the Triton backend's tests, compiled for the GPU"),
    Phase("deepspeed", 160, True, "main job ZeRO-1/2/3 bf16 + resume, DeepSpeed exactness configs"),
    Phase("gloo2", 35, True, "two processes on one GPU over gloo"),
    Phase("fsdp2", 45, True, "FSDP2 entry, bf16"),
    Phase("megatron", 60, True, "Megatron-Core entry, DistOpt, bf16"),
    Phase("megatron_lm", 85, True, "Megatron-LM pretrain_gpt.py with --optimizer sinkgd"),
    Phase("benchmarks", 70, True, "GPU benchmarks"),
]


@dataclass
class Context:
    out: Path
    kit: Path | None
    rehearse: bool
    device: str = "auto"  # the runner's: each phase decides in its own process ("cpu" or "cuda")
    details: dict = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(self.paths()), "PYTHONWARNINGS": "ignore",
               "TOKENIZERS_PARALLELISM": "false", **self.device_env()}
        if self.kit is not None and (self.kit / "cache").is_dir():
            env["SINKGD_DS_CACHE"] = str(self.kit / "cache")
        if self.device == "cuda" and env.get("DS_ACCELERATOR") == "cpu":
            del env["DS_ACCELERATOR"]  # (the Makefile exports it for the CPU suite; here DeepSpeed must find CUDA)
        return env

    def device_env(self) -> dict[str, str]:
        return {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"} if self.device == "cpu" else {}

    def paths(self) -> list[str]:
        paths = [str(ROOT)]
        if self.kit is not None and (self.kit / "site").is_dir():
            paths.append(str(self.kit / "site"))
        return paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


class Skipped(Exception):
    """A phase that cannot run here; the message says why."""


# ---------------------------------------------------------------------- the runner
def run_phases(phases: list[Phase], ctx: Context, argv_of=None, budget: float = 3600.0) -> dict:
    """Run each phase in its own subprocess (``argv_of(phase)``, default: this script's --phase mode) with its
    time limit (cut to what is left of ``budget`` seconds); a failure or time-out is recorded and the next phase
    runs; once the budget is spent the rest are skipped. Writes summary.json and the log."""
    start = time.monotonic()
    ctx.out.mkdir(parents=True, exist_ok=True)
    log_path = ctx.out / "gpu_check.log"
    summary: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "rehearse": ctx.rehearse, "phases": {}}
    argv_of = argv_of or (lambda ph: [sys.executable, str(Path(__file__).resolve()), "--phase", ph.name,
                                      "--out", str(ctx.out), *(["--kit", str(ctx.kit)] if ctx.kit else []),
                                      *(["--rehearse"] if ctx.rehearse else [])])
    with open(log_path, "w") as log:
        for ph in phases:
            t0 = time.monotonic()
            left = budget - (t0 - start)
            if left < 10:
                summary["phases"][ph.name] = {"status": "skipped", "seconds": 0.0, "what": ph.what,
                                              "reason": f"the time budget ({budget:.0f} s) is used up"}
                continue
            ph = Phase(ph.name, min(ph.timeout, left), ph.cuda, ph.what)
            print(f"[gpu_check] {ph.name}: {ph.what} (limit {ph.timeout:.0f} s)", flush=True)
            log.write(f"\n===== {ph.name}: {ph.what}\n")
            log.flush()
            try:
                proc = subprocess.run(argv_of(ph), cwd=ROOT, env=ctx.env(), capture_output=True, text=True,
                                      timeout=ph.timeout)
                output, rc = proc.stdout + proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as e:
                raw = e.stdout or ""
                output = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
                output += f"\n(time limit {ph.timeout:.0f} s exceeded)"
                rc = None
            log.write(output)
            log.flush()
            lines = [ln for ln in output.strip().splitlines() if ln.strip()]
            if rc == 0:
                status, note = "passed", None
            elif rc == SKIP:
                status, note = "skipped", lines[-1].removeprefix("skipped: ") if lines else "no reason given"
            else:
                status = "failed"
                note = f"time limit {ph.timeout:.0f} s exceeded" if rc is None else "\n".join(lines[-15:])
            details = ctx.out / "phases" / f"{ph.name}.json"
            entry = {"status": status, "seconds": round(time.monotonic() - t0, 1), "what": ph.what}
            if note:
                entry["reason" if status == "skipped" else "error"] = note
            if details.is_file():
                entry["details"] = json.loads(details.read_text())
            summary["phases"][ph.name] = entry
            print(f"[gpu_check] {ph.name}: {status}" + (f" ({note.splitlines()[-1]})" if note else ""), flush=True)
            (ctx.out / "summary.json").write_text(json.dumps(summary, indent=1))
    summary["failed"] = [n for n, e in summary["phases"].items() if e["status"] == "failed"]
    (ctx.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def run_one(name: str, ctx: Context) -> int:
    """--phase NAME: the phase body, in this (child) process."""
    import torch

    phase = next(p for p in PHASES if p.name == name)
    ctx.device = "cuda" if torch.cuda.is_available() else "cpu"
    if phase.cuda and ctx.device == "cpu" and not ctx.rehearse:
        print(f"skipped: no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is False)")
        return SKIP
    os.environ.update(ctx.device_env())  # (before this process imports DeepSpeed: the exactness configs)
    if ctx.device == "cuda" and os.environ.get("DS_ACCELERATOR") == "cpu":
        del os.environ["DS_ACCELERATOR"]
    try:
        details = globals()[f"phase_{name}"](ctx)
    except Skipped as e:
        print(f"skipped: {e}")
        return SKIP
    except Exception:  # noqa: BLE001 - the traceback is the phase's error
        traceback.print_exc()
        return 1
    (ctx.out / "phases").mkdir(parents=True, exist_ok=True)
    (ctx.out / "phases" / f"{name}.json").write_text(json.dumps(details or {}, indent=1, default=str))
    return 0


def install_kit(kit: Path) -> list[str]:
    """The kit's wheels whose module this Python lacks, into kit/site (no index: the GPU machine has no network)."""
    import importlib.util

    wheels = sorted((kit / "wheels").glob("*.whl")) if (kit / "wheels").is_dir() else []
    missing = []
    for w in wheels:
        module = w.name.split("-")[0].replace("megatron_core", "megatron.core")
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # (megatron.core when no megatron namespace exists)
            found = False
        if not found:
            missing.append(w)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(kit / "site"), *map(str, missing)], check=True)
    return [w.name for w in missing]


# ---------------------------------------------------------------------- helpers for the phases
def _sh(cmd: list[str], ctx: Context, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ctx.env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{proc.stdout[-2500:]}\n"
                           f"{proc.stderr[-2500:]}")
    return proc


def _torchrun(ctx: Context, script: list[str]) -> list[str]:
    from tests.distributed import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
            str(free_port()), *script]


def _rel(a, b) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------- phases
def phase_environment(ctx: Context) -> dict:
    import torch

    out: dict = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
                 "cuda_available": torch.cuda.is_available(), "missing": []}
    for mod in ("triton", "deepspeed", "megatron.core", "transformers", "tokenizers", "mpi4py"):
        try:
            m = importlib.import_module(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except Exception as e:  # noqa: BLE001 - what is missing is the report
            out["missing"].append(f"{mod} ({type(e).__name__})")
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name(0)
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        out["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_mode,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            out["nvidia_smi"] = q.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            out["nvidia_smi"] = f"unavailable ({e})"
    from sinkgd_ds import kernels

    out["sinkgd_backends"] = ["torch", *(["native (CPU)"] if kernels.lib() is not None else [])]
    print(json.dumps(out, indent=1))
    return out


def phase_engine(ctx: Context) -> dict:
    """Dense, fused blocks, flat cuts and TP slices on ctx.device against the float64 reference."""
    import torch

    from sinkgd_ds import SCALE, SinkGD, backends
    from sinkgd_ds.layout import FlatMatrix, RowBlocks, dense_spec, flat_partition_specs
    from sinkgd_ds.sinkhorn import normalize_scales
    from tests.reference import row_rms_normalize, sr_sinkhorn, sr_sinkhorn_blocks
    from tests.simulated import ThreadGroup, run_ranks

    picked = backends.select("auto", [torch.device(ctx.device)]).name  # (what "auto" runs every case below on)
    dev, iters, out = ctx.device, 5, {"device": ctx.device, "backend": picked, "cases": {}}
    tp_m, n_loc, tp = 10, 6, 2  # the TP case: a row-parallel 10 x 12 weight over 2 simulated TP ranks
    gen = torch.Generator().manual_seed(0)

    def grad(t):
        return t.grad

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-5)):
        tag = str(dtype).split(".")[-1]
        # dense, with a zero row
        g = torch.randn(37, 23, generator=gen)
        g[5] = 0
        g = g.to(dtype)
        p = torch.zeros(37, 23, dtype=dtype, device=dev)
        p.grad = g.to(dev)
        (sc,) = normalize_scales([dense_spec(p)], grad, ("row", "col") * iters)
        x = sc.r[:, None] * p.grad.float() * sc.c[0][None, :]
        want = sr_sinkhorn(g.double(), iters)
        out["cases"][f"dense-{tag}"] = e = _rel(x, want)
        assert e <= tol and sc.finite and not x[5].any(), ("dense", tag, e)
        # fused [q; k; v] blocks
        sizes = (8, 4, 4)
        g = torch.randn(2 * sum(sizes), 19, generator=gen).to(dtype)
        p = torch.zeros(g.shape, dtype=dtype, device=dev)
        p.grad = g.to(dev)
        (sc,) = normalize_scales([dense_spec(p, blocks=RowBlocks.from_sizes(sizes, repeats=2))], grad,
                                 ("row", "col") * iters)
        block_of_row = [b for _ in range(2) for b, s in enumerate(sizes) for _ in range(s)]
        cols = sc.c[torch.tensor(block_of_row, device=dev)]
        x = sc.r[:, None] * p.grad.float() * cols
        out["cases"][f"fused-{tag}"] = e = _rel(x, sr_sinkhorn_blocks(g.double(), iters, block_of_row))
        assert e <= tol, ("fused", tag, e)
        # flat cuts mid-row over 3 simulated ranks
        shapes = [(9, 7), (5, 11), (13, 3)]
        mats, off = [], 0
        for i, shp in enumerate(shapes):
            mats.append(FlatMatrix(f"w{i}", shp, off))
            off += shp[0] * shp[1]
        gflat = torch.randn(off, generator=gen).to(dtype)
        edges = [0, 40, 101, off]
        bounds = [(edges[r], edges[r + 1]) for r in range(3)]
        group = ThreadGroup(3)

        def flat_rank(r, bounds=bounds, gflat=gflat, group=group, mats=mats):
            lo, hi = bounds[r]
            part = torch.zeros(hi - lo, dtype=gflat.dtype, device=dev)
            part.grad = gflat[lo:hi].to(dev)
            opt = SinkGD([{"params": [part], "kind": "sinkgd"}], lr=1.0, lr_scale=1.0, sinkhorn_iters=iters)
            opt.set_layout(flat_partition_specs(mats, bounds, r, part, group.handle(r)))
            opt.step()
            return (-part.detach().float()).cpu()

        flat = torch.cat(run_ranks(3, flat_rank))
        worst = max(_rel(flat[m.offset:m.offset + m.numel].view(m.shape),
                         sr_sinkhorn(gflat[m.offset:m.offset + m.numel].view(m.shape).double(), iters))
                    for m in mats)
        out["cases"][f"flat-cuts-{tag}"] = worst
        assert worst <= (tol if dtype == torch.float32 else 2.0**-8), ("flat", tag, worst)  # bf16 weights
        # tensor parallelism: row-parallel slices over 2 simulated TP ranks
        g = torch.randn(tp_m, n_loc * tp, generator=gen).to(dtype)
        tpg = ThreadGroup(tp)

        def tp_rank(r, g=g, tpg=tpg):
            gl = g[:, r * n_loc:(r + 1) * n_loc].contiguous().view(-1)
            part = torch.zeros(gl.numel(), dtype=torch.float32, device=dev)
            part.grad = gl.float().to(dev)
            mat = FlatMatrix("w", (tp_m, n_loc), 0, global_shape=(tp_m, n_loc * tp), row_group=tpg.handle(r))
            (sc,) = normalize_scales(flat_partition_specs([mat], [(0, gl.numel())], 0, part, None), grad,
                                     ("row", "col") * iters)
            return (sc.r[:, None] * part.grad.view(tp_m, n_loc) * sc.c[0][None, :]).cpu()

        x = torch.cat(run_ranks(tp, tp_rank), dim=1)
        out["cases"][f"tp-row-{tag}"] = e = _rel(x, sr_sinkhorn(g.double(), iters))
        assert e <= tol, ("tp", tag, e)
    # NaN: reported, nothing written
    p = torch.nn.Parameter(torch.ones(4, 5, device=dev))
    p.grad = torch.ones(4, 5, device=dev)
    p.grad[1, 2] = float("nan")
    opt = SinkGD([("w", p)])
    opt.step()
    assert opt.last_step_skipped and bool((p == 1).all()), "NaN step must change nothing"
    # the optimizers end to end (one step, fp32) against the reference
    for cls, ref in ((SinkGD, lambda g: sr_sinkhorn(g, iters)), (SCALE, row_rms_normalize)):
        g = torch.randn(12, 9, generator=gen)
        w = torch.nn.Parameter(torch.zeros(12, 9, device=dev))
        w.grad = g.to(dev)
        cls([("layer.weight", w)], lr=1.0, lr_scale=1.0).step()
        out["cases"][f"{cls.__name__}-step"] = e = _rel(-w.detach(), ref(g.double()))
        assert e <= 1e-5, (cls.__name__, e)
    out["cases"]["nan-skipped"] = True
    print(json.dumps(out, indent=1))
    return out


def _main_job(ctx: Context, stage: int, out_dir: Path, extra: list[str]) -> dict:
    args = ["launch/pretrain.py", "--deepspeed_config", f"configs/zero{stage}_sinkgd.json", "--model", "tiny",
            "--steps", "20", "--set", "eval.every=10", "--set", "eval.sequences=8", "--set", "checkpoint.every=0",
            "--set", "train.log_every=1", "--no_progress", "--out", str(out_dir), *extra]
    if ctx.device == "cuda":
        args.append("--bf16")
    _sh(_torchrun(ctx, args), ctx, 100)
    return json.loads((out_dir / "summary.json").read_text())


def phase_deepspeed(ctx: Context) -> dict:
    out: dict = {"device": ctx.device, "main_job": {}}
    runs = ctx.out / "runs"
    stages = (1, 2, 3) if not ctx.rehearse else (2,)
    for stage in stages:
        full = _main_job(ctx, stage, runs / f"z{stage}", [])
        losses = full["losses"]
        assert len(losses) == 20 and all(math.isfinite(x) for x in losses), losses
        assert losses[-1] < losses[0] - 0.5, ("loss did not fall", losses)
        entry = {"first": losses[0], "last": losses[-1], "val": full.get("val")}
        if stage == 3 or ctx.rehearse:  # (one exact resume: ZeRO-3, the stage that regathers every parameter)
            cut_dir = runs / f"z{stage}-resume"
            _main_job(ctx, stage, cut_dir, ["--stop_at_step", "10"])
            resumed = _main_job(ctx, stage, cut_dir, ["--resume"])
            entry["exact_resume"] = resumed["losses"] == losses
            assert entry["exact_resume"], ("resume differs", resumed["losses"], losses)
        out["main_job"][f"zero{stage}"] = entry
    # the test suite's DeepSpeed configurations that run on one rank, against the dense reference
    from tests.distributed import spawn
    from tests.ds_worker import run_configs
    from tests.test_deepspeed import check_against_reference, plan

    res = spawn(run_configs, 1, plan(1), timeout=200)[0]
    out["exactness"] = {}
    for key, r in res.items():
        assert "error" not in r, (key, r.get("error"))
        r = {**r, "weights": {n: w.cpu() for n, w in r["weights"].items()}}
        check_against_reference(r, "SinkGD", bf16="bf16" in key, world=1, key=key, stage0="-z0-" in key)
        out["exactness"][key] = "equal to the dense reference"
    print(json.dumps(out, indent=1))
    return out


def _gloo2_worker(rank, world, device):
    import torch
    import torch.distributed as dist

    from sinkgd_ds import SinkGD
    from sinkgd_ds.layout import FlatMatrix, flat_partition_specs

    dev = torch.device(device)
    probes = {}
    for name, fn in (("all_reduce", lambda t: dist.all_reduce(t)), ("broadcast", lambda t: dist.broadcast(t, 0)),
                     ("all_gather", lambda t: dist.all_gather([torch.empty_like(t) for _ in range(world)], t)),
                     ("all_gather_into_tensor", lambda t: dist.all_gather_into_tensor(
                         torch.empty(world * t.numel(), device=dev), t)),
                     ("reduce_scatter_tensor", lambda t: dist.reduce_scatter_tensor(
                         torch.empty(t.numel() // world, device=dev), t))):
        try:
            fn(torch.ones(4, device=dev))
            probes[name] = "works"
        except Exception as e:  # noqa: BLE001 - the probe's answer
            probes[name] = f"{type(e).__name__}: {str(e)[:120]}"
    gen = torch.Generator().manual_seed(0)
    shapes = [(9, 7), (5, 11)]
    mats = [FlatMatrix("a", shapes[0], 0), FlatMatrix("b", shapes[1], 63)]
    gflat = torch.randn(63 + 55, generator=gen)
    bounds = [(0, 50), (50, 118)]
    lo, hi = bounds[rank]
    part = torch.zeros(hi - lo, device=dev)
    part.grad = gflat[lo:hi].to(dev)
    opt = SinkGD([{"params": [part], "kind": "sinkgd"}], lr=1.0, lr_scale=1.0)
    opt.set_layout(flat_partition_specs(mats, bounds, rank, part, dist.group.WORLD), dist.group.WORLD)
    opt.step()
    return {"probes": probes, "piece": (-part.detach()).cpu(), "gflat": gflat}


def phase_gloo2(ctx: Context) -> dict:
    from tests.distributed import spawn
    from tests.reference import sr_sinkhorn

    res = spawn(_gloo2_worker, 2, ctx.device, timeout=80)
    flat, gflat = __import__("torch").cat([r["piece"] for r in res]), res[0]["gflat"]
    errs = {"a": _rel(flat[:63].view(9, 7), sr_sinkhorn(gflat[:63].view(9, 7), 5)),
            "b": _rel(flat[63:].view(5, 11), sr_sinkhorn(gflat[63:].view(5, 11), 5))}
    out = {"device": ctx.device, "probes": res[0]["probes"], "sharded_engine_rel_err": errs}
    print(json.dumps(out, indent=1))
    assert max(errs.values()) <= 1e-5, errs
    return out


def phase_fsdp2(ctx: Context) -> dict:
    out_dir = ctx.out / "runs" / "fsdp2"
    args = ["launch/pretrain_fsdp.py", "--model", "tiny", "--steps", "20", "--set", "eval.every=10",
            "--set", "eval.sequences=8", "--set", "checkpoint.every=0", "--set", "train.log_every=1", "--no_progress",
            "--out", str(out_dir)] + (["--bf16"] if ctx.device == "cuda" else [])
    _sh(_torchrun(ctx, args), ctx, 40)
    losses = json.loads((out_dir / "summary.json").read_text())["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses
    out = {"device": ctx.device, "first": losses[0], "last": losses[-1], "steps": len(losses)}
    print(json.dumps(out, indent=1))
    return out


def phase_megatron(ctx: Context) -> dict:
    out_dir = ctx.out / "runs" / "megatron"
    script = "launch/pretrain_megatron.py" if ctx.device == "cuda" else "tests/main_job_megatron_cpu.py"
    args = [script, "--model", "tiny", "--steps", "20", "--use_distributed_optimizer", "--micro_batch", "4",
            "--set", "eval.every=10", "--set", "eval.sequences=8", "--set", "checkpoint.every=0", "--no_progress",
            "--out", str(out_dir)] + (["--bf16"] if ctx.device == "cuda" else [])
    _sh(_torchrun(ctx, args), ctx, 55)
    summary = json.loads((out_dir / "summary.json").read_text())
    losses = summary["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses
    out = {"device": ctx.device, "first": losses[0], "last": losses[-1], "steps": len(losses)}
    print(json.dumps(out, indent=1))
    return out


def megatron_lm_args() -> list[str]:
    """The flags Megatron-LM's loop ran with in the tests (tests/megatron_lm/harness.py: the model, the schedule,
    the local transformer and no fused kernels), less the CPU-only ones, plus bf16 and the DistributedOptimizer."""
    from tests.megatron_lm import harness

    cpu_only = {"--distributed-backend": 1, "--use-cpu-initialization": 0}
    flags, skip = [], 0
    for flag in [*harness.MODEL, *harness.CPU, *harness.TRAIN]:
        if skip:
            skip -= 1
            continue
        if flag in cpu_only:
            skip = cpu_only[flag]
            continue
        flags.append(flag)
    return [*flags, "--optimizer", "sinkgd", "--bf16", "--use-distributed-optimizer", "--save-interval", "10"]


def phase_megatron_lm(ctx: Context) -> dict:
    lm = ctx.kit / "megatron_lm" if ctx.kit is not None else None
    if lm is None or not (lm / "pretrain_gpt.py").is_file():
        raise Skipped("no Megatron-LM files (tools/prepare_gpu_kit.py --megatron-lm CHECKOUT puts them in the kit)")
    if ctx.device != "cuda":
        raise Skipped("Megatron-LM's training loop calls torch.cuda unconditionally; it cannot be rehearsed on CPU")
    ckpt = ctx.out / "runs" / "megatron_lm"
    runner = [str(ROOT / "tools" / "megatron_lm_runner.py"), str(lm / "pretrain_gpt.py")]
    args = megatron_lm_args()
    first = _sh(_torchrun(ctx, [*runner, *args, "--train-iters", "20", "--save", str(ckpt)]), ctx, 60)
    second = _sh(_torchrun(ctx, [*runner, *args, "--train-iters", "30", "--save", str(ckpt), "--load", str(ckpt)]),
                 ctx, 60)
    import re

    def losses(text):
        return [float(x) for x in re.findall(r"lm loss: ([0-9.Ee+-]+)", text)]

    a, b = losses(first.stdout + first.stderr), losses(second.stdout + second.stderr)
    assert len(a) >= 20 and all(math.isfinite(x) for x in a) and a[-1] < a[0], a
    assert b and all(math.isfinite(x) for x in b), b
    out = {"first_run": [a[0], a[-1]], "resumed_iterations": len(b), "resumed_last": b[-1]}
    print(json.dumps(out, indent=1))
    return out


def phase_triton(ctx: Context) -> dict:
    """tests/test_triton_backend.py on the GPU: the kernels compiled (not interpreted), production tiles."""
    if ctx.device != "cuda":
        raise Skipped("the Triton tests are compiled for a GPU here (CI runs them in Triton's interpreter)")
    proc = _sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton_backend.py"], ctx,
               45)  # (raises with the output when a test fails)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    print("\n".join(tail[-30:]))
    return {"pytest": tail[-1] if tail else ""}


def phase_benchmarks(ctx: Context) -> dict:
    scripts = sorted((ROOT / "benchmarks").glob("gpu_*.py"))
    if not scripts:
        raise Skipped("no GPU benchmark in benchmarks/ yet (benchmarks/gpu_*.py)")
    if ctx.device != "cuda":
        raise Skipped("GPU benchmarks need CUDA")
    out = {}
    for s in scripts:
        js = ctx.out / f"{s.stem}.json"
        out[s.name] = _sh([sys.executable, str(s), "--reps", "10", "--warmup", "2", "--json", str(js)], ctx,
                          80).stdout[-4000:]
        if js.is_file():
            out[s.stem] = json.loads(js.read_text())
    print(json.dumps(out, indent=1))
    return out


# ---------------------------------------------------------------------- entry
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for summary.json, gpu_check.log, runs/")
    ap.add_argument("--kit", default=None, help="the folder tools/prepare_gpu_kit.py made (wheels, cache, Megatron-LM)")
    ap.add_argument("--phases", default=",".join(p.name for p in PHASES), help="comma-separated subset")
    ap.add_argument("--rehearse", action="store_true", help="run the CUDA phases' plumbing on the CPU")
    ap.add_argument("--budget", type=float, default=570.0,
                    help="seconds for all phases (default 570: one 10-minute device call); the rest are skipped")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # a child: run one phase
    args = ap.parse_args(argv)
    kit = Path(args.kit).resolve() if args.kit else None
    ctx = Context(Path(args.out).resolve(), kit, args.rehearse)
    if args.phase:
        return run_one(args.phase, ctx)
    names = [n.strip() for n in args.phases.split(",") if n.strip()]
    unknown = sorted(set(names) - {p.name for p in PHASES})
    if unknown:
        ap.error(f"--phases: unknown {', '.join(unknown)}; known: {', '.join(p.name for p in PHASES)}")
    if kit is not None:
        sys.path[:0] = [str(kit / "site")]  # (what an earlier call installed counts as present)
        installed = install_kit(kit)
        print(f"[gpu_check] kit {kit}: installed {', '.join(installed) or 'nothing (all present)'}", flush=True)
    summary = run_phases([p for p in PHASES if p.name in names], ctx, budget=args.budget)
    counts = {s: sum(e["status"] == s for e in summary["phases"].values()) for s in ("passed", "failed", "skipped")}
    print(f"[gpu_check] {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped; "
          f"{ctx.out / 'summary.json'}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
