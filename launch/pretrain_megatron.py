"""The main job on Megatron-Core: LLaMA pretraining with SinkGD / SCALE / SWAN (or Adam) through
``megatron_patch``, megatron's GPTModel, DDP, ``get_megatron_optimizer`` and OptimizerParamScheduler.

    torchrun --nproc_per_node 2 launch/pretrain_megatron.py --model tiny --optimizer sinkgd --tp 2
    torchrun --nproc_per_node 2 launch/pretrain_megatron.py --model tiny --use_distributed_optimizer --bf16

Same run configs (configs/models), data, batches and summary as launch/pretrain.py; the optimizer, tensor
parallelism and precision come from the flags. Bad input is reported before any process group starts.
Checkpoints: Megatron distributed checkpoints (model + optimizer sharded_state_dict) in <out>/checkpoints/step<N>,
every --save_every steps, at the end and on SIGTERM / Ctrl-C; --resume continues exactly.
See docs/main_job.md ("Megatron-Core entry").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `launch` importable

from launch.config import (  # noqa: E402
    ROOT,
    ConfigError,
    add_run_control_args,
    check_stop_at_step,
    load_run_config,
    run_entry,
    world_size_from_env,
)
from sinkgd_ds.registry import keys as registry_keys  # noqa: E402

OPTIMIZERS = (*registry_keys(), "adam")
DEFAULT_LR = {**dict.fromkeys(registry_keys(), 0.02), "adam": 1e-3}  # as configs/zero*_{...}.json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | 60m | 130m | 350m | 1b | 7b (configs/models) or a JSON")
    ap.add_argument("--data", default=None, help="as launch/pretrain.py (sets data.source)")
    ap.add_argument("--steps", type=int, default=None, help="sets train.steps")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override any run-config key (repeatable)")
    ap.add_argument("--optimizer", default="sinkgd", help=" | ".join(OPTIMIZERS) + " (default %(default)s)")
    ap.add_argument("--lr", type=float, default=None, help="peak lr (default 0.02; adam 1e-3); matrices of "
                    "sinkgd/scale/swan step at lr x --lr_scale")
    ap.add_argument("--lr_scale", type=float, default=0.05, help="sinkgd_lr_scale (default %(default)s)")
    ap.add_argument("--clip_grad", type=float, default=1.0, help="global grad-norm clip, 0 = off (default 1.0)")
    ap.add_argument("--micro_batch", type=int, default=4, help="sequences per data-parallel rank and micro step")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    ap.add_argument("--use_distributed_optimizer", action="store_true", help="shard optimizer state / masters over DP")
    ap.add_argument("--bf16", action="store_true", help="bf16 model, fp32 masters (the papers' precision)")
    ap.add_argument("--out", default=None, help="run directory (default runs/<model>-megatron-<optimizer>-tp<tp>)")
    add_run_control_args(ap)
    ap.add_argument("--save_every", type=int, default=None,
                    help="checkpoint every N steps, 0 = only at the end / on a stop (default checkpoint.every)")
    return ap.parse_args(argv)


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that can fail on bad input, before any process group starts."""
    from launch import runstate
    from launch.data import check_lengths, load_tokens

    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps is not None else []) + \
        ([f"data.source={args.data}"] if args.data is not None else [])
    run = load_run_config(args.model, overrides)
    m, t, world, tp = run["model"], run["train"], world_size_from_env(), args.tp
    if args.optimizer not in OPTIMIZERS:
        import difflib

        close = difflib.get_close_matches(args.optimizer.lower(), OPTIMIZERS, n=1, cutoff=0.5)
        raise ConfigError(f"--optimizer {args.optimizer!r} is not known." + (f" Did you mean {close[0]!r}?" if close
                          else "") + f" Allowed: {', '.join(OPTIMIZERS)}")
    if tp < 1 or world % tp:
        raise ConfigError(f"--tp {tp} must be >= 1 and divide the world size {world}")
    kv = m["num_key_value_heads"] or m["num_attention_heads"]
    for key, value in (("num_attention_heads", m["num_attention_heads"]), ("num_key_value_heads", kv)):
        if value % tp:
            raise ConfigError(f"model.{key}={value} is not divisible by --tp {tp}")
    if args.optimizer == "swan" and tp > 1:
        raise ConfigError("--optimizer swan needs whole matrices: use --tp 1 (sinkgd and scale support TP)")
    dp = world // tp
    if args.micro_batch <= 0 or t["batch_size"] % (args.micro_batch * dp):
        raise ConfigError(f"train.batch_size={t['batch_size']} is not divisible by --micro_batch {args.micro_batch} x "
                          f"data-parallel size {dp} (world {world} / tp {tp}); allowed: multiples of "
                          f"{max(1, args.micro_batch) * dp}")
    if t["seq_len"] < 2:
        raise ConfigError("train.seq_len must be >= 2 (inputs are the first seq_len-1 tokens, labels the last)")
    d = run["data"]
    data = load_tokens(d["source"], d["vocab_size"], d["val_fraction"], d["tokenizer"], d["text_column"])
    if data.vocab_size % tp:
        raise ConfigError(f"vocabulary size {data.vocab_size} is not divisible by --tp {tp} (vocab-parallel "
                          "embedding and output layer)")
    check_lengths(data, t["seq_len"], run["eval"]["sequences"] if run["eval"]["every"] else 0)
    if args.save_every is not None and args.save_every < 0:
        raise ConfigError(f"--save_every={args.save_every} must be >= 0 (0 = only at the end / on a stop)")
    check_stop_at_step(args.stop_at_step, t["steps"])
    model_name = Path(args.model).stem
    out = Path(args.out) if args.out else ROOT / "runs" / f"{model_name}-megatron-{args.optimizer}-tp{tp}"
    runstate.prepare_out_dir(out, args.resume, args.overwrite)
    identity = {"engine": "megatron", "model": m, "vocab_size": data.vocab_size, "data_sha256": data.sha256,
                "optimizer": args.optimizer, "precision": "bf16" if args.bf16 else "fp32", "tensor_parallel": tp,
                "data_parallel": dp, "distributed_optimizer": args.use_distributed_optimizer}
    plan = {"run": run, "data": data, "out": out, "world": world, "dp": dp, "model_name": model_name,
            "identity": identity, "resume_from": None, "rejected": {}}
    if args.resume:
        # TP and DP may change (distributed checkpoints reshard; docs/megatron.md), switching the optimizer kind not
        must = ("engine", "model", "vocab_size", "data_sha256", "optimizer", "precision", "distributed_optimizer")
        plan["resume_from"], plan["rejected"] = runstate.select_resume(
            out, {k: identity[k] for k in must}, args.resume_fallback)
    return plan


