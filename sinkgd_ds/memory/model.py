"""The memory model: bytes per rank and category, predicted from a model shape, optimizer, engine, world size
and precision, following each engine's own partitioning and padding rules (what :func:`account` measures).

Engines, with the rules each follows (DeepSpeed 0.19.8 and megatron-core 0.16.1 defaults, as the main job
uses them):
  * ``zero0``: DeepSpeed stage 0. fp32: the optimizer steps the model's tensors. bf16: ``FP16_UnfusedOptimizer``
    keeps an fp32 copy of every parameter (DeepSpeed picks it for stage 0 + bf16; ``BF16_Optimizer`` is for
    stage 1 with fp32 gradient accumulation, ``grad_accum="fp32"`` here).
  * ``zero1`` / ``zero2``: one flat buffer per param group, padded to a multiple of 2 x world
    (``nccl_start_alignment_factor``), cut into equal partitions; the fp32 master, the optimizer state and
    the reduced gradients cover this rank's partition. The reduced gradient buffer holds *whole* parameters
    for every parameter that overlaps the partition (``grads_in_partition``), plus zero padding.
  * ``zero3``: every parameter cut on its own into ``ceil(numel / world)`` elements per rank; parameters of at
    most ``stage3_param_persistence_threshold`` (1e5) elements also stay whole on every rank (with more than
    one rank); the fp32 master is always a separate copy (DeepSpeed compares the device with a string, which
    never matches, so even fp32 gets one); one gradient partition buffer in the model dtype.
  * ``megatron``: DDP with ``grad_reduce_in_fp32`` (fp32 gradient buffer of every parameter); bf16 keeps fp32
    masters of everything (``Float16OptimizerWithFloat16Params``), fp32 steps the model's tensors.
  * ``megatron-distopt``: one contiguous buffer (no ``overlap_grad_reduce``: one bucket), parameters in
    reverse order, each starting at a multiple of 64 elements, the end padded to lcm(world, 128); param and
    fp32 gradient buffers of that size on every rank; rank r owns elements [r S, (r+1) S) of it for its fp32
    masters (bf16 only; fp32 masters are views of the params) and optimizer state.
  * ``fsdp2``: torch's ``fully_shard`` per decoder layer and on the model (launch/fsdp_engine.py): dim-0 chunks,
    fp32 parameters and gradients whatever the compute dtype.
  * ``torch``: a plain model and optimizer (single process or DDP): the optimizer steps the model's tensors.
Optimizer state: AdamW keeps exp_avg and exp_avg_sq (fp32; bf16 for the ``torch`` engine in bf16) plus a
4-byte step per tensor it steps (a flat partition under ZeRO-1/2/3, a parameter piece under Megatron, a parameter
otherwise); SCALE keeps one momentum of the LM head; SinkGD and SWAN keep none. Routing is the optimizers' own
(sinkgd_ds.optim): 1-D params, embeddings and the LM head on AdamW (SCALE: 1-D params only, embedding and head
its own).
Not modelled, as not counted by :func:`account`: communication buckets, step transients, activations.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate

from ..optim.base import ADAMW, DEFAULT_FALLBACK_PATTERNS
from ..optim.scale import EMBED_PATTERNS, HEAD_PATTERNS, SCALE_EMBED, SCALE_HEAD, SCALE_MATRIX
from .accounting import CATEGORIES, GRADIENTS, KEYS, MASTER, STATE_ADAMW, STATE_MATRICES, WEIGHTS
from .shapes import LlamaShape, Param, hf_params, megatron_params

__all__ = ["ENGINES", "OPTIMIZERS", "PRECISIONS", "Setup", "estimate", "estimate_ranks", "param_kinds"]

OPTIMIZERS = ("sinkgd", "scale", "swan", "adamw")
ENGINES = ("zero0", "zero1", "zero2", "zero3", "megatron-distopt", "megatron", "fsdp2", "torch")
PRECISIONS = ("fp32", "bf16")
FP32 = 4  # bytes of masters, fp32 gradients and every optimizer state tensor
STEP = 4  # AdamW's step counter: a 0-dim fp32 tensor per stepped tensor


@dataclass(frozen=True)
class Setup:
    optimizer: str
    engine: str
    world: int
    precision: str = "bf16"
    grad_accum: str | None = None  # "fp32": ZeRO-1 + bf16 through DeepSpeed's BF16_Optimizer
    persistence_threshold: int = 100_000  # ZeRO-3 stage3_param_persistence_threshold
    sub_group_size: int = 1_000_000_000  # ZeRO-3 sub_group_size

    def __post_init__(self) -> None:
        for value, allowed, option in ((self.optimizer, OPTIMIZERS, "--optimizer"), (self.engine, ENGINES, "--engine"),
                                       (self.precision, PRECISIONS, "--precision")):
            if value not in allowed:
                raise ValueError(f"{option} {value!r} is not allowed; use one of {', '.join(allowed)}")
        if not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"--world {self.world!r} must be a positive integer (ranks)")
        if self.grad_accum not in (None, "fp32") or (self.grad_accum and (self.engine, self.precision) !=
                                                      ("zero1", "bf16")):
            raise ValueError(f"grad_accum={self.grad_accum!r}: only 'fp32' with --engine zero1 --precision bf16 "
                             "(DeepSpeed's BF16_Optimizer)")

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


def param_kinds(optimizer: str, params: list[Param]) -> list[str]:
    """The kind each parameter is stepped by, as sinkgd_ds.optim routes it."""
    fallback = [re.compile(p) for p in DEFAULT_FALLBACK_PATTERNS]
    head, embed = [re.compile(p) for p in HEAD_PATTERNS], [re.compile(p) for p in EMBED_PATTERNS]
    out = []
    for p in params:
        matrix = len(p.shape) >= 2
        if optimizer == "adamw" or not matrix:
            out.append(ADAMW)
        elif optimizer == "scale":
            out.append(SCALE_HEAD if any(r.search(p.name) for r in head) else
                       SCALE_EMBED if any(r.search(p.name) for r in embed) else SCALE_MATRIX)
        else:
            out.append(ADAMW if any(r.search(p.name) for r in fallback) else optimizer)
    return out


def state_bytes(kind: str, numel: int, dtype_bytes: int = FP32) -> int:
    """Optimizer state of one stepped tensor of ``numel`` elements (state tensors take the stepped tensor's
    dtype: fp32 masters everywhere except the plain ``torch`` engine in bf16)."""
    if kind == ADAMW:
        return 2 * dtype_bytes * numel + STEP
    if kind == SCALE_HEAD:
        return dtype_bytes * numel
    return 0


def add_state(out: dict[str, int], kind: str, numel: int, dtype_bytes: int = FP32) -> None:
    out[STATE_ADAMW if kind == ADAMW else STATE_MATRICES] += state_bytes(kind, numel, dtype_bytes)


def engine_groups(params: list[Param], kinds: list[str]) -> list[tuple[str, list[Param]]]:
    """The param groups DeepSpeed flattens: one per kind, in order of first appearance (our optimizers are
    built inside ``engine_param_groups``); the AdamW baseline has a single group."""
    groups: dict[str, list[Param]] = {}
    for p, k in zip(params, kinds):
        groups.setdefault(k, []).append(p)
    return list(groups.items())


def _empty() -> dict[str, int]:
    return dict.fromkeys(CATEGORIES, 0)


# ---------------------------------------------------------------------- plain torch (one process, or DDP)
def plain_torch(params: list[Param], kinds: list[str], s: Setup, rank: int) -> dict[str, int]:
    """The optimizer steps the model's own tensors (bf16: pure bf16 training, state in bf16 too)."""
    out = _empty()
    for p, k in zip(params, kinds):
        out[WEIGHTS] += p.numel * s.dtype_bytes
        out[GRADIENTS] += p.numel * s.dtype_bytes
        add_state(out, k, p.numel, s.dtype_bytes)
    return out


