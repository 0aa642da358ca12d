"""FSDP2 (``fully_shard``) and DTensor tensor parallelism: SinkGD / SCALE / SWAN built as a user would
(``SinkGD(model.named_parameters())``, nothing else) are exact against the float64 single-process reference.

OddLM (7 x 11 / 11 x 7 matrices, so 2 and 3 ranks cut rows unevenly) trains a few steps per configuration:
FSDP on 2 and 3 ranks, HSDP on a 2 x 2 mesh, FSDP x TP on a 2 x 2 mesh (column-parallel ``up``: rows cut by
both mesh dimensions, ``_StridedShard``; row-parallel ``down``: rows by one, columns by the other), bf16
mixed precision, and a NaN step (one verdict on every rank). All configurations of a world size share a launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .distributed import free_port, spawn
from .ds_model import MATRICES, SEQ, VOCAB, make_model
from .ds_reference import reference_run
from .fsdp2_worker import run

STEPS = 3
TOL = 1e-5  # fp32: relative, on the weight change
ROOT = Path(__file__).resolve().parent.parent


def torchrun(nproc: int, *args: str) -> str:
    """``torchrun --nproc_per_node nproc args`` from the repository root; its stdout (it must succeed)."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def data(rows: int, steps: int = STEPS, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (rows, SEQ), generator=gen) for _ in range(steps)]


def plan(world: int) -> list[tuple[str, dict]]:
    rows = 12
    cfgs = []
    if world in (2, 3):
        for opt in ("SinkGD", "SCALE", "SWAN"):
            cfgs.append((f"fsdp-{opt}", dict(opt=opt, layout="fsdp", data=data(rows))))
        if world == 2:
            cfgs.append(("fsdp-nan", dict(opt="SinkGD", layout="fsdp", data=data(rows), poison_step=1)))
            cfgs.append(("fsdp-mp", dict(opt="SinkGD", layout="fsdp", data=data(rows), mp=True)))
            cfgs.append(("fsdp-iters1", dict(opt="SinkGD", layout="fsdp", data=data(rows), hp={"sinkhorn_iters": 1})))
            cfgs.append(("fsdp-gas", dict(opt="SinkGD", layout="fsdp", data=data(rows, steps=2 * STEPS), gas=2)))
            cfgs.append(("fsdp-triton", dict(opt="SinkGD", layout="fsdp", data=data(rows),
                                             hp={"implementation": "triton"})))
    if world == 4:
        for opt in ("SinkGD", "SCALE"):
            cfgs.append((f"fsdp_tp-{opt}", dict(opt=opt, layout="fsdp_tp", data=data(rows))))
            cfgs.append((f"hsdp-{opt}", dict(opt=opt, layout="hsdp", data=data(rows))))
        cfgs.append(("fsdp_tp-nan", dict(opt="SinkGD", layout="fsdp_tp", data=data(rows), poison_step=1)))
    return cfgs


@pytest.fixture(scope="module")
def runs():
    return {world: spawn(run, world, plan(world), timeout=900) for world in (2, 3, 4)}


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check(r: dict, opt: str, hp: dict | None = None, steps: int = STEPS, key: str = "", tol: float = TOL,
          skip_step: int | None = None) -> None:
    assert "error" not in r, r.get("error")
    d = data(12, steps=steps)
    lrs = [0.02] * steps
    if skip_step is not None:  # a skipped step is a step that never happened
        d = [b for i, b in enumerate(d) if i != skip_step]
        lrs = lrs[: len(d)]
    ref = reference_run(opt, hp or {}, d, lrs)
    init = {n: p.detach().double() for n, p in make_model().named_parameters()}
    for n, want in ref.items():
        got = r["weights"][n].double()
        assert rel(got - init[n], want - init[n]) <= tol, (key, n, rel(got - init[n], want - init[n]))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("opt", ["SinkGD", "SCALE", "SWAN"])
def test_fsdp_exact(runs, world, opt):
    """FSDP2 on 2 and 3 ranks (uneven row cuts), every parameter a DTensor: exact, and every rank agrees."""
    key = f"fsdp-{opt}"
    check(runs[world][0][key], opt, key=key)
    assert runs[world][0][key]["placements"]["up.weight"] == "(Shard(dim=0),)"
    for other in runs[world][1:]:
        for n, w in runs[world][0][key]["weights"].items():
            assert torch.equal(w, other[key]["weights"][n]), (key, n)


