"""Optimizer classes on plain tensors against the dense references (float64 math, torch AdamW)."""

from __future__ import annotations

import math

import pytest
import torch

from sinkgd_ds import SCALE, SWAN, SinkGD

from .ds_model import OddLM
from .reference import adamw_reference, col_rms_normalize, row_rms_normalize, sr_sinkhorn, swan


def TinyLM() -> OddLM:  # noqa: N802 - a model "class" of other sizes: 9x6 tall and 6x9 wide matrices
    return OddLM(vocab=11, d=6, ff=9)


def random_grads(model, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()} for _ in range(steps)]


def run(opt_cls, grads, **kw):
    torch.manual_seed(0)
    model = TinyLM()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = opt_cls(model.named_parameters(), **kw)
    for step in grads:
        for n, p in model.named_parameters():
            p.grad = step[n].clone()
        opt.step()
    return model, opt, init


def close(a, b, tol=1e-6):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12)) <= tol


ADAM_NAMES = ("embed_tokens.weight", "norm.weight", "norm.bias", "up.bias", "lm_head.weight")


def check_adamw_params(model, init, grads, lr, wd=0.0):
    for n in ADAM_NAMES:
        want = adamw_reference(init[n], [g[n] for g in grads], lr, (0.9, 0.999), 1e-8, wd)
        assert close(dict(model.named_parameters())[n], want), n