def build_model(run: dict[str, Any], vocab_size: int, tp: int, bf16: bool):
    """Megatron GPTModel with the LLaMA recipe: RMSNorm, SwiGLU, RoPE, no biases, untied output layer."""
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    m = run["model"]
    cfg = TransformerConfig(
        num_layers=m["num_hidden_layers"], hidden_size=m["hidden_size"], ffn_hidden_size=m["intermediate_size"],
        num_attention_heads=m["num_attention_heads"], num_query_groups=m["num_key_value_heads"],
        normalization="RMSNorm", layernorm_epsilon=m["rms_norm_eps"], gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, init_method_std=m["initializer_range"],
        tensor_model_parallel_size=tp, use_cpu_initialization=True,  # same full weights for every TP size
        hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False, masked_softmax_fusion=False,
        bias_activation_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    torch.manual_seed(run["train"]["seed"])
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=vocab_size, max_sequence_length=m["max_position_embeddings"],
                     position_embedding_type="rope", rotary_base=int(m["rope_theta"]),
                     share_embeddings_and_output_weights=m["tie_word_embeddings"])
    model = model.bfloat16() if bf16 else model  # every param bf16, as Megatron-LM's Float16Module makes it
    return model.cuda(torch.cuda.current_device()) if torch.cuda.is_available() else model


