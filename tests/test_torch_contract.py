"""The torch.optim contract, item by item, with torch's own optimizers as the yardstick where it is generic.

1. copies (copy.deepcopy, pickle) keep the whole optimizer; 2. named state dicts (param_names); 3. param
groups are the user's (schedulers with one lambda per group, add_param_group with any parameter), and
the engines' split per kind is explicit; 4. odd tensors (non-contiguous parameters accepted; complex
matrices refused, complex 1-D parameters get torch's AdamW); 5. error types as torch's; 6. torch.compile.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from sinkgd_ds import SCALE, SWAN, SinkGD

from .ds_model import OddLM
from .reference import sr_sinkhorn

CLASSES = [SinkGD, SCALE, SWAN]


def tiny(seed: int = 0) -> OddLM:
    torch.manual_seed(seed)
    return OddLM(vocab=11, d=6, ff=9)


def grads_for(model, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


def set_grads(model, seed: int) -> None:
    for n, p in model.named_parameters():
        p.grad = grads_for(model, seed)[n].clone()


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------- 1. copies
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_the_optimizer(cls, how):
    """A copy steps exactly as the original would (same settings, counters, state), on its own tensors."""
    model = tiny()
    opt = cls(model.named_parameters(), lr=0.01)
    set_grads(model, 1)
    opt.step()
    opt.skipped_steps = 3  # a counter the constructor set, carried by the copy
    holder = {"model": model, "opt": opt}
    twin = copy.deepcopy(holder) if how == "deepcopy" else pickle.loads(pickle.dumps(holder))
    for m in (model, twin["model"]):
        set_grads(m, 2)
    opt.step()
    twin["opt"].step()
    assert twin["opt"].skipped_steps == 3 and twin["opt"].param_kinds() == opt.param_kinds()
    for n, w in weights(model).items():
        assert torch.equal(w, twin["model"].state_dict()[n]), n
    assert twin["model"].up.weight is not model.up.weight
    if cls is SinkGD:
        assert copy.deepcopy(SinkGD(model.named_parameters(), nonfinite="matrix")).nonfinite == "matrix"


def test_deepcopy_of_a_sharded_optimizer_shares_its_groups():
    """The copy of an optimizer with a layout (as DeepSpeed / Megatron set one) points its specs at its own
    copied partitions and keeps the process groups (communicators are shared, never copied)."""
    from sinkgd_ds.layout import FlatMatrix, flat_partition_specs

    from .simulated import ThreadGroup

    part = torch.nn.Parameter(torch.randn(20))
    group = ThreadGroup(1).handle(0)
    opt = SinkGD([{"params": [part], "kind": "sinkgd"}], lr=0.1)
    opt.set_layout(flat_partition_specs([FlatMatrix("w", (4, 5), 0)], [(0, 20)], 0, part, group), group)
    twin = copy.deepcopy(opt)
    spec = twin._layout_specs[0]
    assert spec.fragments[0].tensor is twin.param_groups[0]["params"][0] is not part
    assert twin._consensus_group is group
    part.grad = torch.randn(20)
    twin.param_groups[0]["params"][0].grad = part.grad.clone()
    opt.step()
    twin.step()
    assert torch.equal(part, twin.param_groups[0]["params"][0])


def _pickle_sharded(rank, world):
    import torch.distributed as dist

    part = torch.nn.Parameter(torch.randn(6))
    opt = SinkGD([{"params": [part], "kind": "sinkgd"}])
    opt.set_layout((), dist.group.WORLD)
    try:
        pickle.dumps(opt)
        return None
    except TypeError as e:
        return str(e)


def test_pickling_an_optimizer_with_process_groups_says_why():
    from .distributed import spawn

    (msg,) = spawn(_pickle_sharded, 1)
    assert msg and "process groups, which cannot be pickled" in msg and "state_dict()" in msg


# ---------------------------------------------------------------------- 2. named state dicts
@pytest.mark.parametrize("cls", [*CLASSES, torch.optim.AdamW])
def test_named_state_dict_round_trip(cls):
    """Named -> unnamed -> named, as torch's AdamW allows; param_names are kept in the named state dict."""
    model = tiny()
    kw = {"lr": 0.01}
    named = cls(model.named_parameters(), **kw)
    set_grads(model, 1)
    named.step()
    sd = named.state_dict()
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]
    unnamed = cls(list(model.parameters()), **kw)
    unnamed.load_state_dict(sd)
    back = cls(model.named_parameters(), **kw)
    back.load_state_dict(unnamed.state_dict())
    assert back.state_dict()["param_groups"][0]["param_names"] == sd["param_groups"][0]["param_names"]
    for i, st in sd["state"].items():
        for k, v in st.items():
            assert torch.equal(back.state_dict()["state"][i][k], v)


