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
