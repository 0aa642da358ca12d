"""sinkgd_ds.memory: ``account()`` of real engines against the memory model, and both against hand counts.

The model (sinkgd_ds/memory/model.py) predicts bytes per rank and category from a run config; ``account()``
reads them from a real engine's tensors. They must agree within 1 % per category and in total, on every rank:
DeepSpeed ZeRO 0-3 (fp32, bf16, and bf16 with fp32 accumulation = BF16_Optimizer), Megatron with and without
the distributed optimizer, FSDP2 (launch/fsdp_engine.py), plain torch; SinkGD, SCALE, SWAN and the AdamW
baseline; the tiny and 60m configs; 1 and 2 gloo ranks. Each world size is one launch (tests/memory_worker.py).
A model and an accountant that shared one misreading would agree, so two cases are also counted by hand, byte by
byte, and the model is checked against the memory figures the SCALE paper's repository publishes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sinkgd_ds.memory import KEYS, account
from sinkgd_ds.memory.model import Setup, estimate
from sinkgd_ds.memory.report import GIB, fits, markdown_tables, peak_reserve
from sinkgd_ds.memory.shapes import FAMILY, hf_params, load_shape
from sinkgd_ds.optim import SCALE, SinkGD

from .distributed import spawn
from .memory_worker import worker

TOL = 0.01  # the brief's agreement: 1 % per category and in total

# Every optimizer at every ZeRO stage; each (stage, precision) pair with two optimizers.
TINY_DS = [(stage, opt, (stage + i) % 2 == 1) for stage in range(4) for i, opt in
           enumerate(("sinkgd", "scale", "swan", "adamw"))]


def ds(label: str, model: str, optimizer: str, stage: int, bf16: bool, grad_accum: str | None = None) -> dict:
    vocab = 4096 if model == "tiny" else 13 if model == "oddlm" else 32000
    cfg = dict(label=label, engine="deepspeed", model=model, vocab=vocab, optimizer=optimizer, stage=stage, bf16=bf16)
    return {**cfg, "grad_accum": grad_accum} if grad_accum else cfg


def mg(label: str, optimizer: str, distopt: bool, bf16: bool) -> dict:
    return dict(label=label, engine="megatron", model="tiny", vocab=4096, optimizer=optimizer, distopt=distopt,
                bf16=bf16)


CONFIGS_2 = [ds(f"tiny-z{s}-{o}-{'bf16' if b else 'fp32'}", "tiny", o, s, b) for s, o, b in TINY_DS] + [
    ds("tiny-z1-scale-bf16acc", "tiny", "scale", 1, True, grad_accum="fp32"),  # BF16_Optimizer
    ds("60m-z1-scale-bf16", "60m", "scale", 1, True),  # (60m: ~5 s a config; stage 0 is the tiny model's)
    ds("60m-z2-adamw-bf16", "60m", "adamw", 2, True), ds("60m-z3-sinkgd-bf16", "60m", "sinkgd", 3, True),
    ds("oddlm-z1-sinkgd-fp32", "oddlm", "sinkgd", 1, False),  # the hand count
    mg("mg-distopt-sinkgd-fp32", "sinkgd", True, False), mg("mg-distopt-scale-bf16", "scale", True, True),
    mg("mg-distopt-swan-fp32", "swan", True, False), mg("mg-distopt-adamw-bf16", "adamw", True, True),
    mg("mg-sinkgd-bf16", "sinkgd", False, True), mg("mg-scale-fp32", "scale", False, False),
    dict(label="fsdp2-scale-bf16", engine="fsdp2", model="tiny", vocab=4096, optimizer="scale", bf16=True),
]
CONFIGS_1 = [
    ds("tiny-z0-scale-fp32", "tiny", "scale", 0, False), ds("tiny-z1-sinkgd-bf16", "tiny", "sinkgd", 1, True),
    ds("tiny-z2-adamw-fp32", "tiny", "adamw", 2, False), ds("tiny-z3-swan-bf16", "tiny", "swan", 3, True),
    ds("60m-z1-scale-fp32", "60m", "scale", 1, False),
    mg("mg-distopt-scale-fp32", "scale", True, False), mg("mg-adamw-bf16", "adamw", False, True),
]


@pytest.fixture(scope="module")
def runs() -> dict[int, list[dict]]:
    return {2: spawn(worker, 2, CONFIGS_2, timeout=600), 1: spawn(worker, 1, CONFIGS_1, timeout=600)}


def setup_of(cfg: dict, world: int) -> Setup:
    if cfg["engine"] == "megatron":
        engine = "megatron-distopt" if cfg["distopt"] else "megatron"
    elif cfg["engine"] == "fsdp2":
        engine = "fsdp2"
    else:
        engine = f"zero{cfg['stage']}"
    return Setup(cfg["optimizer"], engine, world, "bf16" if cfg["bf16"] else "fp32", grad_accum=cfg.get("grad_accum"))


def assert_agrees(got: dict[str, int], want: dict[str, int], where: str) -> None:
    assert set(got) == set(KEYS) and all(isinstance(v, int) for v in got.values()), (where, got)
    for key in KEYS:
        assert abs(got[key] - want[key]) <= TOL * want[key], f"{where}: {key} accounted {got[key]} vs model {want[key]}"


MODEL_CASES = [(2, c) for c in CONFIGS_2 if c["model"] != "oddlm"] + [(1, c) for c in CONFIGS_1]


@pytest.mark.parametrize("world,cfg", MODEL_CASES, ids=[f"w{w}-{c['label']}" for w, c in MODEL_CASES])
def test_model_agrees_with_real_engines(runs, world, cfg):
    _, shape = load_shape(cfg["model"], cfg["vocab"])
    for rank, result in enumerate(runs[world]):
        r = result[cfg["label"]]
        assert_agrees(r["account"], estimate(shape, setup_of(cfg, world), rank), f"{cfg['label']} rank {rank}")
        assert r["gathered"] == [other[cfg["label"]]["account"] for other in runs[world]]  # gather(): all, in order


def test_engines_are_the_ones_modelled(runs):
    """The wrappers DeepSpeed / Megatron picked are the ones whose rules the model follows."""
    want = {"tiny-z0-sinkgd-fp32": "SinkGD", "tiny-z0-scale-bf16": "FP16_UnfusedOptimizer",
            "tiny-z1-scale-fp32": "DeepSpeedZeroOptimizer", "tiny-z2-sinkgd-fp32": "DeepSpeedZeroOptimizer",
            "tiny-z3-sinkgd-bf16": "DeepSpeedZeroOptimizer_Stage3", "tiny-z1-scale-bf16acc": "BF16_Optimizer",
            "mg-distopt-sinkgd-fp32": "SinkDistributedOptimizer", "mg-distopt-adamw-bf16": "DistributedOptimizer",
            "mg-sinkgd-bf16": "SinkFloat16Optimizer", "mg-scale-fp32": "SinkFP32Optimizer"}
    for label, wrapper in want.items():
        assert runs[2][0][label]["wrapper"] == wrapper, label


def test_state_split_by_optimizer(runs):
    """SinkGD/SWAN keep no matrix state, SCALE only its head momentum, the baseline only AdamW state."""
    r = runs[2][0]
    assert r["tiny-z0-sinkgd-fp32"]["account"]["optimizer_state_matrices"] == 0
    assert r["tiny-z2-swan-fp32"]["account"]["optimizer_state_matrices"] == 0
    scale = r["tiny-z0-scale-bf16"]["account"]
    assert scale["optimizer_state_matrices"] == 4096 * 128 * 4  # the fp32 momentum of the 4096 x 128 LM head
    assert scale["optimizer_state_adamw"] == 9 * (2 * 128 * 4 + 4)  # 9 RMSNorm weights: 2 moments + step
    assert r["tiny-z3-adamw-fp32"]["account"]["optimizer_state_matrices"] == 0


def test_megatron_account_needs_no_model(runs):
    """Every Megatron parameter is held by the optimizer, so account(opt) == account(opt, ddp)."""
    for result in runs[2]:
        for cfg in CONFIGS_2:
            if cfg["engine"] == "megatron":
                assert result[cfg["label"]]["without_model"] == result[cfg["label"]]["account"], cfg["label"]


def test_hand_count_zero1_two_ranks(runs):
    """OddLM under ZeRO-1, fp32, SinkGD, 2 ranks, counted by hand from DeepSpeed's rules.

    Params (model order): embed 13x7=91, norm.weight 7, norm.bias 7, up.weight 11x7=77, up.bias 11,
    down.weight 7x11=77, lm_head 13x7=91. Groups (kind of first appearance): AdamW [embed 91, norm.w 7,
    norm.b 7, up.bias 11, lm_head 91] = 207 -> padded to a multiple of 2 x 2 = 208, partitions of 104;
    SinkGD [up.weight 77, down 77] = 154 -> 156, partitions of 78.
      weights: (208 + 156) x 4 = 1456 on each rank; masters: (104 + 78) x 4 = 728;
      AdamW state: two fp32 moments of the 104-element partition + a 4-byte step = 836; SinkGD: none.
      gradients = whole gradients of the params overlapping the partition + zeros for the uncovered rest:
        rank 0: [0,104) meets embed, norm.w, norm.b (91+7+7 = 105, covering 104); [0,78) meets up.weight and
                down (154, covering 78) -> (105 + 154) x 4 = 1036;
        rank 1: [104,208) meets norm.b, up.bias, lm_head (7+11+91 = 109, covering 103 -> 1 zero); [78,156)
                meets down (77, covering 76 -> 2 zeros) -> (109 + 1 + 77 + 2) x 4 = 756.
    """
    want = [dict(weights=1456, gradients=1036, master_weights=728, optimizer_state_matrices=0,
                 optimizer_state_adamw=836),
            dict(weights=1456, gradients=756, master_weights=728, optimizer_state_matrices=0,
                 optimizer_state_adamw=836)]
    for rank, w in enumerate(want):
        assert runs[2][rank]["oddlm-z1-sinkgd-fp32"]["account"] == {**w, "total": sum(w.values())}


def test_account_rejects_what_it_cannot_read():
    with pytest.raises(TypeError, match="is not a DeepSpeed engine"):
        account(torch.nn.Linear(2, 2))


class TwoMatrices(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.up = torch.nn.Linear(3, 4, bias=False, dtype=dtype)
        self.down = torch.nn.Linear(4, 3, bias=False, dtype=dtype)
        self.norm = torch.nn.Parameter(torch.ones(3, dtype=dtype))

    def forward(self, x):
        return (self.down(torch.relu(self.up(x))) * self.norm).square().sum()


def one_step_then_backward(model: torch.nn.Module, opt: torch.optim.Optimizer, dtype=torch.float32) -> None:
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        model(x).float().backward()
        if step == 0:
            opt.step()


def test_hand_count_plain_torch():
    """Two matrices (4x3, 3x4) and a 3-vector, fp32: weights and gradients 27 x 4 = 108 bytes each; SinkGD keeps
    nothing for the matrices, AdamW two 3-element moments and a step for the vector (12 + 12 + 4 = 28); SCALE
    the same (it has no head here). No master copies: the optimizer steps the model's tensors."""
    for cls in (SinkGD, SCALE):
        model = TwoMatrices()
        opt = cls(model.named_parameters())
        one_step_then_backward(model, opt)
        want = dict(weights=108, gradients=108, master_weights=0, optimizer_state_matrices=0, optimizer_state_adamw=28)
        assert account(opt, model) == {**want, "total": 108 + 108 + 28}, cls.__name__
        assert account(opt) == account(opt, model)  # (without a model: the optimizer's params are the weights)
    # torch's own AdamW (the baseline): every parameter has two moments and a step
    model = TwoMatrices()
    opt = torch.optim.AdamW(model.parameters())
    one_step_then_backward(model, opt)
    assert account(opt, model)["optimizer_state_adamw"] == 27 * 8 + 3 * 4


