"""Tables of the memory model: one setup with the four optimizers side by side, the largest model of the family
that fits a GPU, and the Markdown tables of docs/memory.md (``--table``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .accounting import CATEGORIES, KEYS
from .model import OPTIMIZERS, Setup, estimate_ranks, model_params
from .shapes import FAMILY, LlamaShape

GIB = 2**30
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size / allreduce_bucket_size (elements)
LABELS = {"weights": "weights", "gradients": "gradients", "master_weights": "fp32 masters",
          "optimizer_state_matrices": "state: matrix optimizer", "optimizer_state_adamw": "state: AdamW",
          "total": "total"}
NAMES = {"sinkgd": "SinkGD", "scale": "SCALE", "swan": "SWAN", "adamw": "AdamW"}


def param_count(shape: LlamaShape, engine: str = "zero1") -> int:
    return sum(p.numel for p in model_params(shape, engine))


def busiest_rank(shape: LlamaShape, setup: Setup) -> tuple[int, dict[str, int]]:
    """The rank holding the most bytes (ranks differ by where partitions cut) and its dict."""
    ranks = estimate_ranks(shape, setup)
    rank = max(range(len(ranks)), key=lambda r: ranks[r]["total"])
    return rank, ranks[rank]


def peak_reserve(shape: LlamaShape, setup: Setup, bucket: int = DS_REDUCE_BUCKET) -> int:
    """Bytes a rank needs at its peak beyond the counted categories (which :func:`account` sees between backward
    and step), for the fit search: DeepSpeed's communication buckets (ZeRO-1/2 allocate one reduce bucket of
    ``reduce_bucket_size`` elements for every backward, ZeRO-3 keeps one for the run, stage 0 flattens up to
    ``allreduce_bucket_size`` gradient elements at a time) and, for ZeRO-1, the whole model's gradients, which
    stay on every rank until the end of backward reduces them into the partition. Megatron's buckets are views
    of its (counted) gradient buffer. Not included: ZeRO-3's gathered parameters (a layer or two at a time), the
    fp32 gradient copies ``step()`` makes, allocator fragmentation."""
    if not setup.engine.startswith("zero"):  # (FSDP2 gathers one layer at a time: part of the transients)
        return 0
    n = param_count(shape)
    buckets = (min(bucket, n) if setup.engine == "zero0" else bucket) * setup.dtype_bytes
    return buckets + (n * setup.dtype_bytes if setup.engine == "zero1" and setup.grad_accum is None else 0)


def precision_label(setup: Setup) -> str:
    if setup.precision == "fp32":
        return "fp32"
    return {"torch": "pure bf16 (no masters; optimizer state in bf16)",
            "fsdp2": "bf16 compute (FSDP2 keeps fp32 sharded parameters and gradients)"}.get(
        setup.engine, "bf16 (fp32 masters)")


def side_by_side(shape: LlamaShape, name: str, setup: Setup, optimizers: tuple[str, ...] = OPTIMIZERS) -> str:
    """Bytes per parameter and GiB on the busiest rank, by category, one column pair per optimizer."""
    n = param_count(shape, setup.engine)
    cols = {opt: busiest_rank(shape, replace(setup, optimizer=opt)) for opt in optimizers}
    head = "| category | " + " | ".join(f"{NAMES[o]} B/param | {NAMES[o]} GiB" for o in optimizers) + " |"
    rule = "|---|" + "---:|---:|" * len(optimizers)
    rows = [head, rule]
    for key in KEYS:
        cells = " | ".join(f"{cols[o][1][key] / n:.3f} | {cols[o][1][key] / GIB:.3f}" for o in optimizers)
        label = f"**{LABELS[key]}**" if key == "total" else LABELS[key]
        rows.append(f"| {label} | {cells} |")
    ranks = ", ".join(f"{NAMES[o]} rank {cols[o][0]}" for o in optimizers)
    return (f"{name}: {n:,} parameters (hidden {shape.hidden}, intermediate {shape.intermediate}, heads "
            f"{shape.heads}/{shape.kv_heads} kv, layers {shape.layers}, vocab {shape.vocab}, "
            f"{'tied' if shape.tie_embeddings else 'untied'} embeddings); engine {setup.engine}, world {setup.world}, "
            f"{precision_label(setup)}\n"
            f"per rank, the busiest rank ({ranks}); B/param = bytes on that rank / parameters of the model\n\n"
            + "\n".join(rows))


@dataclass(frozen=True)
class Fit:
    name: str
    params: int
    total: int
    reserve: int
    fits: bool


def fits(setup: Setup, gpu_gib: float, activation_gib: float, vocab: int | None = None) -> list[Fit]:
    """Every family member (its vocab, or ``vocab``) against ``gpu_gib``: busiest-rank total + communication
    buckets + the activation budget must fit."""
    out = []
    for name, shape in FAMILY.items():
        shape = shape if vocab is None else replace(shape, vocab=vocab)
        total = busiest_rank(shape, setup)[1]["total"]
        reserve = peak_reserve(shape, setup)
        out.append(Fit(name, param_count(shape, setup.engine), total, reserve,
                       total + reserve + activation_gib * GIB <= gpu_gib * GIB))
    return out


def fit_table(setup: Setup, gpu_gib: float, activation_gib: float, vocab: int | None = None,
              optimizers: tuple[str, ...] = OPTIMIZERS) -> str:
    """Per optimizer: the largest member of the family that fits, and every member's GiB per rank."""
    results = {o: fits(replace(setup, optimizer=o), gpu_gib, activation_gib, vocab) for o in optimizers}
    names = list(FAMILY)
    rows = ["| model | params | " + " | ".join(f"{NAMES[o]} GiB/rank" for o in optimizers) + " |",
            "|---|---:|" + "---:|" * len(optimizers)]
    for i, name in enumerate(names):
        cells = []
        for o in optimizers:
            f = results[o][i]
            cells.append(f"{(f.total + f.reserve) / GIB:.2f}{'' if f.fits else ' (no)'}")
        rows.append(f"| {name} | {results[optimizers[0]][i].params / 1e9:.3f}B | " + " | ".join(cells) + " |")
    largest = []
    for o in optimizers:
        ok = [f.name for f in results[o] if f.fits]
        largest.append(f"{NAMES[o]}: {ok[-1] if ok else 'none'}")
    where = f"{setup.engine}, world {setup.world}, {precision_label(setup)}"
    return (f"largest LLaMA of the family that fits {gpu_gib:g} GiB with an activation budget of {activation_gib:g} "
            f"GiB per rank ({where}): " + "; ".join(largest) + "\n"
            "(GiB/rank = counted categories on the busiest rank + what its peak adds: DeepSpeed's reduce bucket of "
            f"{DS_REDUCE_BUCKET:.0e} elements, ZeRO-1's whole gradients during backward; '(no)': does not fit)\n\n"
            + "\n".join(rows))