def build_optimizer(args: argparse.Namespace, run: dict[str, Any], ddp):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    import megatron_patch
    from megatron_patch.training import CONFIGS

    megatron_patch.apply(training=False)
    t = run["train"]
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    common = dict(lr=lr, min_lr=lr * t["min_lr_ratio"], weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                  adam_eps=1e-8, clip_grad=args.clip_grad, bf16=args.bf16,
                  use_distributed_optimizer=args.use_distributed_optimizer)
    config = OptimizerConfig(optimizer="adam", **common) if args.optimizer == "adam" else \
        CONFIGS[args.optimizer](sinkgd_lr_scale=args.lr_scale, **common)
    opt = get_megatron_optimizer(config, [ddp])
    warmup = max(1, round(t["warmup_fraction"] * t["steps"]))  # as launch/config.py's WarmupCosineLR
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=lr, min_lr=lr * t["min_lr_ratio"], lr_warmup_steps=warmup,
                                    lr_decay_steps=t["steps"], lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
                                    wd_incr_steps=t["steps"], wd_incr_style="constant")
    return opt, sched


def lm_loss(model, ids, device) -> Any:
    """Mean next-token cross-entropy of rows ``ids`` [b, seq_len], as HF's shifted loss in launch/pretrain.py."""
    import torch

    ids = ids.to(device)
    s = ids.shape[1] - 1
    pos = torch.arange(s, device=device).unsqueeze(0).expand(ids.shape[0], -1)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=device), diagonal=1)  # True = masked
    return model(input_ids=ids[:, :-1], position_ids=pos, attention_mask=mask, labels=ids[:, 1:]).float().mean()


def _sharded_state_dict(model, opt, dist_opt: bool, is_loading: bool) -> tuple[dict, dict]:
    """Megatron-LM's ``generate_state_dict`` (--ckpt-format torch_dist) and its content metadata, as
    tests/megatron_ckpt_worker.py: the model's part from the unwrapped model, the optimizer sees the whole dict."""
    from megatron.core import parallel_state as ps

    md = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
          "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    if dist_opt:
        md["distrib_optim_sharding_type"] = "dp_reshardable"
    sd = {"model": model.sharded_state_dict(metadata=md)}
    sd["optimizer"] = opt.sharded_state_dict(sd, is_loading=is_loading, metadata=md)
    return sd, {k: v for k, v in md.items() if k != "dp_cp_group"}


def save_checkpoint(model, opt, sched, state: dict[str, Any], out: Path, dist_opt: bool, keep: int,
                    identity: dict[str, Any], device) -> Path:
    """Collective: <out>/checkpoints/step<N> (distributed checkpoint + train_state.json: step, losses, val,
    scheduler), complete or invisible through launch/runstate.save_with (manifest, rename, ``latest``, prune)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from launch import runstate

    def write(path: Path) -> None:
        sd, content = _sharded_state_dict(model, opt, dist_opt, is_loading=False)
        strategy = FullyParallelSaveStrategyWrapper(TorchDistSaveShardedStrategy("torch_dist", 1),
                                                    ps.get_data_parallel_group(with_context_parallel=True))
        dist_checkpointing.save(sd, str(path), strategy, content_metadata=content)
        if dist.get_rank() == 0:
            (path / "train_state.json").write_text(json.dumps({**state, "scheduler": sched.state_dict()}))

    return runstate.save_with(write, out, state["step"], keep, identity, device)


def load_checkpoint(model, ddp, opt, sched, path: Path, dist_opt: bool) -> dict[str, Any]:
    """Checkpoint ``path`` (chosen and checked before the process group started): model, optimizer, scheduler;
    returns the train state (step, losses, ...). Whatever fails names the checkpoint."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    from launch.manifest import CheckpointError

    try:
        sd, _ = _sharded_state_dict(model, opt, dist_opt, is_loading=True)
        strategy = FullyParallelLoadStrategyWrapper(TorchDistLoadShardedStrategy(),
                                                    ps.get_data_parallel_group(with_context_parallel=True))
        loaded = dist_checkpointing.load(sd, str(path), strategy)
        ddp.load_state_dict(loaded["model"])
        opt.load_state_dict(loaded["optimizer"])
        state = json.loads((path / "train_state.json").read_text())
        sched.load_state_dict(state.pop("scheduler"))
    except Exception as e:  # noqa: BLE001 - whatever megatron-core raises, name the checkpoint, before any step
        raise CheckpointError(f"--resume: megatron-core could not load {path}: {type(e).__name__}: {e}") from e
    state["val"] = [tuple(v) for v in state["val"]]
    return state


