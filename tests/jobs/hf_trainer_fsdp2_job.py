"""HF Trainer with FSDP2 (``fsdp_config={"fsdp_version": 2}``) and our optimizer through
``optimizer_cls_and_kwargs``, on a tiny LLaMA; rank 0 writes a JSON report.

Launched by tests/test_fsdp2.py under torchrun with 2 CPU ranks. Accelerate (which the Trainer drives) turns
FSDP on only for GPU-class devices, so this job (test-only) sets the Accelerate state to FSDP by hand after the
Trainer made its Accelerator, as Accelerate does on a GPU; torch's fully_shard itself runs on CPU over gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from sinkgd_ds import SinkGD, tag_parameter_names  # noqa: E402
from tests.jobs.hf_trainer_job import Walk  # noqa: E402
from tests.jobs.teardown import leave  # noqa: E402


class CPUFSDPTrainer(Trainer):
    def create_accelerator_and_postprocess(self):
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if state.distributed_type != DistributedType.FSDP:  # (test-only: see the module docstring)
            state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                               auto_wrap_policy="transformer_based_wrap",
                                                               transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                                               cpu_ram_efficient_loading=False)
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    def _get_train_sampler(self, *args, **kwargs):  # (in order, so a plain loop can replay the same batches)
        return torch.utils.data.SequentialSampler(self.train_dataset)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    targs = TrainingArguments(output_dir=os.path.join(os.path.dirname(args.out), "hf_out"),
                              per_device_train_batch_size=4, max_steps=args.steps, learning_rate=0.02,
                              weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[],
                              use_cpu=True,
                              dataloader_num_workers=0, disable_tqdm=True, seed=0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    tag_parameter_names(model.named_parameters())  # (the Trainer hands the optimizer bare tensors)
    trainer = CPUFSDPTrainer(model=model, args=targs, train_dataset=Walk(),
                             optimizer_cls_and_kwargs=(SinkGD, {"lr": 0.02}))
    trainer.train()
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)
    model = trainer.model_wrapped
    kinds = inner.param_kinds()
    placements = sorted({str(p.placements) for p in model.parameters() if hasattr(p, "placements")})
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    weights = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"world": torch.distributed.get_world_size(), "inner": type(inner).__name__, "kinds": kinds,
                       "placements": placements, "losses": losses, "skipped": inner.skipped_steps}, f)
        torch.save(weights, args.out + ".weights.pt")
    leave()


if __name__ == "__main__":
    main()
