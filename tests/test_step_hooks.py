"""Our optimizers' step() keeps torch.optim's step contract (hooks, profiler range, grad mode, schedulers),
checked side by side with torch's own SGD, which gets torch's stock wrapper."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from sinkgd_ds import SCALE, SWAN, SinkGD, kernels
from sinkgd_ds.optim import step_hooks
from sinkgd_ds.optim.base import MatrixOptimizer

from .ds_model import OddLM

CLASSES = [SinkGD, SCALE, SWAN]


def make(cls):
    torch.manual_seed(0)
    model = OddLM(vocab=11, d=6, ff=9)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    if cls is torch.optim.SGD:
        return model, torch.optim.SGD(model.parameters(), lr=0.1)
    return model, cls(model.named_parameters(), lr=0.01)


def record_hooks(opt, events: list) -> list:
    """Register a pre and a post hook on ``opt`` and globally; returns the handles."""
    def hook(tag):
        def f(o, args, kwargs):
            assert o is opt and args[0] is opt  # torch passes the optimizer first in args as well
            events.append((tag, ("self", *args[1:]), dict(kwargs)))
        return f
    return [register_optimizer_step_pre_hook(hook("global pre")), opt.register_step_pre_hook(hook("pre")),
            opt.register_step_post_hook(hook("post")), register_optimizer_step_post_hook(hook("global post"))]


@pytest.mark.parametrize("cls", CLASSES)
def test_step_hooks_run_as_for_torch_optimizers(cls):
    seen = {}
    for c in (torch.optim.SGD, cls):
        _, opt = make(c)
        events: list = []
        handles = record_hooks(opt, events)
        try:
            opt.step()
            opt.step(closure=None)
        finally:
            for h in handles:
                h.remove()
        seen[c] = events
    assert [e[0] for e in seen[cls]] == ["global pre", "pre", "post", "global post"] * 2
    assert seen[cls] == seen[torch.optim.SGD]  # same order, same (args, kwargs)


@pytest.mark.parametrize("cls", CLASSES)
def test_pre_hook_may_replace_the_arguments(cls):
    for c in (torch.optim.SGD, cls):
        _, opt = make(c)
        h = opt.register_step_pre_hook(lambda o, args, kwargs: ((o,), {"closure": lambda: 42.0}))
        try:
            assert opt.step() == 42.0, c
        finally:
            h.remove()
        h = opt.register_step_pre_hook(lambda o, args, kwargs: "not a pair")
        with pytest.raises(RuntimeError, match="must return None or a tuple"):
            opt.step()
        h.remove()


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("cls", CLASSES)
def test_step_runs_without_autograd_and_restores_grad_mode(cls, kernels_on):
    prev = kernels.set_enabled(kernels_on)
    try:
        model, opt = make(cls)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert torch.is_grad_enabled()
        modes = []
        loss = opt.step(closure=lambda: modes.append(torch.is_grad_enabled()) or 1.0)
        assert loss == 1.0 and modes == [True]  # the closure runs with grad on, as in torch's optimizers
        assert torch.is_grad_enabled()
        for n, p in model.named_parameters():  # in-place updates of leaves that require grad, no graph built
            assert p.requires_grad and p.grad_fn is None
            assert not torch.equal(p.detach(), before[n]), n
        with torch.no_grad():
            opt.step()
            assert not torch.is_grad_enabled()  # the caller's mode is restored, whichever it was

        def failing():
            raise KeyError("closure failed")
        with pytest.raises(KeyError):
            opt.step(closure=failing)
        assert torch.is_grad_enabled()
    finally:
        kernels.set_enabled(prev)


def profiled_step_names(opt) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    return [e.name for e in prof.events() if e.name.startswith("Optimizer.step#")]


@pytest.mark.parametrize("cls", CLASSES)
def test_profiler_sees_one_step_range(cls):
    assert type(make(cls)[1]).step is MatrixOptimizer.step  # torch did not wrap it a second time
    assert profiled_step_names(make(torch.optim.SGD)[1]) == ["Optimizer.step#SGD.step"]
    assert profiled_step_names(make(cls)[1]) == [f"Optimizer.step#{cls.__name__}.step"]


def test_without_the_private_torch_pieces_torch_wraps_the_step(monkeypatch):
    monkeypatch.setattr(step_hooks, "_SUPPORTED", False)

    class Legacy(SinkGD):
        @step_hooks.hooked_step
        def step(self, closure=None):
            return MatrixOptimizer.step.__wrapped__(self, closure)

    assert not getattr(Legacy.__dict__["step"], "hooked", False)
    model, _ = make(SinkGD)
    opt = Legacy(model.named_parameters(), lr=0.01)
    assert getattr(Legacy.step, "hooked", False)  # torch.optim.Optimizer wrapped it
    events: list = []
    handles = record_hooks(opt, events)
    try:
        assert profiled_step_names(opt) == ["Optimizer.step#Legacy.step"]
    finally:
        for h in handles:
            h.remove()
    assert [e[0] for e in events] == ["global pre", "pre", "post", "global post"]


@pytest.mark.parametrize("cls", CLASSES)
def test_lr_scheduler_sees_the_step(cls):
    _, opt = make(cls)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lr0 = [g["lr"] for g in opt.param_groups]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [lr * 0.5 for lr in lr0]
