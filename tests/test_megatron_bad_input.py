"""Megatron: unsupported combinations and unknown names fail before anything is built."""

from __future__ import annotations

import pytest

megatron_patch = pytest.importorskip("megatron_patch")
from megatron_patch.factory import check_config, check_name  # noqa: E402


def cfg(**kw):
    return megatron_patch.SinkGDOptimizerConfig(lr=1e-3, **kw)


def test_unknown_name_suggests():
    with pytest.raises(ValueError, match=r"'sinkgdd' is not supported\. Did you mean 'sinkgd'\?"):
        check_name(cfg(optimizer="sinkgdd"))
    check_name(cfg(optimizer="adam"))
    check_name(cfg(optimizer="scale"))


@pytest.mark.parametrize("kw, groups, msg", [
    (dict(fp16=True), [], "fp16"),
    (dict(optimizer_cpu_offload=True), [], "optimizer_cpu_offload"),
    (dict(decoupled_weight_decay=False, weight_decay=0.1), [], "decoupled_weight_decay"),
    ({}, [{"params": [], "is_expert_parallel": True}], "expert"),
])
def test_unsupported(kw, groups, msg):
    with pytest.raises(ValueError, match=msg):
        check_config(cfg(**kw), groups, [])


def test_fused_layout_mismatch_is_reported():
    from types import SimpleNamespace

    from sinkgd_ds.integrations.megatron import fused_row_blocks

    mc = SimpleNamespace(num_attention_heads=4, num_query_groups=2, kv_channels=12, hidden_size=48,
                         gated_linear_unit=True)
    blocks = fused_row_blocks("x.linear_qkv.weight", (48, 48), mc, 2)
    assert blocks.global_rows == (48, 24, 24) and blocks.count == 3
    with pytest.raises(ValueError, match="num_query_groups=2 < tensor_model_parallel_size=4"):
        fused_row_blocks("x.linear_qkv.weight", (24, 48), mc, 4)
    with pytest.raises(ValueError, match="does not match the fused layout"):
        fused_row_blocks("x.linear_qkv.weight", (50, 48), mc, 2)


@pytest.mark.parametrize("attr, value, chunk, flag", [
    ("optimizer_cuda_graph", True, {}, "--optimizer-cuda-graph"),
    ("overlap_param_gather_with_optimizer_step", True, {}, "--overlap-param-gather-with-optimizer-step"),
    ("use_layer_wise_distributed_optimizer", True, {}, "use_layer_wise_distributed_optimizer"),
    (None, None, {"ddp_config": {"num_distributed_optimizer_instances": 2}}, "--num-distributed-optimizer-instances"),
    (None, None, {"config": {"gtp_weight_remat_size": 2}}, "gtp_weight_remat_size=2"),
])
def test_what_megatron_0_19_adds_is_refused_by_flag(attr, value, chunk, flag):
    """Checked by feature (the attribute), not by version: 0.16.1's configs simply lack some of these."""
    from types import SimpleNamespace

    config = cfg()
    if attr is not None:
        setattr(config, attr, value)
    model_chunk = SimpleNamespace(ddp_config=SimpleNamespace(**chunk.get("ddp_config", {})),
                                  config=SimpleNamespace(**chunk.get("config", {})))
    with pytest.raises(ValueError, match=r"optimizer='sinkgd' does not support: .*" + flag.replace("-", r"\-")):
        check_config(config, [], [model_chunk])
    check_config(cfg(), [], [SimpleNamespace(ddp_config=SimpleNamespace(), config=SimpleNamespace())])  # fine


def test_megatrons_own_names_pass_untouched_and_near_misses_of_ours_are_named():
    for name in ("adam", "sgd", "muon", "lion", "soap", "adaptive_muon", "dist_muon", "something_new"):
        check_name(cfg(optimizer=name))  # Megatron decides about its own names
    with pytest.raises(ValueError, match=r"'swna' is not supported\. Did you mean 'swan'\?"):
        check_name(cfg(optimizer="swna"))
