"""HF Trainer with ``TrainingArguments(deepspeed=<our JSON>)`` on a tiny LLaMA; rank 0 writes a JSON report.

Launched by tests/test_frontends.py under the deepspeed launcher with 2 CPU ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import sinkgd_ds  # noqa: F401  - the only change a user makes: registers "SinkGD" with DeepSpeed

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.jobs.teardown import leave  # noqa: E402


class Walk(torch.utils.data.Dataset):
    """Sequences of a fixed random permutation walk: learnable next-token structure."""

    def __init__(self, n: int = 64, seq: int = 16, vocab: int = 64):
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(vocab, generator=g)
        starts = torch.randint(0, vocab, (n,), generator=g)
        rows = [starts]
        for _ in range(seq - 1):
            rows.append(perm[rows[-1]])
        self.x = torch.stack(rows, 1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=-1)
    ap.add_argument("--ds_config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    targs = TrainingArguments(output_dir=os.path.join(os.path.dirname(args.out), "hf_out"),
                              per_device_train_batch_size=4, max_steps=args.steps,
                              learning_rate=0.02, weight_decay=0.0, logging_steps=1,
                              save_strategy="no", report_to=[], deepspeed=args.ds_config, use_cpu=True,
                              dataloader_num_workers=0, disable_tqdm=True, seed=0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    trainer = Trainer(model=LlamaForCausalLM(cfg), args=targs, train_dataset=Walk())
    trainer.train()
    engine = trainer.model_wrapped
    inner = engine.basic_optimizer
    # a rank lists only the matrices it holds a piece of: gather the names from all ranks
    specs = [s for g in inner.param_groups if g["kind"] != "adamw" for s in inner.matrix_specs(g)]
    mine = {s.name for s in specs}
    sliced = sorted({s.name for s in specs if s.row_group is not None or s.col_group is not None})
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, sorted(mine))
    if int(os.environ.get("RANK", "0")) == 0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        report = dict(world=int(os.environ["WORLD_SIZE"]), engine=type(engine).__name__, inner=type(inner).__name__,
                      wrapper=type(engine.optimizer).__name__, losses=losses,
                      kinds=sorted({g["kind"] for g in inner.param_groups}),
                      matrix_state=sum(len(inner.state[p]) for g in inner.param_groups if g["kind"] != "adamw"
                                       for p in g["params"]),
                      lrs=[g["lr"] for g in inner.param_groups],
                      matrices=sorted(set().union(*everyone)), tp_sliced=sliced)
        with open(args.out, "w") as f:
            json.dump(report, f)
    leave()


if __name__ == "__main__":
    main()