@pytest.mark.parametrize("iters", [1, 5])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_sinkgd_matches_reference(iters, wd):
    grads = random_grads(TinyLM(), 3)
    lr, scale = 0.02, 0.05
    model, opt, init = run(SinkGD, grads, lr=lr, lr_scale=scale, sinkhorn_iters=iters, weight_decay=wd)
    for n in ("up.weight", "down.weight"):
        w = init[n].double()
        for g in grads:
            w = w * (1 - lr * scale * wd) - lr * scale * sr_sinkhorn(g[n], iters)
        assert close(dict(model.named_parameters())[n], w), n
    check_adamw_params(model, init, grads, lr, wd)
    # matrices carry no optimizer state at all
    assert not opt.state[model.up.weight] and not opt.state[model.down.weight]
    assert set(opt.state[model.lm_head.weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_scale_matches_reference():
    grads = random_grads(TinyLM(), 3)
    lr, scale, beta = 0.02, 0.05, 0.9
    model, opt, init = run(SCALE, grads, lr=lr, lr_scale=scale, momentum=beta)
    params = dict(model.named_parameters())
    for n in ("up.weight", "down.weight"):
        w = init[n].double() - sum(lr * scale * row_rms_normalize(g[n]) for g in grads)
        assert close(params[n], w), n
    w = init["embed_tokens.weight"].double() - sum(lr * scale * col_rms_normalize(g["embed_tokens.weight"])
                                                   for g in grads)
    assert close(params["embed_tokens.weight"], w)
    w, mom = init["lm_head.weight"].double(), torch.zeros_like(init["lm_head.weight"], dtype=torch.float64)
    for g in grads:
        mom = beta * mom + (1 - beta) * g["lm_head.weight"].double()
        w = w - lr * scale * row_rms_normalize(mom)
    assert close(params["lm_head.weight"], w)
    for n in ("norm.weight", "norm.bias", "up.bias"):
        want = adamw_reference(init[n], [g[n] for g in grads], lr, (0.9, 0.999), 1e-8, 0.0)
        assert close(params[n], want), n
    assert not opt.state[model.up.weight] and set(opt.state[model.lm_head.weight]) == {"exp_avg"}


@pytest.mark.parametrize("ns_steps", [1, 5, 10])
def test_swan_matches_reference(ns_steps):
    grads = random_grads(TinyLM(), 2)
    lr, scale = 0.02, 0.05
    model, opt, init = run(SWAN, grads, lr=lr, lr_scale=scale, ns_steps=ns_steps)
    for n in ("up.weight", "down.weight"):  # (9, 6) tall and (6, 9) wide
        w = init[n].double() - sum(lr * scale * swan(g[n], ns_steps) for g in grads)
        assert close(dict(model.named_parameters())[n], w, 1e-5), n
    check_adamw_params(model, init, grads, lr)
    assert not opt.state[model.up.weight]


def test_zero_gradients_give_zero_finite_update():
    model = TinyLM()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SinkGD(model.named_parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all()
        if n in ("up.weight", "down.weight"):
            assert torch.equal(p, before[n])


@pytest.mark.parametrize("cls", [SinkGD, SCALE, SWAN])
@pytest.mark.parametrize("where", ["up.weight", "norm.weight", "lm_head.weight", "embed_tokens.weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_whole_step(cls, where, bad):
    model = TinyLM()
    opt = cls(model.named_parameters())
    grads = random_grads(model, 2)
    for n, p in model.named_parameters():  # one good step so AdamW/momentum state exists
        p.grad = grads[0][n].clone()
    opt.step()
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {k: {s: v.clone() for s, v in st.items()} for k, st in opt.state.items()}
    for n, p in model.named_parameters():
        p.grad = grads[1][n].clone()
    dict(model.named_parameters())[where].grad.view(-1)[3] = bad
    opt.step()
    assert opt.last_step_skipped and opt.skipped_steps == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, snapshot[n]), n
    for k, st in opt.state.items():
        for s, v in st.items():
            assert torch.equal(v, state[k][s])
    dict(model.named_parameters())[where].grad.view(-1)[3] = 0.0
    opt.step()
    assert not opt.last_step_skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lr_schedulers_absolute_and_multiplicative():
    grads = random_grads(TinyLM(), 2)
    torch.manual_seed(0)
    model = TinyLM()
    w0 = model.up.weight.detach().clone()
    opt = SinkGD(model.named_parameters(), lr=0.02, lr_scale=0.05, sinkhorn_iters=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)  # multiplicative
    lrs = []
    for g in grads:
        lrs.append(opt.param_groups[0]["lr"])
        for n, p in model.named_parameters():
            p.grad = g[n].clone()
        opt.step()
        sched.step()
    assert lrs == [0.02, 0.01]
    want = w0.double() - sum(lr * 0.05 * sr_sinkhorn(g["up.weight"], 2) for lr, g in zip(lrs, grads))
    assert close(model.up.weight, want)
    for group in opt.param_groups:  # absolute: set every group's lr
        group["lr"] = 0.1
    model.up.weight.grad = grads[0]["up.weight"].clone()
    w1 = model.up.weight.detach().clone()
    opt.step()
    assert close(model.up.weight, w1.double() - 0.1 * 0.05 * sr_sinkhorn(grads[0]["up.weight"], 2))


def test_routing_rules():
    model = TinyLM()
    opt = SinkGD(model.named_parameters())
    assert len(opt.param_groups) == 1  # the user's own group; kinds are per parameter
    kinds = opt.param_kinds()
    assert kinds["up.weight"] == kinds["down.weight"] == "sinkgd"
    for n in ("embed_tokens.weight", "lm_head.weight", "norm.weight", "up.bias"):
        assert kinds[n] == "adamw"
    # explicit groups with per-group overrides and a forced kind
    opt = SinkGD([{"params": [model.up.weight], "sinkhorn_iters": 2, "kind": "adamw"},
                  {"params": [model.down.weight], "lr": 0.5}], lr=0.1)
    assert [(g["kind"], g["sinkhorn_iters"], g["lr"]) for g in opt.param_groups] == [
        ("adamw", 2, 0.1), (None, 5, 0.5)]
    assert [g["kind"] for g in opt.kind_groups()] == ["adamw", "sinkgd"]
    kinds = SCALE(model.named_parameters()).param_kinds()
    assert kinds["lm_head.weight"] == "scale_head" and kinds["embed_tokens.weight"] == "scale_embed"


def test_engine_param_groups_split_by_kind():
    """Inside engine_param_groups (how DeepSpeed and Megatron build us) a group holds one kind only, in order."""
    from sinkgd_ds.optim.base import engine_param_groups

    model = TinyLM()
    with engine_param_groups():
        opt = SinkGD(model.named_parameters())
    assert [(g["kind"], [opt._name(p) for p in g["params"]]) for g in opt.param_groups] == [
        ("adamw", ["embed_tokens.weight", "norm.weight", "norm.bias", "up.bias", "lm_head.weight"]),
        ("sinkgd", ["up.weight", "down.weight"])]
    assert all("param_names" not in g for g in opt.param_groups)  # the engines swap in flat partitions


BAD = [
    (dict(lr=-1.0), "lr=-1.0"),
    (dict(lr="0.1"), "lr='0.1'"),
    (dict(lr=math.nan), "lr=nan"),
    (dict(lr_scale=0), "lr_scale=0"),
    (dict(sinkhorn_iters=0), "sinkhorn_iters=0"),
    (dict(sinkhorn_iters=2.5), "sinkhorn_iters=2.5"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"),
    (dict(betas=(0.9, 1.0)), "betas[1]=1.0"),
    (dict(betas=0.9), "betas=0.9"),
    (dict(eps=0), "eps=0"),
    (dict(sinkhorn_iter=5), "'sinkhorn_iter'"),
]


@pytest.mark.parametrize("kwargs,needle", BAD)
def test_bad_hyperparameters_name_key_and_value(kwargs, needle):
    with pytest.raises(ValueError) as e:
        SinkGD(TinyLM().named_parameters(), **kwargs)
    assert needle in str(e.value)
    assert "allowed" in str(e.value).lower() or "must" in str(e.value)


def test_bad_group_keys_and_kinds():
    m = TinyLM()
    with pytest.raises(ValueError, match=r"unknown key 'sinkhorn_iter'.*Did you mean 'sinkhorn_iters'"):
        SinkGD([{"params": [m.up.weight], "sinkhorn_iter": 3}])
    with pytest.raises(ValueError, match="kind='muon'"):
        SinkGD([{"params": [m.up.weight], "kind": "muon"}])
    with pytest.raises(ValueError, match="momentum=1.5"):
        SCALE(m.named_parameters(), momentum=1.5)
    with pytest.raises(ValueError, match="ns_steps=0"):
        SWAN(m.named_parameters(), ns_steps=0)
    with pytest.raises(ValueError, match="empty"):
        SinkGD([])


def test_flat_tensor_without_layout_fails_loudly():
    flat = torch.zeros(10, requires_grad=True)
    opt = SinkGD([{"params": [flat], "kind": "sinkgd"}])
    flat.grad = torch.ones(10)
    with pytest.raises(RuntimeError, match="no layout"):
        opt.step()


def test_swan_whitens_fused_blocks_separately():
    """A fused [q; k; v] x 2 query groups matrix with row blocks: SWAN equals the reference on each block's rows."""
    from sinkgd_ds.layout import RowBlocks, dense_spec

    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(2 * (4 + 2 + 2), 5, generator=gen))
    w.grad = torch.randn(w.shape, generator=gen)
    blocks = RowBlocks.from_sizes([4, 2, 2], repeats=2)
    opt = SWAN([w], lr=1.0, lr_scale=1.0)
    init = w.detach().double().clone()
    opt.set_layout([dense_spec(w, "qkv", blocks)])
    opt.step()
    want = torch.empty_like(init)
    for b in range(3):
        rows = torch.cat([torch.arange(lo, hi) for lo, hi, blk in blocks.runs if blk == b])
        want[rows] = swan(w.grad[rows], 5)
    assert close(w, init - want, 1e-5)
    assert not close(w, init - swan(w.grad, 5), 1e-2)  # whitening the fused matrix whole is different


class _CountingGroup:
    """A stand-in process group (one rank): all_reduce leaves the tensor as it is, and counts the calls."""

    def __init__(self):
        self.calls = 0

    def all_reduce(self, t):
        self.calls += 1


@pytest.mark.parametrize("cls", [SinkGD, SCALE])
@pytest.mark.parametrize("bad_name", ["norm.weight", "down.weight"])
def test_last_group_applies_with_its_verdict_only_when_nothing_can_veto(cls, bad_name, monkeypatch):
    """The last param group may write its update in the same native call that computes its verdict, but only
    when every earlier group was clean and no other rank has a say. Run side by side: alone (that one-call
    path) and with a consensus group (a stand-in for other ranks: the two-phase path). Both must write the
    same bits, and a non-finite gradient, in an earlier group or in the last one, still changes nothing."""
    from sinkgd_ds.sinkhorn import MatrixBatch

    calls = []
    real = MatrixBatch.step_

    def counted(self, *args, **kwargs):
        calls.append(len(self.specs))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MatrixBatch, "step_", counted)
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: True)  # so the consensus group is used
    names = ["norm.weight", "up.weight", "down.weight"]  # an AdamW group, then the matrices (the last group)
    runs = {}
    for consensus in (False, True):
        torch.manual_seed(0)
        params = dict(TinyLM().named_parameters())
        opt = cls([(n, params[n]) for n in names], lr=0.01)
        assert [g["kind"] for g in opt.kind_groups()] == ["adamw", cls.MATRIX_KINDS[0]]
        group = _CountingGroup()
        opt.set_layout((), consensus_group=group if consensus else None)
        calls.clear()
        for step, g in enumerate(random_grads(TinyLM(), 3)):
            for n in names:
                params[n].grad = g[n].clone()
            if step == 2:
                params[bad_name].grad.view(-1)[1] = float("nan")
                before = {n: params[n].detach().clone() for n in names}
            opt.step()
            assert opt.last_step_skipped == (step == 2)
        assert all(torch.equal(params[n], before[n]) for n in names)
        # one-call steps: both clean ones, and the bad one whose NaN sits in the last group
        assert calls == ([] if consensus else [2, 2] + ([2] if bad_name == "down.weight" else []))
        assert group.calls == (3 if consensus else 0)
        runs[consensus] = before
    for n in names:
        assert torch.equal(runs[False][n], runs[True][n]), n


def test_nonfinite_matrix_mode_names_unnamed_parameters_by_shape():
    """Parameters passed without model names are reported by shape, matrices and fallback ones alike."""
    w, b, ok = (torch.zeros(4, 3, requires_grad=True), torch.zeros(3, requires_grad=True),
                torch.zeros(5, 2, requires_grad=True))
    opt = SinkGD([{"params": [w, ok], "kind": "sinkgd"}, {"params": [b], "kind": "adamw"}], nonfinite="matrix")
    w.grad, b.grad, ok.grad = torch.full((4, 3), float("nan")), torch.full((3,), float("inf")), torch.ones(5, 2)
    opt.step()
    assert opt.last_skipped == ["<(4, 3) tensor>", "<(3,) tensor>"]
    assert not w.any() and not b.any() and ok.ne(0).all()


@pytest.mark.parametrize("bad_name", [None, "up.weight", "down.weight", "norm.weight", "embed_tokens.weight"])
def test_nonfinite_matrix_mode_leaves_exactly_the_bad_parameter(bad_name, caplog):
    """SinkGD(nonfinite="matrix"): a parameter whose gradient is non-finite keeps its weights and state; every
    other one steps exactly as the default optimizer steps them when that parameter has no gradient at all."""
    torch.manual_seed(0)
    model = TinyLM()
    torch.manual_seed(0)
    ref_model = TinyLM()
    opt = SinkGD(model.named_parameters(), nonfinite="matrix")
    ref = SinkGD(ref_model.named_parameters())
    params, ref_params = dict(model.named_parameters()), dict(ref_model.named_parameters())
    grads = random_grads(model, 3)
    for step, g in enumerate(grads):
        for n in params:
            params[n].grad = g[n].clone()
            ref_params[n].grad = g[n].clone()
        if step == 2 and bad_name is not None:
            params[bad_name].grad.view(-1)[2] = float("inf")
            ref_params[bad_name].grad = None
            before = params[bad_name].detach().clone()
            state = {k: v.clone() for k, v in opt.state[params[bad_name]].items()}
        with caplog.at_level("WARNING", logger="sinkgd_ds"):
            opt.step()
        ref.step()
        for n in params:
            assert torch.equal(params[n], ref_params[n]), (step, n)
    assert opt.last_skipped == ([] if bad_name is None else [bad_name])
    assert opt.last_step_skipped == (bad_name is not None) and opt.skipped_steps == (bad_name is not None)
    if bad_name is not None:
        assert torch.equal(params[bad_name], before)
        for k, v in opt.state[params[bad_name]].items():
            assert torch.equal(v, state[k]), k
        assert f"non-finite gradients in {bad_name}" in caplog.text
    assert all(not opt.state[params[n]] for n in ("up.weight", "down.weight"))  # still stateless


def test_nonfinite_mode_is_checked_and_refused_where_ranks_could_disagree():
    model = TinyLM()
    with pytest.raises(ValueError, match=r"nonfinite='matrx' is not allowed; use one of 'step', 'matrix'"):
        SinkGD(model.named_parameters(), nonfinite="matrx")
    with pytest.raises(ValueError, match=r"unknown key 'nonfinite'"):
        SCALE(model.named_parameters(), nonfinite="matrix")  # only SinkGD has the per-matrix mode
    opt = SinkGD(model.named_parameters(), nonfinite="matrix")
    with pytest.raises(ValueError, match=r"nonfinite='matrix' is only supported for unsharded parameters"):
        opt.set_layout(())
