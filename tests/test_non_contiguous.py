"""Non-contiguous parameters and gradients on every route that writes a parameter.

torch's fused AdamW kernel reads each tensor as its flat storage in memory order, so a strided parameter (or a
gradient or moment whose strides differ from the parameter's) used to be stepped element by element in the
wrong place. Every parameter below is a non-contiguous view of a larger tensor (a strided 1-D view, a transposed
matrix, a column slice, rows taken every other one, a permuted 3-D tensor) and every one is checked against an
independent yardstick:
  * the AdamW fallback against ``torch.optim.AdamW`` (single-tensor path) on a contiguous copy, fp32;
  * SinkGD / SCALE / SWAN matrices against the dense float64 references of ``tests/reference.py``, fp32;
  * everything (fp32 and bf16 with and without stochastic rounding, every backend, both ``nonfinite`` modes,
    non-finite steps) bit for bit against the same optimizer on contiguous copies, whose own correctness the
    rest of the suite establishes; the views are written in place (same storage).
Gradients come contiguous, with the parameter's strides, or expanded (stride 0), as autograd can produce them.
"""

from __future__ import annotations

import io

import pytest
import torch

from sinkgd_ds import SCALE, SWAN, SinkGD, backends, kernels

from .reference import adamw_reference, col_rms_normalize, row_rms_normalize, sr_sinkhorn, swan

IMPLS = ["torch"]
if kernels.available():
    IMPLS.append("native")
if backends.triton_available() is None and (torch.cuda.is_available() or backends.interpreting()):
    IMPLS.append("triton")

FALLBACK = [r"^fb\."]  # (SinkGD / SWAN: these names go to AdamW whatever their rank)


def _views(seed: int, dtype: torch.dtype, with_cube: bool) -> dict[str, torch.Tensor]:
    """Named non-contiguous views (each of its own larger storage), in the roles of a small LM."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    views = {
        "embed_tokens.weight": rand(22, 6)[::2],            # every other row: 11 x 6
        "layers.0.up.weight": rand(6, 9).t(),               # transposed: 9 x 6
        "layers.0.down.weight": rand(6, 14)[:, 3:12],       # a column slice: 6 x 9
        "layers.0.norm.weight": rand(6, 2)[..., 0],         # a strided vector
        "layers.0.bias": rand(3, 9)[1, ::2].clone()[1:],    # a vector at a storage offset (contiguous) ...
        "layers.0.gate": rand(10, 3)[:, 1],                 # ... and a strided column
        "lm_head.weight": rand(6, 11).t(),                  # transposed head (SCALE's momentum)
    }
    if with_cube:
        views["fb.cube"] = rand(2, 3, 4).permute(2, 0, 1)   # 4 x 2 x 3, routed to AdamW by name
    return views


def _params(seed: int, dtype: torch.dtype, with_cube: bool, contiguous: bool) -> dict[str, torch.nn.Parameter]:
    out = {}
    for n, v in _views(seed, dtype, with_cube).items():
        out[n] = torch.nn.Parameter(v.contiguous() if contiguous else v)
    return out


def _grad(name: str, shape: torch.Size, gen: torch.Generator, how: str, bad: bool) -> torch.Tensor:
    """A gradient of ``shape`` made contiguous, transposed in memory, or expanded along its first dimension."""
    if how == "expanded" and len(shape) >= 2:
        g = torch.randn(1, *shape[1:], generator=gen).expand(*shape)
    elif how == "strided" and len(shape) >= 2:
        g = torch.randn(*reversed(shape), generator=gen).permute(*reversed(range(len(shape))))
    elif how == "strided":
        g = torch.randn(shape[0], 3, generator=gen)[:, 1]
    else:
        g = torch.randn(*shape, generator=gen)
    if bad:
        g = g.clone()
        g[(0,) * g.dim()] = float("inf")
    return g


def _grads(names_shapes, seed: int, how: str, bad_name: str | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: _grad(n, s, gen, how, n == bad_name) for n, s in names_shapes}


def _set_grads(params: dict[str, torch.nn.Parameter], grads: dict[str, torch.Tensor]) -> None:
    """The views get their gradients as made (strided, expanded); contiguous parameters contiguous copies, as
    a contiguous model's autograd would give them."""
    for n, p in params.items():
        g = grads[n].to(p.dtype) if grads[n].dtype != p.dtype else grads[n]
        p.grad = g.contiguous() if p.is_contiguous() else g


def _run(cls, params: dict[str, torch.nn.Parameter], steps: list[dict[str, torch.Tensor]], **kw):
    opt = cls(list(params.items()), **kw)
    for grads in steps:
        _set_grads(params, grads)
        opt.step()
    return opt


