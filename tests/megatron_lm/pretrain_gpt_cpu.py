"""TEST-ONLY: Megatron-LM's GPT pretraining entry, as ``pretrain_gpt.py`` of Megatron-LM core_v0.19.0 has it, on CPU.

megatron-core 0.17+ wheels ship ``megatron.training`` (Megatron-LM's real training loop: argument parsing and
validation, model and optimizer build, pipeline schedules, checkpointing) but not the repository's entry scripts.
This is that entry, cut to what a GPT run on mock data needs, calling the same functions in the same order
(``parse_and_validate_args`` -> ``gpt_config_from_args`` -> ``pretrain_cfg_container_from_args`` -> ``pretrain``
with the GPT dataset provider and forward step). Run it as a Megatron-LM user runs pretrain_gpt.py::

    torchrun --nproc_per_node 2 -m megatron_patch.run tests/megatron_lm/pretrain_gpt_cpu.py --optimizer sinkgd ...

The only difference from a GPU run is the CUDA->CPU fixture (tests/megatron_lm/cuda_on_cpu.py). At the end each
rank writes what it trained to ``$SINKGD_MLM_OUT/rank<R>.pt``: the losses Megatron-LM logged and its
parameters by name, for the tests to compare layouts.
"""

from __future__ import annotations

import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.megatron_lm import cuda_on_cpu  # noqa: E402

cuda_on_cpu.install()

from megatron.core import mpu  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer  # noqa: E402
from megatron.core.utils import get_attr_wrapped_model, get_batch_on_this_tp_rank  # noqa: E402
from megatron.training import get_args, pretrain, training  # noqa: E402
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args  # noqa: E402
from megatron.training.arguments import parse_and_validate_args  # noqa: E402
from megatron.training.utils import is_first_or_last_pipeline_stage  # noqa: E402

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")
LOSSES: list[float] = []


def get_batch(data_iterator, vp_stage=None):
    args = get_args()
    if not is_first_or_last_pipeline_stage(vp_stage):
        return [None] * len(BATCH_KEYS)
    batch = {}
    if mpu.get_tensor_model_parallel_rank() == 0:
        batch = {k: (v.cuda() if v is not None else None) for k, v in next(data_iterator).items()}
    batch = get_batch_on_this_tp_rank(
        batch, has_cu_seqlens=False, is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(), cp_size=1,
        tp_rank=mpu.get_tensor_model_parallel_rank(), micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length, mtp_on_this_rank=False,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(), is_pipeline_last_stage=mpu.is_pipeline_last_stage())
    return [batch.get(k) for k in BATCH_KEYS]


def loss_func(loss_mask, output_tensor):
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    tokens = mask.sum().clone().detach().to(torch.int)
    return loss, tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), tokens.view(1)])}


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    tokens, labels, loss_mask, position_ids, attention_mask = get_batch(data_iterator, vp_stage)
    output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask)


def is_dataset_built_on_rank(vp_stage=None):
    return mpu.get_tensor_model_parallel_rank() == 0 and is_first_or_last_pipeline_stage(vp_stage)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    args = get_args()
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=None, blend_per_split=None, split=args.split,
        path_to_cache=args.data_cache_path, tokenizer=build_tokenizer(args), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=args.create_attention_mask_in_dataloader)
    return BlendedMegatronDatasetBuilder(MockGPTDataset, train_val_test_num_samples,
                                         partial(is_dataset_built_on_rank, vp_stage=vp_stage), config).build()


def get_embedding_ranks(pp_ranks):
    ranks = [pp_ranks[0]]
    if len(pp_ranks) > 1 and not get_args().untie_embeddings_and_output_weights:
        ranks.append(pp_ranks[-1])
    return sorted(set(ranks))


def record_losses() -> None:
    """Keep the per-iteration loss Megatron-LM reports (``training_log`` receives the reduced loss dict)."""
    original = training.training_log

    def training_log(loss_dict, *args, **kwargs):
        if "lm loss" in loss_dict:
            LOSSES.append(float(loss_dict["lm loss"]))
        return original(loss_dict, *args, **kwargs)

    training.training_log = training_log


def inner_optimizers(optimizer) -> list[str]:
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return sorted({f"{type(p).__name__}/{type(p.optimizer).__name__}" for p in parts})


def dump(model_chunks, optimizer, ranks: dict) -> None:
    out = os.environ.get("SINKGD_MLM_OUT")
    if not out:
        return
    params = {}
    for chunk_index, chunk in enumerate(model_chunks):
        for name, p in chunk.named_parameters():
            params[f"{chunk_index}:{name}"] = p.detach().float().clone()
    torch.save({"losses": LOSSES, "params": params, "optimizer": inner_optimizers(optimizer), **ranks},
               os.path.join(out, f"rank{ranks['rank']}.pt"))


def keep_model() -> list:
    """The built model chunks and optimizer, for :func:`dump` (``setup_model_and_optimizer`` returns them)."""
    holder: list = []
    original = training.setup_model_and_optimizer

    def setup_model_and_optimizer(*args, **kwargs):
        result = original(*args, **kwargs)
        poison_one_gradient(result[0], result[1])
        holder.extend([*result[:2], {"rank": torch.distributed.get_rank(),
                                     "tp_rank": mpu.get_tensor_model_parallel_rank(),
                                     "pp_rank": mpu.get_pipeline_model_parallel_rank()}])
        return result

    training.setup_model_and_optimizer = setup_model_and_optimizer
    return holder


def poison_one_gradient(model_chunks, optimizer) -> None:
    """``SINKGD_MLM_NAN=ITER:STAGE``: before the ITER-th optimizer step, one gradient element of a hidden matrix on
    pipeline stage STAGE (TP rank 0) becomes NaN; nothing else does, so the other stages see finite gradients."""
    spec = os.environ.get("SINKGD_MLM_NAN")
    if not spec:
        return
    at, stage = (int(x) for x in spec.split(":"))
    if mpu.get_pipeline_model_parallel_rank() != stage or mpu.get_tensor_model_parallel_rank() != 0:
        return
    target = next(p for chunk in model_chunks for n, p in chunk.named_parameters() if "linear_fc2.weight" in n)
    calls = [0]
    original = optimizer.step

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            target.main_grad.view(-1)[0] = float("nan")
        return original(*args, **kwargs)

    optimizer.step = step


def use_prebuilt_helpers() -> None:
    """The wheel ships the dataset index helpers compiled but not their Makefile (Megatron-LM's checkout has it):
    rank 0's ``compile_helpers()`` would run ``make`` and fail, so it only checks they import."""
    import megatron.core.datasets.utils as dataset_utils

    def prebuilt() -> None:
        import megatron.core.datasets.helpers_cpp  # noqa: F401

    dataset_utils.compile_helpers = prebuilt


if __name__ == "__main__":
    use_prebuilt_helpers()
    train_valid_test_datasets_provider.is_distributed = True  # every rank enters the builder (as pretrain_gpt.py)
    record_losses()
    models = keep_model()
    args = parse_and_validate_args(args_defaults={"tokenizer_type": "NullTokenizer"})
    try:
        pretrain(pretrain_cfg_container_from_args(args, gpt_config_from_args(args)),
                 train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step,
                 get_embedding_ranks=get_embedding_ranks)
    except SystemExit as stop:  # --exit-interval ends the job with sys.exit after its checkpoint
        if stop.code not in (0, None):
            raise
    dump(*models)
