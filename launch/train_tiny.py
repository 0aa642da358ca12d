"""A small SinkGD pretraining run (tiny HF LLaMA, synthetic copy-task data) under any launcher.

    deepspeed --num_gpus 2 launch/train_tiny.py --deepspeed_config configs/zero2_sinkgd.json
    torchrun --nproc_per_node 2 launch/train_tiny.py --deepspeed_config configs/zero2_sinkgd.json

The only SinkGD-specific line is ``import sinkgd_ds``; the optimizer comes from the JSON config.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deepspeed_config", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    ap.add_argument("--summary_json", default=None, help="rank 0 writes the loss trace here")
    return ap.parse_args()


def synthetic_batch(gen: torch.Generator, batch: int, seq: int, vocab: int) -> torch.Tensor:
    """Walks of a fixed random permutation (next = perm[current]): learnable, so the loss visibly falls."""
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
    ids = torch.empty(batch, seq, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
    for t in range(1, seq):
        ids[:, t] = perm[ids[:, t - 1]]
    return ids


def main() -> None:
    args = parse()
    if "OMPI_COMM_WORLD_RANK" in os.environ and "RANK" not in os.environ:  # mpirun: stay on loopback
        os.environ.update(RANK=os.environ["OMPI_COMM_WORLD_RANK"], WORLD_SIZE=os.environ["OMPI_COMM_WORLD_SIZE"],
                          LOCAL_RANK=os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    import sinkgd_ds  # noqa: F401  - the one line: registers "SinkGD"/"SCALE"/"SWAN" with DeepSpeed

    deepspeed.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq)
    model = LlamaForCausalLM(cfg)
    with open(args.deepspeed_config) as f:
        ds_cfg = json.load(f)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_cfg)
    micro = engine.train_micro_batch_size_per_gpu()
    gen = torch.Generator().manual_seed(1234 + rank)
    losses, t0 = [], time.time()
    for step in range(args.steps):
        ids = synthetic_batch(gen, micro, args.seq, args.vocab).to(engine.device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}  lr {engine.get_lr()[0]:.5f}", flush=True)
    if rank == 0:
        kinds = sorted({g["kind"] for g in engine.basic_optimizer.param_groups})
        print(f"done: {args.steps} steps on {world} ranks in {time.time() - t0:.1f}s, optimizer "
              f"{type(engine.basic_optimizer).__name__} ({', '.join(kinds)}), loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump({"losses": losses, "world": world}, f)


if __name__ == "__main__":
    main()