@pytest.mark.parametrize("optimizer,precision", [("sinkgd", "fp32"), ("scale", "bf16"), ("adamw", "fp32")])
def test_model_agrees_plain_torch(optimizer, precision):
    """The ``torch`` engine of the model (a plain model and optimizer; bf16 = pure bf16, state in bf16) against
    account() of launch/trainer.py's tiny LLaMA after a step."""
    from launch.trainer import build_model

    from .memory_worker import run_config

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = build_model(run_config("tiny", 4096), 4096).to(dtype)
    opt = torch.optim.AdamW(model.parameters()) if optimizer == "adamw" else \
        {"sinkgd": SinkGD, "scale": SCALE}[optimizer](model.named_parameters())
    ids = torch.randint(0, 4096, (1, 8), generator=torch.Generator().manual_seed(0))
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        if step == 0:
            opt.step()
    _, shape = load_shape("tiny", 4096)
    assert_agrees(account(opt, model), estimate(shape, Setup(optimizer, "torch", 1, precision)), optimizer)


# SCALE's official README (OptimAI-Lab/Minimalist_LLM_Pretraining; shared/notes/papers.md 3.4): "model + optimizer
# memory" in GB, pure bf16 on one GPU: Adam, SWAN (= APOLLO-Mini: Adam on embedding and head only) and SCALE for
# 60M-1B; 7B: SCALE 13.74G, APOLLO-Mini 14.53G [R] and Adam 40.43 GB (the v3 paper, via a summary [N]).
PUBLISHED_GB = {"adamw": {"60m": 0.35, "130m": 0.81, "350m": 2.21, "1b": 8.04, "7b": 40.43},
                "swan": {"60m": 0.25, "130m": 0.46, "350m": 1.00, "1b": 3.20, "7b": 14.53},
                "scale": {"60m": 0.15, "130m": 0.32, "350m": 0.80, "1b": 2.81, "7b": 13.74}}


