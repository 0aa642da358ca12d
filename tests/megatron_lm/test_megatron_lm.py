"""Megatron-LM's own training loop (``megatron.training.pretrain``, shipped in megatron-core 0.17+ wheels) with
``--optimizer sinkgd|scale|swan``, launched as a user launches pretrain_gpt.py (Python 3.12 lane: .venv312).

Every layout starts from the same weights (one checkpoint) and must give the 1-rank run's losses: tensor, data
(DistributedOptimizer), pipeline (tied embeddings) and virtual pipeline parallelism, for each optimizer; tied
embedding copies stay bit-identical; ``--save`` / ``--load`` resumes bit for bit; what is not handled is refused
by flag. The 1-rank run itself is checked against the float64 dense reference at the megatron-core level
(tests/test_megatron.py runs in this lane too).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from . import harness as H

ITERS = 4
REL = 2e-6  # measured: <= 2e-7 between layouts (fp32 reduction order); the bound leaves a factor of 10


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("megatron_lm")


@pytest.fixture(scope="module")
def init(work) -> Path:
    return H.initial_checkpoint(work)


LAYOUTS = {
    "one": (1, []),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "dp2-distopt": (2, ["--use-distributed-optimizer"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "vpp2": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
}
_RUNS: dict[tuple, list[dict]] = {}


def train(work: Path, init: Path, optimizer: str, layout: str, *extra: str, iters: int = ITERS) -> list[dict]:
    key = (optimizer, layout, extra, iters)
    if key not in _RUNS:
        nproc, flags = LAYOUTS[layout]
        name = "-".join([optimizer, layout, *[e.strip("-") for e in extra if not e.startswith("/")]])
        _RUNS[key] = H.run(work / name, nproc, [*H.MODEL, *H.CPU, *H.TRAIN, "--train-iters", str(iters),
                                                *H.from_checkpoint(init), "--optimizer", optimizer, *flags, *extra])
    return _RUNS[key]


def assert_close_losses(got: list[float], want: list[float], rel: float = REL) -> None:
    assert len(got) == len(want) == ITERS
    for i, (g, w) in enumerate(zip(got, want)):
        assert math.isfinite(g) and abs(g - w) <= rel * abs(w), f"iteration {i + 1}: {g} vs {w}"


def tied_copies(dumps: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(first stage's word embedding, last stage's output-layer copy) per TP rank, from a pipelined run."""
    first = [d for d in dumps if d["pp_rank"] == 0]
    last = [d for d in dumps if d["pp_rank"] == max(x["pp_rank"] for x in dumps)]
    pairs = []
    for a in first:
        b = next(d for d in last if d["tp_rank"] == a["tp_rank"])
        emb = next(v for k, v in a["params"].items() if k.endswith("embedding.word_embeddings.weight"))
        out = next(v for k, v in b["params"].items() if k.endswith("output_layer.weight"))
        pairs.append((emb, out))
    return pairs


@pytest.mark.parametrize("optimizer", ["sinkgd", "scale"])
@pytest.mark.parametrize("layout", ["tp2", "dp2-distopt", "pp2", "vpp2"])
def test_every_layout_trains_as_one_rank(work, init, optimizer, layout):
    one = train(work, init, optimizer, "one")
    other = train(work, init, optimizer, layout)
    wanted = {"sinkgd": "SinkGD", "scale": "SCALE"}[optimizer]
    assert all(opt.endswith("/" + wanted) for d in other for opt in d["optimizer"]), other[0]["optimizer"]
    assert_close_losses(H.losses(other), H.losses(one))
    assert H.losses(one)[-1] < H.losses(one)[0] - 0.05  # it trains


@pytest.mark.parametrize("optimizer", ["sinkgd", "scale", "swan"])
def test_tied_embedding_copies_stay_bit_identical_under_pipeline_parallelism(work, init, optimizer):
    """Megatron keeps the tied word embedding on the first stage and a copy as output_layer.weight on the last;
    both must take the same update (SCALE gave the copy its head rule before, and the copies drifted apart)."""
    dumps = train(work, init, optimizer, "pp2")
    for emb, out in tied_copies(dumps):
        assert torch.equal(emb, out)
    start = torch.load(next((work / "init-run").glob("rank0.pt")), weights_only=True)["params"]
    initial = next(v for k, v in start.items() if k.endswith("embedding.word_embeddings.weight"))
    assert not torch.equal(tied_copies(dumps)[0][0], initial)  # (and they did train)


def test_swan_runs_without_tensor_parallelism_and_is_refused_with_it(work, init):
    one = train(work, init, "swan", "one")
    assert_close_losses(H.losses(train(work, init, "swan", "dp2-distopt")), H.losses(one))
    assert_close_losses(H.losses(train(work, init, "swan", "pp2")), H.losses(one))
    nproc, flags = LAYOUTS["tp2"]
    proc = H.launch(work / "swan-tp2", nproc, [*H.MODEL, *H.CPU, *H.TRAIN, "--train-iters", "1",
                                                 *H.from_checkpoint(init), "--optimizer", "swan", *flags])
    assert proc.returncode != 0
    assert "optimizer='swan' does not support: SWAN with tensor parallelism" in proc.stdout + proc.stderr