def _kwargs(cls, implementation: str, nonfinite: str | None) -> dict:
    kw = dict(lr=0.01, weight_decay=0.1, implementation=implementation)
    if cls is not SCALE:
        kw["fallback_patterns"] = [*FALLBACK, r"embed", r"lm_head"]
    if nonfinite is not None:
        kw["nonfinite"] = nonfinite
    return kw


def _assert_views_kept(params: dict[str, torch.nn.Parameter], bases: dict[str, tuple[int, tuple[int, ...]]]):
    """The parameters are still the same non-contiguous views of the same storage (updated in place)."""
    for n, p in params.items():
        assert (p.data_ptr(), p.stride()) == bases[n], n


# ---------------------------------------------------------------------------------------------- the regression
def test_strided_vector_on_the_adamw_fallback_equals_torch_adamw():
    """The case of the report: Parameter(randn(10, 2)[..., 0]) beside a matrix, three steps of lr 0.01."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4))
    b = torch.nn.Parameter(torch.randn(10, 2)[..., 0])
    assert not b.is_contiguous()
    start = b.detach().clone()
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(10, generator=gen) for _ in range(3)]
    for cls in (SinkGD, SCALE, SWAN):
        b.data = start.clone().repeat_interleave(2).view(10, 2)[..., 0]  # a fresh strided view each time
        opt = cls([w, b], lr=0.01, weight_decay=0.01)
        for g in grads:
            w.grad, b.grad = torch.randn(6, 4, generator=gen), g.clone()
            opt.step()
        want = adamw_reference(start, grads, 0.01, (0.9, 0.999), 1e-8, 0.01)
        torch.testing.assert_close(b.detach(), want, rtol=1e-6, atol=1e-7)


def test_strided_bias_makes_the_loss_fall_as_the_contiguous_one():
    """weight.mv(x) + bias, the report's second case: the strided bias follows the contiguous run exactly."""
    gen = torch.Generator().manual_seed(2)
    w0, b0 = torch.randn(8, 5, generator=gen), torch.randn(8, generator=gen)
    x, y = torch.randn(5, generator=gen), torch.randn(8, generator=gen)
    losses = {}
    for strided in (False, True):
        w = torch.nn.Parameter(w0.clone())
        b = torch.nn.Parameter(torch.stack([b0, b0], 1)[:, 0] if strided else b0.clone())
        assert b.is_contiguous() != strided
        opt = SinkGD([("w", w), ("b", b)], lr=1e-3)
        run = []
        for _ in range(20):
            opt.zero_grad()
            loss = ((w.mv(x) + b - y) ** 2).sum()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses[strided] = (run, b.detach().clone())
    assert losses[True][0] == losses[False][0]
    assert torch.equal(losses[True][1], losses[False][1])
    assert losses[True][0][-1] < losses[True][0][0]


# ---------------------------------------------------------------------------------------------- fp32, references
@pytest.mark.parametrize("how", ["contiguous", "strided", "expanded"])
@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("cls", [SinkGD, SCALE, SWAN])
def test_every_route_against_the_dense_references(cls, implementation, how):
    """Three fp32 steps on non-contiguous views: each parameter against its independent reference."""
    params = _params(3, torch.float32, cls is not SCALE, contiguous=False)
    init = {n: p.detach().double().clone() for n, p in params.items()}
    bases = {n: (p.data_ptr(), p.stride()) for n, p in params.items()}
    shapes = [(n, p.shape) for n, p in params.items()]
    steps = [_grads(shapes, 10 + i, how) for i in range(3)]
    kw = _kwargs(cls, implementation, None)
    _run(cls, params, steps, **kw)
    _assert_views_kept(params, bases)
    lr, wd, scale = 0.01, 0.1, 0.05
    mom = None
    for n, p in params.items():
        gs = [s[n].double() for s in steps]
        if p.dim() < 2 or n.startswith("fb.") or (cls is not SCALE and ("embed" in n or "lm_head" in n)):
            want = adamw_reference(init[n], gs, lr, (0.9, 0.999), 1e-8, wd)
            torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6, msg=n)
            continue
        w = init[n]
        if cls is SCALE and "lm_head" in n:
            mom = torch.zeros_like(w)
        for g in gs:
            if cls is SinkGD:
                d = sr_sinkhorn(g, 5)
            elif cls is SWAN:
                d = swan(g, 5)
            elif "lm_head" in n:
                mom = 0.9 * mom + 0.1 * g
                d = row_rms_normalize(mom)
            elif "embed" in n:
                d = col_rms_normalize(g)
            else:
                d = row_rms_normalize(g)
            w = w * (1 - lr * scale * wd) - lr * scale * d
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-5, msg=n)