def test_fsdp_statistics_collectives(runs):
    """SinkGD under FSDP: 2L bucketed all-reduces of vectors (all matrices together) plus the one-element
    verdict; nothing the size of a matrix is gathered. L = 1: 2 + 1."""
    bound = sum(m + n for m, n in ((11, 7), (7, 11)))
    for key, want in (("fsdp-SinkGD", 10), ("fsdp-iters1", 2)):
        for count, calls in runs[2][0][key]["comm"]:
            assert count == want, (key, count)
            assert [op for op, _ in calls] == ["all_reduce"] * (want + 1), (key, calls)
            assert all(0 < numel <= bound for _, numel in calls[:-1]) and calls[-1][1] == 1, (key, calls)
    check(runs[2][0]["fsdp-iters1"], "SinkGD", hp={"sinkhorn_iters": 1}, key="fsdp-iters1")


def test_adamw_and_head_state_stay_sharded(runs):
    """The AdamW fallback's moments and SCALE's head momentum are DTensors sharded like their parameters."""
    assert runs[2][0]["fsdp-SinkGD"]["state_types"] == ["DTensor"]
    assert runs[2][0]["fsdp-SCALE"]["state_types"] == ["DTensor"]
    assert runs[2][0]["fsdp-SCALE"]["kinds"]["lm_head.weight"] == "scale_head"