def train(plan: dict[str, Any], args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from launch import report, runstate
    from launch.data import train_batch, val_windows
    from sinkgd_ds.memory import account

    run, data, out, dp = plan["run"], plan["data"], plan["out"], plan["dp"]
    t, ev = run["train"], run["eval"]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(t["seed"])
    try:  # megatron-core's DDP buffers and optimizer wrappers allocate on torch.cuda.current_device()
        torch.cuda.current_device()
    except (AssertionError, RuntimeError) as e:
        print(f"error: megatron-core needs CUDA GPUs ({e}); on CPU use launch/pretrain.py", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        return 2
    rank, world, dp_rank = dist.get_rank(), dist.get_world_size(), ps.get_data_parallel_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    model = build_model(run, data.vocab_size, args.tp, args.bf16)
    params = sum(p.numel() * (args.tp if getattr(p, "tensor_model_parallel", False) else 1) for p in model.parameters())
    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=args.use_distributed_optimizer))
    opt, sched = build_optimizer(args, run, ddp)
    inner = opt.chained_optimizers[0].optimizer if hasattr(opt, "chained_optimizers") else opt.optimizer
    kinds = sorted({g.get("kind") for g in inner.param_groups if g.get("kind")})
    label = type(inner).__name__ + (f" ({', '.join(kinds)})" if kinds else "")
    layout = f"Megatron TP={args.tp} x DP={dp}" + (", distributed optimizer" if args.use_distributed_optimizer else "")
    micro, seq, batch = args.micro_batch, t["seq_len"], t["batch_size"]
    gas = batch // (micro * dp)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"data: {data.describe}\nmodel: {plan['model_name']} ({params / 1e6:.2f}M params), {label}, {layout}, "
              f"{'bf16' if args.bf16 else 'fp32'}, batch {batch} x {seq} tokens (micro {micro} x accumulation {gas} x "
              f"{dp} DP ranks)\nrun dir: {out}", flush=True)
    state: dict[str, Any] = {"step": 0, "losses": [], "val": [], "skipped": [], "data_sha256": data.sha256}
    resumed_from, last_ckpt = None, None
    save_every = run["checkpoint"]["every"] if args.save_every is None else args.save_every
    if plan["resume_from"] is not None:
        if plan["rejected"]:
            runstate.set_aside(out, plan["resume_from"], plan["rejected"])
        state.update(load_checkpoint(model, ddp, opt, sched, plan["resume_from"], args.use_distributed_optimizer))
        resumed_from = state["step"]
    runstate.install_signal_handlers()
    windows = val_windows(data, seq, ev["sequences"]) if ev["every"] else None
    bar = report.progress_bar(t["steps"], state["step"], rank == 0 and not args.no_progress)
    stopped_by, train_time, first_step, memory = None, 0.0, state["step"], None
    while state["step"] < t["steps"]:
        t0, step, loss_sum = time.perf_counter(), state["step"], 0.0
        ddp.zero_grad_buffer()
        opt.zero_grad()
        for m in range(gas):  # grads accumulate in DDP's buffers; reduced once in finish_grad_sync
            first = m * dp * micro + dp_rank * micro
            ids = train_batch(data, t["seed"], step, batch, seq, slice(first, first + micro), run["data"]["order"])
            loss = lm_loss(ddp, ids, device)
            (loss / gas).backward()
            loss_sum += float(loss.detach())
        ddp.finish_grad_sync()
        if memory is None and (step == first_step + 1 or step + 1 == t["steps"]):
            memory = account(opt, ddp)  # (gradients held, optimizer state created by an earlier step)
        lr = inner.param_groups[0]["lr"]
        ok, _, _ = opt.step()
        sched.step(increment=1)
        stop_local = runstate.stop_requested() or (args.stop_at_step is not None and step + 1 >= args.stop_at_step)
        total, stops, skipped = runstate.all_reduce_sum([loss_sum / gas, float(stop_local), float(not ok)], device)
        dt = time.perf_counter() - t0
        train_time += dt
        state["step"] = step + 1
        state["losses"].append(total / world)  # TP peers hold equal losses: the mean over DP ranks
        tok_s = (state["step"] - first_step) * batch * seq / train_time
        bar.set_postfix_str(f"loss {state['losses'][-1]:.4f} lr {lr:.2e} tok/s {tok_s:,.0f}", refresh=False)
        bar.update(1)
        if args.no_progress and rank == 0 and (state["step"] % t["log_every"] == 0 or state["step"] == 1):
            print(f"step {state['step']:5d}  loss {state['losses'][-1]:.4f}  lr {lr:.3e}  tok/s {tok_s:,.0f}",
                  flush=True)
        if windows is not None and (state["step"] % ev["every"] == 0 or state["step"] == t["steps"]):
            vl = evaluate(ddp, windows[dp_rank::dp], micro, device)
            state["val"].append((state["step"], vl))
            report.announce_val(bar, rank, state["step"], vl)
        if skipped > 0:  # (non-finite gradients: no weight or state changed; the run goes on)
            state["skipped"].append(state["step"])
        if stops > 0 or (save_every and state["step"] % save_every == 0) or state["step"] == t["steps"]:
            last_ckpt = save_checkpoint(model, opt, sched, state, out, args.use_distributed_optimizer,
                                        run["checkpoint"]["keep"], plan["identity"], device)
        if stops > 0:
            stopped_by = runstate.STOP["signal"] or "--stop_at_step"
            report.announce_stop(bar, rank, stopped_by, state["step"], last_ckpt)
            break
    bar.close()
    peaks = report.gather_peak_memory()
    memory_by_rank = report.gather_objects(memory)
    if rank == 0:
        val = state["val"][-1][1] if state["val"] else None
        tokens = (state["step"] - first_step) * batch * seq
        plot = report.plot_losses(out / "loss.png", state["losses"], state["val"], f"{plan['model_name']} / {layout}")
        summary = {
            "model": plan["model_name"], "params": params, "optimizer": label, "layout": layout, "zero_stage": None,
            "world": world, "tp": args.tp, "dp": dp, "bf16": args.bf16, "step": state["step"], "steps": t["steps"],
            "resumed_from": resumed_from, "stopped_by": stopped_by, "tokens": tokens,
            "tokens_total": state["step"] * batch * seq,
            "train_seconds": train_time, "tokens_per_s": tokens / train_time if train_time else 0.0,
            "losses": state["losses"], "val": state["val"], "val_loss": val,
            "val_ppl": report.perplexity(val) if val is not None else None, "peak_memory_bytes": peaks,
            "memory_kind": "GPU max allocated" if cuda else "CPU peak RSS", "plot": str(plot),
            "checkpoint": str(last_ckpt) if last_ckpt else None,
            "logs": None, "data_sha256": data.sha256, "skipped_steps": state["skipped"],
            "memory": {"per_rank": memory_by_rank, "kind": "engine tensors by category (sinkgd_ds.memory), measured "
                       "before the optimizer step of the run's second (or last) step"} if all(memory_by_rank) else None,
        }
        print(report.format_summary(summary), flush=True)
        report.write_json(out / "summary.json", summary)
        if args.summary_json:
            report.write_json(Path(args.summary_json), summary)
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


def evaluate(model, mine, micro: int, device) -> float:
    """Mean val loss over this DP rank's share of the fixed windows, combined over all ranks."""
    import torch

    from launch import runstate

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(mine), micro):
            ids = mine[i:i + micro]
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += float(lm_loss(model, ids, device)) * n
            count += n
    model.train()
    total, count = runstate.all_reduce_sum([total, float(count)], device)  # TP peers count twice on both sides
    return total / count


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    def train_then_leave(plan: dict[str, Any]) -> int:
        from launch import runstate

        rc = train(plan, args)
        if rc == 0:  # (the process group is down, every file written)
            runstate.leave(rc)
        return rc

    return run_entry(lambda: prepare(args), train_then_leave)


if __name__ == "__main__":
    sys.exit(main())