def test_bf16_with_the_distributed_optimizer_trains_as_one_rank_in_bf16(work, init):
    one = H.losses(train(work, init, "sinkgd", "one", "--bf16"))
    dp2 = H.losses(train(work, init, "sinkgd", "dp2-distopt", "--bf16"))
    fp32 = H.losses(train(work, init, "sinkgd", "one"))
    # bf16 weights (fp32 main params): the two bf16 runs differ only in reduction order; both near the fp32 run
    assert_close_losses(dp2, one, rel=2e-3)
    assert_close_losses(one, fp32, rel=2e-2)


@pytest.mark.parametrize("layout", ["dp2-distopt", "pp2"])
def test_save_and_load_resume_bit_for_bit(work, init, layout):
    """Megatron-LM's own --save / --load (torch_dist): 2 iterations, save, a new job loads and runs 2 more."""
    nproc, flags = LAYOUTS[layout]
    ckpt = work / f"ckpt-{layout}"
    common = [*H.MODEL, *H.CPU, *H.TRAIN, "--train-iters", str(ITERS), "--optimizer", "scale", *flags]
    straight = H.run(work / f"straight-{layout}", nproc, [*common, *H.from_checkpoint(init)])
    first = H.run(work / f"first-{layout}", nproc, [*common, *H.from_checkpoint(init), "--save", str(ckpt),
                                                    "--save-interval", "2", "--exit-interval", "2"])
    resumed = H.run(work / f"resumed-{layout}", nproc, [*common, "--load", str(ckpt)])
    assert H.losses(first) + H.losses(resumed) == H.losses(straight)
    for a, b in zip(sorted(straight, key=lambda d: d["rank"]), sorted(resumed, key=lambda d: d["rank"])):
        assert a["params"].keys() == b["params"].keys()
        for k in a["params"]:
            assert torch.equal(a["params"][k], b["params"][k]), k


def test_a_checkpoint_resumes_at_another_pipeline_size(work, init):
    """Saved at PP=2, resumed at PP=1 (Megatron re-slices; our optimizer state is stored per model parameter):
    the continued run equals the straight PP=1 run."""
    ckpt = work / "ckpt-pp2-to-one"
    common = [*H.MODEL, *H.CPU, *H.TRAIN, "--train-iters", str(ITERS), "--optimizer", "scale"]
    H.run(work / "pp2-first", 2, [*common, "--pipeline-model-parallel-size", "2", *H.from_checkpoint(init),
                                  "--save", str(ckpt), "--save-interval", "2", "--exit-interval", "2",
                                  "--dist-ckpt-optim-fully-reshardable"])
    resumed = H.run(work / "one-resumed", 1, [*common, "--load", str(ckpt)])
    straight = train(work, init, "scale", "one")
    got, want = H.losses(resumed), H.losses(straight)[2:]
    assert len(got) == 2 and all(abs(g - w) <= REL * abs(w) for g, w in zip(got, want)), (got, want)


@pytest.mark.parametrize("optimizer", ["sinkgd", "scale"])
def test_a_nan_on_one_pipeline_stage_skips_the_step_on_every_stage(work, init, optimizer):
    """One non-finite verdict across stages: a NaN gradient on the first stage only (clipping off, so Megatron's
    global norm does not spread it) skips iteration 3 on both stages, exactly as the same NaN does at PP = 1."""
    flags = [*H.MODEL, *H.CPU, *H.TRAIN, "--clip-grad", "0", "--train-iters", str(ITERS), *H.from_checkpoint(init),
             "--optimizer", optimizer, "--no-check-for-nan-in-loss-and-grad"]
    one = H.run(work / f"nan-one-{optimizer}", 1, flags, env={"SINKGD_MLM_NAN": "3:0"})
    pp2 = H.run(work / f"nan-pp2-{optimizer}", 2, [*flags, "--pipeline-model-parallel-size", "2"],
                env={"SINKGD_MLM_NAN": "3:0"})
    clean = H.run(work / f"clean-one-{optimizer}", 1, flags)
    assert_close_losses(H.losses(pp2), H.losses(one))
    assert H.losses(one)[3] != H.losses(clean)[3]  # the skipped step shows (iteration 4 sees unchanged weights)
    assert H.losses(one)[:3] == H.losses(clean)[:3]
    for emb, out in tied_copies(pp2):
        assert torch.equal(emb, out) and bool(torch.isfinite(emb).all())
    for d in pp2:
        assert all(bool(torch.isfinite(v).all()) for v in d["params"].values())