def fsdp2(params: list[Param], kinds: list[str], s: Setup, rank: int) -> dict[str, int]:
    """torch FSDP2 (launch/fsdp_engine.py): every parameter cut along dim 0 into ``ceil(rows / world)``-row
    chunks, each rank's chunk stored padded to that size; parameters and gradients stay fp32 (bf16 is the
    compute dtype of the mixed-precision policy, gradients are reduced in fp32); no master copy. Optimizer state
    covers the rank's unpadded rows."""
    out = _empty()
    for p, k in zip(params, kinds):
        rows, rest = p.shape[0], p.numel // p.shape[0]
        chunk = math.ceil(rows / s.world)
        out[WEIGHTS] += chunk * rest * FP32
        out[GRADIENTS] += chunk * rest * FP32
        add_state(out, k, max(0, min(chunk, rows - rank * chunk)) * rest)
    return out


# ---------------------------------------------------------------------- DeepSpeed
def zero0(params: list[Param], kinds: list[str], s: Setup, rank: int) -> dict[str, int]:
    out = _empty()
    for p, k in zip(params, kinds):
        out[WEIGHTS] += p.numel * s.dtype_bytes
        out[GRADIENTS] += p.numel * s.dtype_bytes
        out[MASTER] += p.numel * FP32 if s.precision == "bf16" else 0
        add_state(out, k, p.numel)
    return out


def zero12(params: list[Param], kinds: list[str], s: Setup, rank: int) -> dict[str, int]:
    out = _empty()
    b, w = s.dtype_bytes, s.world
    for kind, group in engine_groups(params, kinds):
        numels = [p.numel for p in group]
        aligned = math.ceil(sum(numels) / (2 * w)) * (2 * w)
        size = aligned // w
        out[WEIGHTS] += aligned * b
        out[MASTER] += size * FP32
        add_state(out, kind, size)
        if s.grad_accum == "fp32":  # BF16_Optimizer: fp32 accumulation buffer of the whole flat group, and
            # each parameter's bf16 .grad until the step (immediate_grad_update is off by default)
            out[GRADIENTS] += aligned * FP32 + sum(numels) * b
        else:
            out[GRADIENTS] += reduced_partition_bytes(numels, size, rank, b)
    return out


