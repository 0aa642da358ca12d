"""The training loop on a DeepSpeed engine: exact resume, periodic eval/checkpoints, clean stop."""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launch import report, runstate
from launch.data import TokenData, train_batch, val_windows


def build_model(run: dict[str, Any], vocab_size: int) -> torch.nn.Module:
    """HF LlamaForCausalLM (RMSNorm, SwiGLU, RoPE), built from the config: no hub access."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = run["model"]
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
                      num_attention_heads=m["num_attention_heads"], num_hidden_layers=m["num_hidden_layers"],
                      num_key_value_heads=m["num_key_value_heads"] or m["num_attention_heads"],
                      max_position_embeddings=m["max_position_embeddings"], rms_norm_eps=m["rms_norm_eps"],
                      rope_theta=m["rope_theta"], tie_word_embeddings=m["tie_word_embeddings"],
                      initializer_range=m["initializer_range"], attention_dropout=0.0, use_cache=False)
    torch.manual_seed(run["train"]["seed"])  # identical initial weights on every rank
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def evaluate(engine: Any, windows: torch.Tensor) -> float:
    """Mean val loss over fixed windows, split across ranks (each rank a strided share)."""
    engine.eval()
    rank, world = getattr(engine, "data_parallel_rank", None), getattr(engine, "data_parallel_size", None)
    if rank is None:  # (DeepSpeed: every rank is a data-parallel rank)
        rank, world = dist.get_rank(), dist.get_world_size()
    micro = engine.train_micro_batch_size_per_gpu()
    mine = windows[rank::world]
    total, count = 0.0, 0
    for i in range(0, len(mine), micro):
        ids = mine[i:i + micro].to(engine.device)
        loss = engine(input_ids=ids, labels=ids).loss
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += float(loss) * n
        count += n
    engine.train()
    total, count = runstate.all_reduce_sum([total, float(count)], device=engine.device)
    return total / count


def skips_so_far(engine: Any) -> int:
    """Optimizer steps skipped for non-finite gradients: by DeepSpeed itself (its overflow check) or by our
    optimizer (which DeepSpeed may not reach when it skipped first)."""
    return int(getattr(engine, "skipped_steps", 0) or 0) + int(getattr(engine.basic_optimizer, "skipped_steps", 0))


def optimizer_label(engine: Any) -> str:
    opt = engine.basic_optimizer
    kinds = sorted({g.get("kind") for g in opt.param_groups if g.get("kind")})
    return type(opt).__name__ + (f" ({', '.join(kinds)})" if kinds else "")


def layout_label(engine: Any) -> str:
    return getattr(engine, "layout_label", None) or f"ZeRO-{engine.zero_optimization_stage()}"


def train(plan: dict[str, Any], args: argparse.Namespace, fsdp: bool = False, tensor_parallel: int = 1) -> int:
    """The loop on a DeepSpeed engine (``tensor_parallel``: AutoTP's size), or (``fsdp``) on torch's FSDP2 through
    ``launch.fsdp_engine``."""
    import deepspeed

    import sinkgd_ds  # noqa: F401  - registers "SinkGD" / "SCALE" / "SWAN" as DeepSpeed optimizer types
    from sinkgd_ds.memory import account

    run, ds_cfg, data, out = plan["run"], plan["ds"], plan["data"], plan["out"]
    data: TokenData
    t, ev, ck = run["train"], run["eval"], run["checkpoint"]
    if fsdp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    model = build_model(run, data.vocab_size)
    params = sum(p.numel() for p in model.parameters())
    if fsdp:
        from launch.fsdp_engine import FSDPEngine

        engine = FSDPEngine(model, ds_cfg, tensor_parallel)
    else:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
        if tensor_parallel > 1:  # AutoTP: the ranks of one TP group take the same micro-batches
            from deepspeed.utils import groups

            engine.data_parallel_rank = groups.get_data_parallel_rank()
            engine.data_parallel_size = groups.get_data_parallel_world_size()
            engine.layout_label = f"ZeRO-{engine.zero_optimization_stage()} x AutoTP{tensor_parallel}"
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    seq, batch = t["seq_len"], t["batch_size"]
    state: dict[str, Any] = {"step": 0, "losses": [], "val": [], "tokens": 0, "skipped": [],
                             "data_sha256": data.sha256}
    resumed_from = None
    if plan["resume_from"] is not None:  # (chosen and checked by prepare(): launch/manifest.py)
        if plan["rejected"]:
            runstate.set_aside(out, plan["resume_from"], plan["rejected"])
        loaded = runstate.load(engine, plan["resume_from"])
        state.update({k: loaded[k] for k in ("step", "losses", "val", "tokens")})
        state["skipped"] = loaded.get("skipped", [])
        resumed_from = state["step"]
    runstate.install_signal_handlers()
    windows = val_windows(data, seq, ev["sequences"]) if ev["every"] else None
    if rank == 0:
        print(f"data: {data.describe}\nmodel: {plan['model_name']} ({params / 1e6:.2f}M params), "
              f"{optimizer_label(engine)}, {layout_label(engine)}, {world} ranks, batch {batch} x "
              f"{seq} tokens (micro {micro} x accumulation {gas} x {getattr(engine, 'data_parallel_size', world)} "
              f"data-parallel ranks)\nrun dir: {out}", flush=True)
    bar = report.progress_bar(t["steps"], state["step"], rank == 0 and not args.no_progress)
    stopped_by, run_tokens, train_time, last_ckpt, rss, memory, run_steps = None, 0, 0.0, None, [], None, 0
    rows_per_rank = micro
    dp_rank, dp_world = getattr(engine, "data_parallel_rank", rank), getattr(engine, "data_parallel_size", world)
    while state["step"] < t["steps"]:
        t0 = time.perf_counter()
        step = state["step"]
        loss_sum, skips_before = 0.0, skips_so_far(engine)
        for m in range(gas):
            first = m * dp_world * micro + dp_rank * rows_per_rank
            rows = slice(first, first + micro)
            ids = train_batch(data, t["seed"], step, batch, seq, rows, run["data"]["order"]).to(engine.device)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            if m == gas - 1 and (run_steps == 1 or state["step"] + 1 == t["steps"]) and memory is None:
                memory = account(engine)  # (gradients held, optimizer state created by an earlier step)
            engine.step()
            loss_sum += float(loss.detach())
        if skips_so_far(engine) > skips_before:  # (non-finite gradients: no weight or state changed)
            state["skipped"].append(step + 1)
        stop_local = runstate.stop_requested() or (args.stop_at_step is not None and step + 1 >= args.stop_at_step)
        total, stops = runstate.all_reduce_sum([loss_sum / gas, float(stop_local)], device=engine.device)
        dt = time.perf_counter() - t0
        train_time += dt
        step_loss = total / world
        state["step"] = step + 1
        run_steps += 1
        state["losses"].append(step_loss)
        state["tokens"] += batch * seq
        run_tokens += batch * seq
        lr = engine.get_lr()[0]
        tok_s = run_tokens / train_time
        report.write_events(engine, [("Train/Steps/loss", step_loss, step + 1), ("Train/Steps/lr", lr, step + 1),
                                     ("Train/Steps/tokens_per_s", batch * seq / dt, step + 1)])
        bar.set_postfix_str(f"loss {step_loss:.4f} lr {lr:.2e} tok/s {tok_s:,.0f}", refresh=False)
        bar.update(1)
        if state["step"] % t["log_every"] == 0:
            rss.append((state["step"], report.resident_bytes()))
        if args.no_progress and rank == 0 and (state["step"] % t["log_every"] == 0 or state["step"] == 1):
            print(f"step {state['step']:5d}  loss {step_loss:.4f}  lr {lr:.3e}  tok/s {tok_s:,.0f}", flush=True)
        if windows is not None and (state["step"] % ev["every"] == 0 or state["step"] == t["steps"]):
            vl = evaluate(engine, windows)
            state["val"].append((state["step"], vl))
            report.write_events(engine, [("Val/Steps/loss", vl, state["step"]),
                                         ("Val/Steps/perplexity", report.perplexity(vl), state["step"])])
            report.announce_val(bar, rank, state["step"], vl)
        periodic = ck["every"] and state["step"] % ck["every"] == 0
        if stops > 0 or periodic or state["step"] == t["steps"]:
            last_ckpt = runstate.save(engine, out, state["step"], state, ck["keep"], plan["identity"], engine.device)
            if stops > 0:
                stopped_by = runstate.STOP["signal"] or "--stop_at_step"
                report.announce_stop(bar, rank, stopped_by, state["step"], last_ckpt)
                break
    bar.close()
    return finish(plan, args, engine, state, params, resumed_from, stopped_by, run_tokens, train_time, last_ckpt, rss,
                  memory)


def finish(plan: dict[str, Any], args: argparse.Namespace, engine: Any, state: dict[str, Any], params: int,
           resumed_from: int | None, stopped_by: str | None, run_tokens: int, train_time: float,
           last_ckpt: Path | None, rss: list[tuple[int, int]], memory: dict[str, int] | None) -> int:
    run, out, ds_cfg = plan["run"], plan["out"], plan["ds"]
    peaks = report.gather_peak_memory()
    memory_by_rank = report.gather_objects(memory)
    rss_by_rank = report.gather_objects(rss)
    if dist.get_rank() == 0:
        val = state["val"][-1][1] if state["val"] else None
        name = f"{plan['model_name']} / {plan['ds_name']}"
        plot = report.plot_losses(out / "loss.png", state["losses"], [tuple(v) for v in state["val"]], name)
        logs = ds_cfg.get("csv_monitor", {}).get("output_path") or ds_cfg.get("tensorboard", {}).get("output_path")
        summary = {
            "model": plan["model_name"], "params": params, "optimizer": optimizer_label(engine),
            "zero_stage": engine.zero_optimization_stage(), "layout": layout_label(engine),
            "world": dist.get_world_size(),
            "step": state["step"], "steps": run["train"]["steps"], "resumed_from": resumed_from,
            "stopped_by": stopped_by, "tokens": run_tokens, "tokens_total": state["tokens"],
            "train_seconds": train_time, "tokens_per_s": run_tokens / train_time if train_time else 0.0,
            "losses": state["losses"], "val": state["val"], "val_loss": val,
            "val_ppl": report.perplexity(val) if val is not None else None, "peak_memory_bytes": peaks,
            "skipped_steps": state["skipped"], "resident_bytes_by_step": rss_by_rank,
            "memory": {"per_rank": memory_by_rank, "kind": "engine tensors by category (sinkgd_ds.memory), "
                       "measured before the optimizer step of the run's second (or last) step"}
            if all(memory_by_rank) else None,
            "memory_kind": "GPU max allocated" if torch.cuda.is_available() else "CPU peak RSS",
            "plot": str(plot), "checkpoint": str(last_ckpt), "logs": logs, "data_sha256": state["data_sha256"],
        }
        print(report.format_summary(summary), flush=True)
        report.write_json(out / "summary.json", summary)
        if args.summary_json:
            report.write_json(Path(args.summary_json), summary)
    dist.barrier()
    dist.destroy_process_group()  # orderly teardown: no gloo thread is left running at interpreter exit
    return 0 if stopped_by is None or math.isfinite(state["losses"][-1]) else 1