@pytest.mark.parametrize("optimizer", list(PUBLISHED_GB))
def test_model_reproduces_published_memory(optimizer):
    """An outside reference for the model: the papers' memory column is weights + optimizer state of pure bf16
    training (no masters; gradients not counted), i.e. the model's ``torch`` engine in bf16 at one rank. Agreement:
    1 % plus half a unit of the published (two-decimal) figure."""
    for name, published in PUBLISHED_GB[optimizer].items():
        e = estimate(FAMILY[name], Setup(optimizer, "torch", 1, "bf16"))
        ours = (e["weights"] + e["optimizer_state_matrices"] + e["optimizer_state_adamw"]) / 1e9
        assert abs(ours - published) <= 0.01 * published + 0.005, (optimizer, name, ours, published)


def test_shapes_match_hf_llama_7b():
    """The 7B shape as HF builds it (on the meta device): names, shapes, and LLaMA-7B's 6,738,415,616 params."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = FAMILY["7b"]
    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, num_hidden_layers=s.layers,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == [(p.name, p.shape) for p in hf_params(s)]
    assert sum(p.numel for p in hf_params(s)) == 6_738_415_616
    assert load_shape("7b")[1] == s  # configs/models/7b.json is the same shape


def test_fit_search_boundary():
    """A GPU exactly as large as the 1b rank's need (counted + peak reserve + activations) fits 1b, not 7b."""
    setup = Setup("sinkgd", "zero2", 8, "bf16")
    ranks = [estimate(FAMILY["1b"], setup, r)["total"] for r in range(8)]
    need = max(ranks) + peak_reserve(FAMILY["1b"], setup) + 4 * GIB
    results = {f.name: f.fits for f in fits(setup, need / GIB, 4.0)}
    assert results["1b"] and not results["7b"] and results["60m"]
    results = {f.name: f.fits for f in fits(setup, (need - 1) / GIB, 4.0)}
    assert not results["1b"]