def reduced_partition_bytes(numels: list[int], size: int, rank: int, dtype_bytes: int) -> int:
    """ZeRO-1/2 ``averaged_gradients`` of one group: every parameter that overlaps partition ``rank`` whole
    (``grads_in_partition``), and zeros for the rest of the partition (``get_flat_partition``)."""
    start, end = rank * size, (rank + 1) * size
    held = filled = 0
    for offset, numel in zip(accumulate([0, *numels]), numels):
        if start <= offset < end or offset < start < offset + numel:  # (get_partition_info's test)
            held += numel
            filled += min(offset + numel, end) - max(offset, start)
    return (held + (size - filled)) * dtype_bytes


def zero3(params: list[Param], kinds: list[str], s: Setup, rank: int) -> dict[str, int]:
    out = _empty()
    b, w = s.dtype_bytes, s.world
    for kind, group in engine_groups(params, kinds):
        sub = 0
        for i, p in enumerate(group):
            part = math.ceil(p.numel / w)
            persistent = w > 1 and p.numel <= s.persistence_threshold  # (one rank: the partition is the param)
            out[WEIGHTS] += part * b + (p.numel * b if persistent else 0)
            out[GRADIENTS] += part * b
            out[MASTER] += part * FP32
            sub += part
            if sub >= s.sub_group_size or i == len(group) - 1:  # (_create_fp16_sub_groups)
                add_state(out, kind, sub)
                sub = 0
    return out


# ---------------------------------------------------------------------- Megatron
def megatron(params: list[Param], kinds: list[str], s: Setup, rank: int) -> dict[str, int]:
    out = _empty()
    for p, k in zip(params, kinds):
        out[WEIGHTS] += p.numel * s.dtype_bytes
        out[GRADIENTS] += p.numel * FP32
        out[MASTER] += p.numel * FP32 if s.precision == "bf16" else 0
        add_state(out, k, p.numel)
    return out


def megatron_buffer(params: list[Param], world: int) -> tuple[list[tuple[int, int]], int]:
    """(start, end) of every parameter in DistOpt's buffer (in ``params`` order) and the padded size."""
    ranges: list[tuple[int, int]] = [(0, 0)] * len(params)
    index = 0
    for i in reversed(range(len(params))):
        start = math.ceil(index / 64) * 64
        ranges[i] = (start, start + params[i].numel)
        index = start + params[i].numel
    divisor = math.lcm(world, 128)
    return ranges, math.ceil(index / divisor) * divisor


def megatron_distopt(params: list[Param], kinds: list[str], s: Setup, rank: int) -> dict[str, int]:
    out = _empty()
    ranges, padded = megatron_buffer(params, s.world)
    out[WEIGHTS] = padded * s.dtype_bytes
    out[GRADIENTS] = padded * FP32
    size = padded // s.world
    lo, hi = rank * size, (rank + 1) * size
    for (start, end), kind in zip(ranges, kinds):
        piece = min(end, hi) - max(start, lo)
        if piece > 0:
            out[MASTER] += piece * FP32 if s.precision == "bf16" else 0
            add_state(out, kind, piece)
    return out


_ENGINE_RULES = {"zero0": zero0, "zero1": zero12, "zero2": zero12, "zero3": zero3, "megatron": megatron,
                 "megatron-distopt": megatron_distopt, "fsdp2": fsdp2, "torch": plain_torch}


def model_params(shape: LlamaShape, engine: str) -> list[Param]:
    return megatron_params(shape) if engine.startswith("megatron") else hf_params(shape)


def estimate(shape: LlamaShape, setup: Setup, rank: int = 0) -> dict[str, int]:
    """Predicted bytes on ``rank`` by category (the keys of :func:`account`), between backward and step."""
    if not 0 <= rank < setup.world:
        raise ValueError(f"rank {rank} is not in [0, world={setup.world})")
    return dict(_estimate(shape, setup, (rank,))[0])


def estimate_ranks(shape: LlamaShape, setup: Setup) -> list[dict[str, int]]:
    """:func:`estimate` for every rank."""
    return [dict(d) for d in _estimate(shape, setup, None)]


@lru_cache(maxsize=4096)
def _estimate(shape: LlamaShape, setup: Setup, ranks: tuple[int, ...] | None) -> tuple[dict[str, int], ...]:
    """Per rank (default: every rank), routing the parameters once; cached (the tables ask again and again)."""
    params = model_params(shape, setup.engine)
    kinds = param_kinds(setup.optimizer, params)
    out = []
    for rank in range(setup.world) if ranks is None else ranks:
        counts = _ENGINE_RULES[setup.engine](params, kinds, setup, rank)
        counts["total"] = sum(counts[k] for k in CATEGORIES)
        out.append({k: counts[k] for k in KEYS})
    return tuple(out)
