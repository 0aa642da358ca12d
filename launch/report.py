"""What the run shows and leaves behind: progress bar (rank 0), monitor events, plot, final summary."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True,
                mininterval=1.0, file=sys.stdout, bar_format="{desc} {n_fmt}/{total_fmt} |{bar:20}| "
                "[{elapsed}<{remaining}]{postfix}")


def write_events(engine: Any, events: list[tuple[str, float, int]]) -> None:
    """Through DeepSpeed's monitor (csv_monitor / tensorboard sections of the DS JSON): rank 0 only."""
    monitor = getattr(engine, "monitor", None)
    if monitor is not None and monitor.enabled and dist.get_rank() == 0:
        monitor.write_events(events)


def peak_memory_bytes() -> int:
    """Peak accelerator memory on GPU; peak resident set size of this process on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def resident_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 elsewhere): to see memory grow over a long run."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def gather_objects(value: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def gather_peak_memory() -> list[int]:
    return [int(x) for x in gather_objects(peak_memory_bytes())]


def plot_losses(path: Path, train: list[float], val: list[tuple[int, float]], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(train) + 1), train, lw=1, label="train loss")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def format_summary(s: dict[str, Any]) -> str:
    mib = [f"{m / 2**20:.0f}" for m in s["peak_memory_bytes"]]
    val = (f"{s['val_loss']:.4f} (perplexity {s['val_ppl']:.2f})" if s.get("val_loss") is not None else "n/a")
    lines = [
        "==== summary ====",
        f"model       {s['model']} ({s['params'] / 1e6:.2f}M params), optimizer {s['optimizer']}, "
        f"{s.get('layout') or 'ZeRO-' + str(s['zero_stage'])}, {s['world']} ranks",
        f"steps       {s['step']} / {s['steps']}" + (f" (resumed at {s['resumed_from']})" if s["resumed_from"] else "")
        + (f" (stopped by {s['stopped_by']})" if s["stopped_by"] else ""),
        f"tokens      {s['tokens']:,} this run ({s['tokens_total']:,} in total)",
        *([f"skipped     {len(s['skipped_steps'])} optimizer steps (non-finite gradients): "
           f"{', '.join(map(str, s['skipped_steps'][:20]))}{' ...' if len(s['skipped_steps']) > 20 else ''}"]
          if s.get("skipped_steps") else []),
        f"time        {s['train_seconds']:.1f} s training, {s['tokens_per_s']:,.0f} tokens/s",
        f"train loss  {s['losses'][0]:.4f} -> {s['losses'][-1]:.4f}" if s["losses"] else "train loss  n/a",
        f"val loss    {val}",
        f"peak memory {' / '.join(mib)} MiB per rank ({s['memory_kind']})",
        *([format_memory(s["memory"]["per_rank"])] if s.get("memory") else []),
        f"loss curve  {s['plot']}",
        f"checkpoint  {s['checkpoint'] or 'none'}",
        f"logs        {s['logs']}",
    ]
    return "\n".join(lines)


def format_memory(per_rank: list[dict[str, int]]) -> str:
    """The busiest rank's engine tensors by category (sinkgd_ds.memory.account)."""
    top = max(per_rank, key=lambda m: m["total"])
    parts = [("weights", "weights"), ("gradients", "grads"), ("master_weights", "masters"),
             ("optimizer_state_matrices", "matrix opt. state"), ("optimizer_state_adamw", "AdamW state")]
    return (f"tensors     {top['total'] / 2**20:.1f} MiB on the busiest rank: "
            + ", ".join(f"{label} {top[key] / 2**20:.1f}" for key, label in parts))


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def announce_val(bar: Any, rank: int, step: int, val_loss: float) -> None:
    if rank == 0:
        bar.write(f"step {step:5d}  val loss {val_loss:.4f}  perplexity {perplexity(val_loss):.2f}")


def announce_stop(bar: Any, rank: int, stopped_by: str, step: int, checkpoint: Any) -> None:
    if rank == 0:
        bar.write(f"stopped by {stopped_by} at step {step}; checkpoint {checkpoint}; continue with --resume")