def test_mixed_precision_bf16(runs):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the fp32 sharded parameters are stepped with
    gradients from a bf16 forward / backward. The reference does the same (each rank's bf16 gradient of its
    rows, averaged exactly, fp32 masters), so only FSDP's fp32 reduction order is left: the matrices' change
    within 1e-5 after one step and after three."""
    r = runs[2][0]["fsdp-mp"]
    assert "error" not in r, r.get("error")
    d = data(12)
    ref = reference_run("SinkGD", {}, d, [0.02] * STEPS, bf16=True, shards=2, round_masters=False)
    first = reference_run("SinkGD", {}, d[:1], [0.02], bf16=True, shards=2, round_masters=False)
    init = {n: p.detach().double() for n, p in make_model().named_parameters()}
    for n in MATRICES:
        assert rel(r["snaps"][0][n].double() - init[n], first[n] - init[n]) <= 1e-5, n  # one step: same math
        assert rel(r["weights"][n].double() - init[n], ref[n] - init[n]) <= TOL, n  # (measured: 1e-6)


@pytest.mark.parametrize("layout", ["fsdp", "fsdp_tp"])
def test_nan_step_is_skipped_on_every_rank(runs, layout):
    world = 2 if layout == "fsdp" else 4
    key = f"{layout}-nan"
    for r in runs[world]:
        res = r[key]
        assert "error" not in res, res.get("error")
        assert res["skipped"] == [False, True, False] and res["skipped_steps"] == 1
        for n in res["snaps"][0]:
            assert torch.equal(res["snaps"][0][n], res["snaps"][1][n]), n
    check(runs[world][0][key], "SinkGD", key=key, skip_step=1)


@pytest.mark.parametrize("opt", ["SinkGD", "SCALE"])
@pytest.mark.parametrize("layout", ["fsdp_tp", "hsdp"])
def test_two_dimensional_meshes(runs, layout, opt):
    """FSDP x TP (2 x 2): ``up`` column-parallel (rows cut by both mesh dimensions), ``down`` row-parallel
    (rows by FSDP, columns by TP); HSDP (replicate 2 x shard 2). Exact against the reference."""
    key = f"{layout}-{opt}"
    r = runs[4][0][key]
    check(r, opt, key=key)
    if layout == "fsdp_tp":
        assert "Shard(dim=1)" in r["placements"]["down.weight"], r["placements"]
        up = r["placements"]["up.weight"]  # rows cut by both mesh dimensions
        assert "StridedShard" in up or up.count("Shard(dim=0)") == 2, up
    else:
        assert r["placements"]["up.weight"].startswith("(Replicate()"), r["placements"]
    for other in runs[4][1:]:
        for n, w in r["weights"].items():
            assert torch.equal(w, other[key]["weights"][n]), (key, n)


def test_triton_backend_under_fsdp2(runs):
    """``implementation="triton"`` (Triton's interpreter here) on FSDP2 shards: exact, with the device verdict."""
    check(runs[2][0]["fsdp-triton"], "SinkGD", key="fsdp-triton")


# ---------------------------------------------------------------------- torch.distributed.checkpoint
@pytest.mark.parametrize("opt", ["SinkGD", "SCALE"])
def test_dcp_resume_same_and_other_world_size(tmp_path, opt):
    """get_state_dict / dcp.save after 2 of 4 steps at 2 ranks; set_state_dict from it: at 2 ranks the last two
    steps equal the uninterrupted run's bit for bit; at 3 ranks and on a 2 x 2 FSDP x TP mesh (the AdamW moments
    and SCALE's head momentum resharded, the stateless groups empty) they equal the float64 reference of all
    four steps."""
    from .fsdp2_worker import checkpoint_run

    d = data(12, steps=4)
    path = str(tmp_path / "ckpt")
    (full, *_) = spawn(checkpoint_run, 2, opt, "fsdp", d, path, 2, timeout=300)
    (same, *_) = spawn(checkpoint_run, 2, opt, "fsdp", d[2:], path, None, True, timeout=300)
    for got, want in zip(same["snaps"], full["snaps"][2:]):
        for n in want:
            assert torch.equal(got[n], want[n]), n
    (other, *_) = spawn(checkpoint_run, 3, opt, "fsdp", d[2:], path, None, True, timeout=300)
    check({"weights": other["snaps"][-1]}, opt, steps=4, key="resume at 3 ranks")
    assert "exp_avg" in full["state_keys"] and "exp_avg" in other["state_keys"]
    # another mesh shape: the 1-D FSDP checkpoint into FSDP x TP on a 2 x 2 mesh
    (mesh2d, *_) = spawn(checkpoint_run, 4, opt, "fsdp_tp", d[2:], path, None, True, timeout=300)
    check({"weights": mesh2d["snaps"][-1]}, opt, steps=4, key="resume on a 2 x 2 FSDP x TP mesh")


def test_gradient_accumulation(runs):
    """Two micro-batches per step (FSDP2 accumulates the sharded gradients) against the reference's accumulated
    steps: the first step's matrices within 1e-5 of their change; over three steps the matrices' weights within
    1e-5 and AdamW's within 1e-4 (its first steps are sign-like, m / sqrt(v), so the other accumulation order
    moves its parameters by a few 1e-5 of their change, and the matrices' later gradients with them)."""
    r = runs[2][0]["fsdp-gas"]
    assert "error" not in r, r.get("error")
    d = data(12, steps=2 * STEPS)
    init = {n: p.detach().double() for n, p in make_model().named_parameters()}
    first = reference_run("SinkGD", {}, d[:2], [0.02], gas=2)
    for n in MATRICES:
        assert rel(r["snaps"][0][n].double() - init[n], first[n] - init[n]) <= TOL, n
    ref = reference_run("SinkGD", {}, d, [0.02] * STEPS, gas=2)
    for n, want in ref.items():  # (norm.bias starts at 0: its weight is its change; AdamW at 1e-4 as Megatron's)
        assert rel(r["weights"][n], want) <= (TOL if n in MATRICES else 1e-4), n


# ---------------------------------------------------------------------- clients
def test_accelerate_fsdp2_plugin(tmp_path):
    """Accelerate's FSDP2 plugin: model and our optimizer in one prepare() (Accelerate swaps the optimizer's
    parameters for their DTensors); exact against the reference, embeddings / head / norms still on AdamW."""
    torch.save(data(12), tmp_path / "data.pt")
    out = tmp_path / "result.pt"
    torchrun(2, "tests/jobs/accelerate_fsdp2_job.py", "--data", str(tmp_path / "data.pt"), "--out", str(out))
    r = torch.load(out, weights_only=False)
    assert (r["world"], r["inner"]) == (2, "SinkGD") and r["placements"]["up.weight"] == "(Shard(dim=0),)"
    assert r["kinds"]["embed_tokens.weight"] == "adamw" and r["kinds"]["up.weight"] == "sinkgd", r["kinds"]
    check({"weights": r["weights"]}, "SinkGD", key="accelerate-fsdp2")


# ---------------------------------------------------------------------- the main job on FSDP2
@pytest.mark.parametrize("tp", [1, 2], ids=["fsdp", "fsdp_x_tp2"])
def test_main_job_on_fsdp2_trains_and_resumes_exactly(tmp_path, tp):
    """launch/pretrain_fsdp.py under torchrun (tiny LLaMA, SinkGD from the same JSON as the DeepSpeed entry; 2
    ranks of FSDP, or 4 = FSDP 2 x TP 2): the loss falls; stopped after step 5 (--stop_at_step: checkpoint +
    exit) and resumed with --resume, its losses equal the uninterrupted run's bit for bit; the summary, plot and
    DCP checkpoints are there."""
    steps = 8
    args = ["launch/pretrain_fsdp.py", "--model", "tiny", "--steps", str(steps), "--tp", str(tp), "--set",
            "eval.every=4", "--set", "eval.sequences=4", "--set", "checkpoint.every=0", "--set", "train.log_every=1",
            "--no_progress"]

    def launch(extra):
        return torchrun(2 * tp, *args, *extra)

    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    text = launch(["--out", str(full_dir)])
    full = json.loads((full_dir / "summary.json").read_text())
    layout = "FSDP2" if tp == 1 else "FSDP2 x TP2"
    assert layout in text and full["layout"] == layout and full["world"] == 2 * tp
    assert full["optimizer"].startswith("SinkGD") and full["step"] == steps
    assert full["losses"][-1] < full["losses"][0] - 0.5, full["losses"]
    assert (full_dir / "loss.png").is_file() and [s for s, _ in full["val"]] == [4, 8]
    launch(["--out", str(cut_dir), "--stop_at_step", "5"])
    cut = json.loads((cut_dir / "summary.json").read_text())
    assert cut["step"] == 5 and (cut_dir / "checkpoints" / "step5").is_dir()
    assert (cut_dir / "checkpoints" / "latest").read_text().strip() == "step5"
    launch(["--out", str(cut_dir), "--resume"])
    resumed = json.loads((cut_dir / "summary.json").read_text())
    assert resumed["resumed_from"] == 5 and resumed["losses"] == full["losses"]
    assert resumed["val"] == full["val"]


def test_hf_trainer_fsdp2(tmp_path):
    """HF Trainer, FSDP2, our optimizer through ``optimizer_cls_and_kwargs`` (names tagged with
    ``tag_parameter_names``: the Trainer hands the optimizer bare tensors, which Accelerate then swaps for
    DTensors): a tiny LLaMA trains on 2 ranks with embeddings, head and norms on AdamW and every projection
    on SinkGD, and the run equals the same run driven by a plain single-process loop."""
    out = tmp_path / "report.json"
    torchrun(2, "tests/jobs/hf_trainer_fsdp2_job.py", "--out", str(out))
    r = json.loads(out.read_text())
    assert (r["world"], r["inner"], r["placements"]) == (2, "SinkGD", ["(Shard(dim=0),)"])
    kinds = r["kinds"]
    assert kinds["model.embed_tokens.weight"] == "adamw" and kinds["lm_head.weight"] == "adamw"
    projections = [n for n in kinds if n.endswith("_proj.weight")]
    assert len(projections) == 14 and all(kinds[n] == "sinkgd" for n in projections)
    assert all(k == "adamw" for n, k in kinds.items() if "norm" in n)
    assert len(r["losses"]) == 12 and r["losses"][-1] < r["losses"][0] - 0.3, r["losses"]
    # the same run driven by a plain single-process loop: the Trainer's batches in order (its sampler made
    # sequential, no clipping), global batch = both ranks' batches, its linear schedule
    from transformers import LlamaConfig, LlamaForCausalLM

    from sinkgd_ds import SinkGD

    from .jobs.hf_trainer_job import Walk

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg)
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    opt = SinkGD(ref.named_parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 12)
    x = Walk().x
    for step in range(12):
        rows = torch.arange(8 * step, 8 * step + 8) % len(x)  # (8 rows a step: 4 per rank; 64 rows = 8 steps)
        opt.zero_grad()
        halves = [ref(input_ids=x[r], labels=x[r]).loss for r in (rows[:4], rows[4:])]
        (0.5 * (halves[0] + halves[1])).backward()
        opt.step()
        sched.step()
    got = torch.load(str(out) + ".weights.pt")
    for n, p in ref.named_parameters():
        change = (p.detach() - start[n]).double()
        err = float((got[n].double() - p.detach().double()).norm() / change.norm().clamp_min(1e-30))
        assert err <= (1e-5 if kinds[n] == "sinkgd" else 1e-4), (n, err)
