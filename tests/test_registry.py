"""One registry of optimizer names (sinkgd_ds.registry), read by every front end."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest
import torch

import sinkgd_ds
from sinkgd_ds.registry import MEGATRON_COMMON_FIELDS, REGISTRY, keys, lookup, names


def test_lookup_and_names():
    assert names() == ["SinkGD", "SCALE", "SWAN"] and keys() == ("sinkgd", "scale", "swan")
    assert lookup("sinkgd").cls is sinkgd_ds.SinkGD and lookup("SWAN").key == "swan"
    assert lookup("adam") is None and lookup(None) is None
    assert sinkgd_ds.OPTIMIZERS == {n: e.cls for n, e in REGISTRY.items()}


def test_deepspeed_and_the_main_job_read_it():
    from launch.config import known_optimizers
    from sinkgd_ds.integrations import deepspeed as ds

    assert set(ds.OPTIMIZERS) == set(names())
    for name in names():
        assert ds.canonical_name(name.upper()) == name
        assert set(names()) <= set(known_optimizers())
        if sinkgd_ds.DEEPSPEED_REGISTERED:
            assert getattr(torch.optim, name) is REGISTRY[name].cls


def test_megatron_reads_it():
    pytest.importorskip("megatron.core")
    from launch.pretrain_megatron import OPTIMIZERS
    from megatron_patch.config import CONFIGS, OURS
    from megatron_patch.training import add_arguments

    assert OURS == keys() and set(keys()) < set(OPTIMIZERS)
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", choices=["adam", "sgd"])
    add_arguments(parser)
    assert set(keys()) <= set(next(a for a in parser._actions if "--optimizer" in a.option_strings).choices)
    for entry in REGISTRY.values():
        cfg = CONFIGS[entry.key]
        assert cfg().optimizer == entry.key
        fields = {f.name: f.default for f in dataclasses.fields(cfg)}
        defaults = inspect.signature(entry.cls.__init__).parameters
        for field, kw in {**MEGATRON_COMMON_FIELDS, **entry.megatron_fields}.items():
            assert field in fields, (entry.name, field)
            if field in entry.megatron_fields or field.startswith("sinkgd_"):  # our fields: our defaults
                assert fields[field] == defaults[kw].default, (entry.name, field)