# ---------------------------------------------------------------------- 3. param groups
@pytest.mark.parametrize("cls", CLASSES)
def test_param_groups_are_the_users(cls):
    model = tiny()
    named = dict(model.named_parameters())
    first = ["up.weight", "up.bias", "embed_tokens.weight"]
    groups = [{"params": [(n, named[n]) for n in first], "lr": 0.02},
              {"params": [(n, p) for n, p in named.items() if n not in first], "lr": 0.01}]
    opt = cls(groups)
    assert len(opt.param_groups) == 2
    assert [g["param_names"] for g in opt.param_groups] == [first, [n for n in named if n not in first]]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0, lambda s: 0.5 ** s])
    set_grads(model, 1)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.005]


@pytest.mark.parametrize("cls", CLASSES)
def test_add_param_group_with_a_vector_steps_it_with_adamw(cls):
    model = tiny()
    opt = cls([(n, p) for n, p in model.named_parameters() if n != "norm.bias"], lr=0.01)
    bias = model.norm.bias
    start = bias.detach().clone()
    opt.add_param_group({"params": [("norm.bias", bias)], "lr": 0.003})
    assert opt.param_kinds()["norm.bias"] == "adamw"
    ref = torch.nn.Parameter(start.clone())
    adam = torch.optim.AdamW([ref], lr=0.003, weight_decay=0.0, foreach=False)
    for seed in (1, 2):
        set_grads(model, seed)
        ref.grad = bias.grad.clone()
        opt.step()
        adam.step()
    torch.testing.assert_close(bias.detach(), ref.detach(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- 4. odd tensors
@pytest.mark.parametrize("cls", CLASSES)
def test_non_contiguous_parameter_steps_like_its_contiguous_copy(cls):
    base = torch.randn(7, 5)
    odd = torch.nn.Parameter(base.t())  # a transposed view: 5 x 7, not contiguous
    plain = torch.nn.Parameter(base.t().contiguous())
    assert not odd.is_contiguous()
    opts = [cls([("w", odd)], lr=0.1), cls([("w", plain)], lr=0.1)]
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        g = torch.randn(5, 7, generator=gen)
        odd.grad, plain.grad = g.t().contiguous().t(), g.clone()  # the grad keeps the param's strides
        for o in opts:
            o.step()
    assert torch.equal(odd.detach(), plain.detach())
    assert not odd.is_contiguous() and odd.data_ptr() == base.data_ptr()  # updated in place
    if cls is SinkGD:
        w0 = torch.nn.Parameter(torch.ones(3, 4).t())
        w0.grad = torch.arange(12.0).view(4, 3) + 1
        SinkGD([("w", w0)], lr=1.0, lr_scale=1.0, sinkhorn_iters=3).step()
        want = 1.0 - sr_sinkhorn(torch.arange(12.0).view(4, 3) + 1, 3)
        torch.testing.assert_close(w0.detach().double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
def test_complex_matrix_is_refused_at_construction(cls):
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"parameter 'w' is complex \(torch.complex64\).*real matrices only"):
        cls([("w", w), ("m", torch.nn.Parameter(torch.randn(3, 3)))])


@pytest.mark.parametrize("cls", CLASSES)
def test_complex_vector_gets_torchs_adamw(cls):
    z = torch.nn.Parameter(torch.randn(6, dtype=torch.complex64))
    ref = torch.nn.Parameter(z.detach().clone())
    m = torch.nn.Parameter(torch.randn(3, 3))
    opt = cls([("z", z), ("m", m)], lr=0.01, weight_decay=0.1)
    adam = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        g = torch.randn(6, dtype=torch.complex64, generator=gen)
        z.grad, ref.grad, m.grad = g.clone(), g.clone(), torch.randn(3, 3, generator=gen)
        opt.step()
        adam.step()
    torch.testing.assert_close(z.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    assert z.imag.ne(ref.imag.new_zeros(())).any()  # the imaginary part moved


# ---------------------------------------------------------------------- 5. error types
@pytest.mark.parametrize("cls", [*CLASSES, torch.optim.AdamW])
def test_single_tensor_is_a_type_error(cls):
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        cls(torch.nn.Parameter(torch.randn(3, 3)))


@pytest.mark.parametrize("cls", CLASSES)
def test_named_and_unnamed_cannot_mix(cls):
    a, b = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="named .* and unnamed parameters are mixed"):
        cls([("a", a), b])
    with pytest.raises(ValueError, match="named .* and unnamed parameters are mixed"):
        cls([{"params": [("a", a)]}, {"params": [b]}])
    opt = cls([("a", a)])
    with pytest.raises(ValueError, match="named .* and unnamed parameters are mixed"):
        opt.add_param_group({"params": [b]})


# ---------------------------------------------------------------------- 6. torch.compile
@pytest.mark.parametrize("cls", [SinkGD, SCALE])
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_step_matches_eager(cls, backend):
    import torch._dynamo

    torch._dynamo.reset()
    models = [tiny(), tiny()]
    opts = [cls(m.named_parameters(), lr=0.01) for m in models]
    compiled = torch.compile(opts[1].step, backend=backend)
    for seed in (1, 2, 3):
        for m in models:
            set_grads(m, seed)
        opts[0].step()
        compiled()
    for n, w in weights(models[0]).items():
        torch.testing.assert_close(models[1].state_dict()[n], w, rtol=1e-6, atol=1e-7)


def test_constructing_and_stepping_inside_a_compiled_function():
    import torch._dynamo

    torch._dynamo.reset()
    models = [tiny(), tiny()]

    def train(model):
        opt = SinkGD(model.named_parameters(), lr=0.01)
        set_grads(model, 5)
        opt.step()
        return opt

    train(models[0])
    opt = torch.compile(train, backend="eager")(models[1])
    assert isinstance(opt, SinkGD) and opt.nonfinite == "step"
    for n, w in weights(models[0]).items():
        assert torch.equal(models[1].state_dict()[n], w), n


# ---------------------------------------------------------------------- tensors the native code must not take
def _dtensor_params(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Shard, distribute_tensor

    from sinkgd_ds import kernels

    mesh = init_device_mesh("cpu", (world,))
    w = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]))
    out = {"kernels_take_it": kernels.supports(w), "kernels_take_plain": kernels.supports(torch.zeros(3))}
    SinkGD([("layer.weight", w)])  # (accepted: its layout is read from its placements)
    from torch.distributed.tensor import DTensor

    partial = torch.nn.Parameter(DTensor.from_local(torch.randn(6, 4), mesh, [Partial()]))
    try:
        SinkGD([("layer.weight", partial)])
        out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    from sinkgd_ds import SWAN

    cols = torch.nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(1)]))
    try:
        SWAN([("layer.weight", cols)])
        out["swan_error"] = None
    except ValueError as e:
        out["swan_error"] = str(e)
    return out


def test_dtensor_parameters_never_reach_native_code():
    """The native kernels never take a tensor subclass's pointer (a DTensor's used to crash the process); a
    DTensor placement whose sums cannot be completed is refused at construction, naming parameter and
    placement (the supported ones are tested in tests/test_fsdp2.py)."""
    from .distributed import spawn

    (r,) = spawn(_dtensor_params, 1)
    assert r["kernels_take_it"] is False and r["kernels_take_plain"] is True
    assert r["error"] and "'layer.weight'" in r["error"] and "Partial" in r["error"], r["error"]
    assert r["swan_error"] and "tensor parallelism" in r["swan_error"] and "Shard(dim=1)" in r["swan_error"]