@pytest.mark.parametrize("argv,needle", [
    (["--engine", "zero4"], "--engine 'zero4' is not allowed; use one of zero0, zero1"),
    (["--optimizer", "adam"], "--optimizer 'adam' is not allowed; use one of all, sinkgd, scale, swan, adamw"),
    (["--world", "0"], "--world '0' is not allowed; it must be >= 1"),
    (["--world", "two"], "--world 'two' is not an integer"),
    (["--precision", "fp16"], "--precision 'fp16' is not allowed; use one of fp32, bf16"),
    (["--gpu-memory-gib", "0"], "--gpu-memory-gib '0' is not allowed; it must be > 0"),
    (["--activation-gib", "-1"], "--activation-gib '-1' is not allowed; it must be >= 0"),
    (["--vocab", "0"], "--vocab '0' is not allowed; it must be >= 1"),
    (["--model", "70b"], "--model '70b' is not known; allowed: 130m, 13b, 1b"),
])
def test_bad_cli_input(capsys, argv, needle):
    from sinkgd_ds.memory.__main__ import main

    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_cli_prints_categories(capsys):
    from sinkgd_ds.memory.__main__ import main

    assert main(["--model", "tiny", "--vocab", "4096", "--engine", "zero3", "--world", "2"]) == 0
    out = capsys.readouterr().out
    _, shape = load_shape("tiny", 4096)
    want = max(estimate(shape, Setup("scale", "zero3", 2, "bf16"), r)["total"] for r in range(2))
    row = next(line for line in out.splitlines() if line.startswith("| **total**"))
    n = sum(p.numel for p in hf_params(shape))
    assert row.split("|")[4].strip() == f"{want / n:.3f}"  # SCALE's bytes per parameter
    assert "largest LLaMA of the family that fits 80 GiB" in out


def test_docs_table_is_generated():
    """docs/memory.md's tables are exactly what ``python -m sinkgd_ds.memory --table`` prints now."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "memory.md").read_text()
    begin, end = "<!-- generated: python -m sinkgd_ds.memory --table -->\n", "<!-- end generated -->"
    assert re.sub(r"\s+$", "", doc[doc.index(begin) + len(begin):doc.index(end)]) == markdown_tables().rstrip()
