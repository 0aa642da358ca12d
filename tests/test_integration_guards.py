"""If an engine internal the adapters read has moved, they fail loudly with the installed and tested versions."""

from __future__ import annotations

import deepspeed
import pytest

from sinkgd_ds.integrations import deepspeed as ds_integration
from sinkgd_ds.integrations import megatron as mcore_integration


class Moved:
    """Stands for a ZeRO optimizer / Megatron buffer of a release where an attribute was renamed."""


def test_deepspeed_internal_missing_names_versions():
    with pytest.raises(ds_integration.DeepSpeedIntegrationError) as e:
        ds_integration._require(Moved(), "round_robin_bit16_offsets")
    msg = str(e.value)
    assert f"DeepSpeed {deepspeed.__version__}" in msg and "deepspeed 0.19.8" in msg
    assert "Moved.round_robin_bit16_offsets" in msg


def test_megatron_internal_missing_names_versions():
    with pytest.raises(mcore_integration.MegatronIntegrationError) as e:
        mcore_integration.require(Moved(), "param_range_map")
    msg = str(e.value)
    assert f"megatron-core {mcore_integration.mcore_version()}" in msg and "megatron-core 0.16.1" in msg
    assert mcore_integration.mcore_version() != "unknown"
