"""The sizes `pipeline bench scale` measures are the documented presets: configs/scale_10m.yaml and
configs/scale_100m.yaml, about 10M and 100M parameters (counted on the built VDM)."""

from __future__ import annotations

import argparse

import pytest

from pipeline.bench.scale import PRESETS, register
from pipeline.config import load_config
from pipeline.data.meta import DataMeta
from pipeline.objectives.registry import build_phases


@pytest.mark.parametrize("name, target", [("10m", 10e6), ("100m", 100e6)])
def test_presets_match_configs_and_sizes(name, target):
    cfg = load_config(f"configs/scale_{name}.yaml")
    assert cfg.vdm.channels == PRESETS[name]["channels"]
    meta = DataMeta(sample_shape=(1, PRESETS[name]["size"], PRESETS[name]["size"]), data_kind="spins",
                    boundary="periodic")
    numel = sum(p.numel() for p in build_phases(cfg, meta)[0].module.parameters())
    assert 0.95 * target <= numel <= 1.1 * target


def test_cli_refuses_unknown_backend_and_one_step():
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    with pytest.raises(SystemExit):
        p.parse_args(["scale", "--backends", "ddp,zero9"])
    args = p.parse_args(["scale", "--num-steps", "1"])
    with pytest.raises(ValueError, match="--num-steps must be >= 2"):
        args.func(args)
