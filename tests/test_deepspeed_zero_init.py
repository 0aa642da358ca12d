"""SinkGD / SCALE / SWAN on models built inside ``deepspeed.zero.Init`` route by the logical shape.

Under ``zero.Init`` (how ZeRO-3 models are made, and what HF ``from_pretrained`` does under ZeRO-3) every
parameter is a 1-D placeholder when the optimizer is built; routing by ``p.dim()`` sent them all to the
AdamW fallback, silently. Each run here is compared with a dense single-process float64 reference that
starts from the same (gathered) initial weights: matrices on the matrix optimizer, 1-D, embeddings and head
on torch's AdamW.
"""

from __future__ import annotations

import math

import pytest
import torch

from . import reference as R
from .distributed import spawn
from .ds_zero_init_worker import LLAMA, MLP, llama_data, mlp_data, run_all

FP32_TOL = 1e-5  # relative, on the weights (as tests/test_deepspeed.py)
LR, SCALE = 0.02, 0.05
FALLBACK = ("embed_tokens", "lm_head")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(path)  # a local checkpoint: no hub
    return spawn(run_all, 2, str(path), timeout=900), path


def _matrix_update(opt: str, g: torch.Tensor) -> torch.Tensor:
    return {"SinkGD": lambda: R.sr_sinkhorn(g, 5), "SCALE": lambda: R.row_rms_normalize(g),
            "SWAN": lambda: R.swan(g, 5)}[opt]()


def _reference(model: torch.nn.Module, init: dict, opt: str, loss_of, batches) -> dict:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(init[n])
    params = dict(model.named_parameters())
    is_matrix = {n: p.dim() >= 2 and not any(f in n for f in FALLBACK) for n, p in params.items()}
    adam = torch.optim.AdamW([p for n, p in params.items() if not is_matrix[n]], lr=LR, weight_decay=0.0,
                             foreach=False)
    for b in batches:
        model.zero_grad()
        loss_of(model, b).backward()
        with torch.no_grad():
            for n, p in params.items():
                if is_matrix[n]:
                    p -= (LR * SCALE * _matrix_update(opt, p.grad)).float()
        adam.step()
    return {n: p.detach().double() for n, p in params.items()}


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _check(r: dict, want: dict, key: str):
    for n, w in want.items():
        assert _rel(r["final"][n], w) <= FP32_TOL, (key, n, _rel(r["final"][n], w))
        assert not torch.equal(r["final"][n], r["init"][n]), (key, n)  # it trained


@pytest.mark.parametrize("opt", ["SinkGD", "SCALE", "SWAN"])
@pytest.mark.parametrize("way", ["json", "client"])
def test_zero_init_mlp_routes_matrices_and_is_exact(runs, opt, way):
    ranks, _ = runs
    for res in ranks:
        r = res[f"{opt}-{way}"]
        assert "error" not in r, r.get("error")
        # the optimizer really saw placeholders, and still routed every weight to the matrix kind
        assert all(len(shape) == 1 and len(ds) == 2 for n, (shape, ds) in r["placeholders"].items()
                   if n.endswith("weight")), r["placeholders"]
        kinds = r["kinds"]
        assert {kinds[n] for n in kinds if n.endswith("weight")} == {opt.lower() if opt != "SCALE" else "scale"}
        assert {kinds[n] for n in kinds if n.endswith("bias")} == {"adamw"}
        assert "adamw" in r["group_kinds"] and len(r["group_kinds"]) == 2, r["group_kinds"]
    r = ranks[0][f"{opt}-{way}"]
    for other in ranks[1:]:
        for n in r["final"]:
            assert torch.equal(r["final"][n], other[f"{opt}-{way}"]["final"][n])
    want = _reference(MLP(), r["init"], opt, lambda m, b: m(*b), mlp_data())
    _check(r, want, f"{opt}-{way}")


def test_hf_from_pretrained_under_zero3_is_exact(runs):
    from transformers import LlamaForCausalLM

    ranks, path = runs
    r = ranks[0]["llama-from_pretrained"]
    assert "error" not in r, r.get("error")
    assert all(len(shape) == 1 for shape, _ in r["placeholders"].values())  # built inside zero.Init
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for n, kind in r["kinds"].items():
        assert kind == ("sinkgd" if any(p in n for p in projections) else "adamw"), (n, kind)
    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    want = _reference(model, r["init"], "SinkGD", lambda m, b: m(input_ids=b, labels=b).loss, llama_data())
    _check(r, want, "llama")
    assert all(math.isfinite(x) for x in r["losses"])
