"""`pipeline bench scale --preset tiny` (0.1M parameters, 2 gloo processes, 2 steps, DDP, ZeRO-3,
FSDP): the JSON contract, and model-state bytes per rank against counts made here from the
network itself (numel x 4 bytes: fp32 parameters, gradients, Adam's two moments)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_pipeline

pytestmark = pytest.mark.integration
MB = 2**20


def _numel() -> int:
    from pipeline.config import load_config
    from pipeline.data.meta import DataMeta
    from pipeline.objectives.registry import build_phases

    cfg = load_config(None, ["run.dir=x", "data.train_urls=x", "train.num_steps=1", "vdm.data_kind=spins",
                             "vdm.channels=24"])
    module = build_phases(cfg, DataMeta(sample_shape=(1, 16, 16), data_kind="spins", boundary="periodic"))[0].module
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    work = tmp_path_factory.mktemp("scale")
    r = run_pipeline("bench", "scale", "--preset", "tiny", "--backends", "ddp,zero3,fsdp,ddp_async", "--num-steps", "2",
                     "--work-dir", str(work), timeout=600)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_json_contract(result):
    for key in ("params", "mem_ratio_zero3_vs_ddp", "mem_ratio_fsdp_vs_ddp", "step_time_ratio_fsdp_vs_ddp",
                "checkpoint_share", "mfu", "backends"):
        assert key in result, key
    assert set(result["checkpoint_share"]) == {"ddp", "zero3", "fsdp", "ddp_async"}
    assert all(0 < v < 1 for v in result["checkpoint_share"].values())
    for b in result["backends"].values():
        assert b["step_time_s"] > 0 and b["save_s"] > 0 and b["load_s"] > 0 and b["peak_rss_mb"] > 100
    a = result["backends"]["ddp_async"]
    assert a["async"]["stage_s"] > 0 and a["async"]["write_s"] >= a["async"]["stage_s"]
    assert a["async"]["blocking_s"] == a["async"]["stage_s"] + a["async"]["slowdown_s"]
    step, blocking = a["step_time_s"], a["async"]["blocking_s"]
    assert a["checkpoint_share"] == pytest.approx(blocking / (100 * step + blocking))
    assert a["checkpoint_share_sync"] == pytest.approx(a["save_s"] / (100 * step + a["save_s"]))


def test_ddp_holds_the_whole_state_on_each_rank(result):
    n = _numel()
    assert result["params"] == n
    assert result["backends"]["ddp"]["model_state_mb"] == {"params": 4 * n / MB, "grads": 4 * n / MB,
                                                           "optimizer": 8 * n / MB}


def test_sharding_halves_the_state_per_rank_on_two_ranks(result):
    n = _numel()
    fsdp = result["backends"]["fsdp"]["model_state_mb"]
    for key, per_param in (("params", 4), ("grads", 4), ("optimizer", 8)):
        # half of each, plus at most one padded row per sharded tensor
        assert per_param * n / 2 / MB <= fsdp[key] <= 1.02 * per_param * n / 2 / MB, key
    assert 0.5 <= result["mem_ratio_fsdp_vs_ddp"] <= 0.51
    zero3 = result["backends"]["zero3"]["model_state_mb"]
    assert zero3["params"] <= 1.01 * 4 * n / 2 / MB
    # ZeRO-3 keeps an fp32 master partition beside fp32 parameter partitions: 5/8 of DDP's state
    assert result["mem_ratio_zero3_vs_ddp"] == pytest.approx(5 / 8, abs=0.01)