# ---------------------------------------------------------------------- docs/memory.md
TABLE_MODELS = ("60m", "130m", "350m", "1b", "7b")
TABLE_WORLDS = (8, 64)
# ZeRO-1 and ZeRO-2 hold the same bytes between backward and step (ZeRO-1 differs in its backward peak, see the fit
# table): one column set for both
TABLE_ENGINES = {"ZeRO-1/2": "zero2", "ZeRO-3": "zero3", "Megatron DistOpt": "megatron-distopt"}
FIT_GPU_GIB, FIT_ACTIVATION_GIB = 80.0, 16.0


def markdown_tables(precision: str = "bf16") -> str:
    """The generated part of docs/memory.md: totals, every category per model, the fit search."""
    opts = " | ".join(NAMES[o] for o in OPTIMIZERS)
    out = [f"### Total GiB per rank ({precision}{', fp32 masters' if precision == 'bf16' else ''}; busiest rank)\n",
           "| model | GPUs | " + " | ".join(f"{e} {NAMES[o]}" for e in TABLE_ENGINES for o in OPTIMIZERS) + " |",
           "|---|---:|" + "---:|" * (len(TABLE_ENGINES) * len(OPTIMIZERS))]
    for name in TABLE_MODELS:
        for world in TABLE_WORLDS:
            cells = [busiest_rank(FAMILY[name], Setup(o, e, world, precision))[1]["total"] / GIB
                     for e in TABLE_ENGINES.values() for o in OPTIMIZERS]
            out.append(f"| {name} | {world} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    for name in TABLE_MODELS:
        shape = FAMILY[name]
        out += ["", f"### {name}: {param_count(shape):,} parameters (hidden {shape.hidden}, intermediate "
                f"{shape.intermediate}, layers {shape.layers}, vocab {shape.vocab}): GiB per rank by category\n",
                "| engine | GPUs | optimizer | " + " | ".join(LABELS[k] for k in CATEGORIES) + " | **total** | "
                "total B/param |", "|---|---:|---|" + "---:|" * (len(CATEGORIES) + 2)]
        for label, engine in TABLE_ENGINES.items():
            n = param_count(shape, engine)
            for world in TABLE_WORLDS:
                for opt in OPTIMIZERS:
                    rank = busiest_rank(shape, Setup(opt, engine, world, precision))[1]
                    cells = " | ".join(f"{rank[k] / GIB:.3f}" for k in CATEGORIES)
                    out.append(f"| {label} | {world} | {NAMES[opt]} | {cells} | **{rank['total'] / GIB:.3f}** | "
                               f"{rank['total'] / n:.3f} |")
    out += ["", f"### Largest model of the family that fits {FIT_GPU_GIB:g} GiB with {FIT_ACTIVATION_GIB:g} GiB of "
            "activations per rank\n", "(in brackets: its busiest rank's counted bytes + peak reserve, without the "
            "activations; the family ends at 65b)\n", f"| engine | GPUs | {opts} |",
            "|---|---:|" + "---|" * len(OPTIMIZERS)]
    for engine in ("zero1", "zero2", "zero3", "megatron-distopt"):
        for world in TABLE_WORLDS:
            cells = []
            for opt in OPTIMIZERS:
                ok = [f for f in fits(Setup(opt, engine, world, precision), FIT_GPU_GIB, FIT_ACTIVATION_GIB) if f.fits]
                cells.append(f"{ok[-1].name} ({(ok[-1].total + ok[-1].reserve) / GIB:.1f} GiB)" if ok else "none")
            out.append(f"| {engine} | {world} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


__all__ = ["Fit", "peak_reserve", "fit_table", "fits", "markdown_tables", "side_by_side"]