# ---------------------------------------------------------------------------------------------- bit for bit
@pytest.mark.parametrize("dtype,rounding", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("cls,nonfinite", [(SinkGD, "step"), (SinkGD, "matrix"), (SCALE, None), (SWAN, None)])
def test_views_step_bit_for_bit_as_contiguous_copies(cls, nonfinite, implementation, dtype, rounding):
    """Four steps, the third with an inf in the strided head's (or norm's) gradient: the views end bitwise equal
    to the same run on contiguous copies, and the skipped step (whole, or just that parameter) wrote nothing."""
    runs = {}
    bad = "lm_head.weight" if cls is SCALE else "layers.0.norm.weight"
    for contiguous in (False, True):
        params = _params(4, dtype, cls is not SCALE, contiguous)
        bases = {n: (p.data_ptr(), p.stride()) for n, p in params.items()}
        shapes = [(n, p.shape) for n, p in params.items()]
        steps = [_grads(shapes, 20 + i, "strided" if i % 2 else "expanded", bad if i == 2 else None)
                 for i in range(4)]
        kw = {**_kwargs(cls, implementation, nonfinite), "stochastic_rounding": rounding}
        opt = _run(cls, params, steps[:2], **kw)
        before = {n: p.detach().clone() for n, p in params.items()}
        _set_grads(params, steps[2])
        opt.step()
        assert opt.last_step_skipped
        for n, p in params.items():
            changed = not torch.equal(p.detach(), before[n])
            assert changed == (nonfinite == "matrix" and n != bad), n
        _set_grads(params, steps[3])
        opt.step()
        if not contiguous:
            _assert_views_kept(params, bases)
        runs[contiguous] = ({n: p.detach().clone() for n, p in params.items()},
                            {n: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
                             for n, p in params.items()})
    for n, w in runs[True][0].items():
        assert torch.equal(runs[False][0][n], w), n
        for key, value in runs[True][1][n].items():
            assert torch.equal(runs[False][1][n][key].contiguous(), value.contiguous()), (n, key)


@pytest.mark.parametrize("cls", [SinkGD, SCALE, SWAN])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_of_views_saves_loads_and_resumes_bit_for_bit(cls, dtype):
    """Stop after two steps, save the optimizer (torch.save, read back with weights_only=True), rebuild the views
    and the optimizer, load, two more steps: equal to four uninterrupted steps, bit for bit."""
    shapes = [(n, p.shape) for n, p in _params(5, dtype, cls is not SCALE, False).items()]
    steps = [_grads(shapes, 30 + i, "strided") for i in range(4)]
    kw = _kwargs(cls, "auto", None)
    straight = _params(5, dtype, cls is not SCALE, False)
    _run(cls, straight, steps, **kw)

    first = _params(5, dtype, cls is not SCALE, False)
    opt = _run(cls, first, steps[:2], **kw)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "w": {n: p.detach() for n, p in first.items()}}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    second = _params(5, dtype, cls is not SCALE, False)
    with torch.no_grad():
        for n, p in second.items():
            p.copy_(saved["w"][n])
    assert not second["layers.0.up.weight"].is_contiguous()
    resumed = cls(list(second.items()), **kw)
    resumed.load_state_dict(saved["opt"])
    for grads in steps[2:]:
        _set_grads(second, grads)
        resumed.step()
    for n, p in straight.items():
        assert torch.equal(second[n].detach(), p.detach()), n


# ---------------------------------------------------------------------------------------------- a tensor lr
@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("cls", [SinkGD, SCALE, SWAN])
def test_one_element_tensor_lr_steps_as_the_number(cls, implementation):
    """As torch's optimizers: a 1-element tensor lr (0-d or shape (1,)) is accepted, steps exactly as the float it
    holds (float64 tensors here: a float32 one holds 0.01 only to 7 digits, and steps as that value), and a
    scheduler changes it in place."""
    finals = []
    for lr in (0.01, torch.tensor(0.01, dtype=torch.float64), torch.tensor([0.01], dtype=torch.float64)):
        params = _params(6, torch.float32, cls is not SCALE, False)
        shapes = [(n, p.shape) for n, p in params.items()]
        kw = {**_kwargs(cls, implementation, None), "lr": lr}
        opt = cls(list(params.items()), **kw)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
        for i in range(3):
            _set_grads(params, _grads(shapes, 40 + i, "contiguous"))
            opt.step()
            sched.step()
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == isinstance(lr, torch.Tensor)
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.01 / 4)
        finals.append({n: p.detach().clone() for n, p in params.items()})
    for other in finals[1:]:
        for n, w in finals[0].items():
            assert torch.equal(other[n], w), n


@pytest.mark.parametrize("cls", [SinkGD, SCALE, SWAN, torch.optim.AdamW])
def test_tensor_lr_of_more_than_one_element_is_refused_with_torchs_words(cls):
    params = [torch.nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        cls(params, lr=torch.tensor([0.01, 0.02]))
    if cls is not torch.optim.AdamW:
        with pytest.raises(ValueError, match=r"lr=-0.5.*must be >= 0"):
            cls(params, lr=torch.tensor(-0.5))
