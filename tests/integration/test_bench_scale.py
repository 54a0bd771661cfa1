"""`pipeline bench scale --preset tiny` (2 gloo processes, 2 steps, DDP, ZeRO-3, FSDP) for the VDM
(0.1M parameters) and the GAN (G and D, 22k): the JSON contract, and model-state bytes per rank
against counts made here from the networks themselves (numel x 4 bytes: fp32 parameters,
gradients, Adam's two moments; for the GAN both networks, since both phases live on every rank)."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_pipeline

# One xdist worker runs the whole module, so its module-scoped fixture runs once, not once per
# worker (Makefile, TEST_WORKERS).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("bench_scale")]
MB = 2**20
# DeepSpeed's documented default stage3_param_persistence_threshold: ZeRO-3 keeps parameters of at
# most this many elements whole on every rank (beside their partition) instead of releasing them.
# The tiny presets' tensors are all below it.
ZERO3_PERSISTENCE_THRESHOLD = 100_000
OVERRIDES = {"vdm": ["vdm.data_kind=spins", "vdm.channels=24"], "gan": ["objective=gan", "gan.channels=[8,16]"]}


def _numels(objective: str) -> dict[str, list[int]]:
    """Per phase, the numel of every parameter tensor of the built networks."""
    from pipeline.config import load_config
    from pipeline.data.meta import DataMeta
    from pipeline.objectives.registry import build_phases

    cfg = load_config(None, ["run.dir=x", "data.train_urls=x", "train.num_steps=1", *OVERRIDES[objective]])
    phases = build_phases(cfg, DataMeta(sample_shape=(1, 16, 16), data_kind="spins", boundary="periodic"))
    return {p.name: [t.numel() for t in p.module.parameters()] for p in phases}


# The asynchronous checkpoint (train.async_checkpoint) is timed on the VDM only: one launch fewer.
BACKENDS = {"vdm": ["ddp", "zero3", "fsdp", "ddp_async"], "gan": ["ddp", "zero3", "fsdp"]}


@pytest.fixture(scope="module", params=["vdm", "gan"])
def result(request, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"scale-{request.param}")
    r = run_pipeline("bench", "scale", "--objective", request.param, "--preset", "tiny", "--backends",
                     ",".join(BACKENDS[request.param]), "--num-steps", "2", "--work-dir", str(work), timeout=600)
    return request.param, json.loads(r.stdout.strip().splitlines()[-1])


def test_json_contract(result):
    objective, result = result
    for key in ("params", "mem_ratio_zero3_vs_ddp", "mem_ratio_fsdp_vs_ddp", "step_time_ratio_fsdp_vs_ddp",
                "checkpoint_share", "mfu", "backends"):
        assert key in result, key
    assert result["objective"] == objective
    assert set(result["checkpoint_share"]) == set(BACKENDS[objective])
    assert all(0 < v < 1 for v in result["checkpoint_share"].values())
    for b in result["backends"].values():
        assert b["step_time_s"] > 0 and b["save_s"] > 0 and b["load_s"] > 0 and b["peak_rss_mb"] > 100
    if "ddp_async" not in BACKENDS[objective]:
        return
    a = result["backends"]["ddp_async"]
    assert a["async"]["stage_s"] > 0 and a["async"]["write_s"] >= a["async"]["stage_s"]
    assert a["async"]["blocking_s"] == a["async"]["stage_s"] + a["async"]["slowdown_s"]
    step, blocking = a["step_time_s"], a["async"]["blocking_s"]
    assert a["checkpoint_share"] == pytest.approx(blocking / (100 * step + blocking))
    assert a["checkpoint_share_sync"] == pytest.approx(a["save_s"] / (100 * step + a["save_s"]))


def test_ddp_holds_the_whole_state_on_each_rank(result):
    objective, result = result
    numels = _numels(objective)
    assert result["params_per_phase"] == {k: sum(v) for k, v in numels.items()}
    n = sum(map(sum, numels.values()))
    assert result["params"] == n
    assert result["backends"]["ddp"]["model_state_mb"] == {"params": 4 * n / MB, "grads": 4 * n / MB,
                                                           "optimizer": 8 * n / MB}


def test_sharding_halves_the_state_per_rank_on_two_ranks(result):
    objective, result = result
    sizes = [s for v in _numels(objective).values() for s in v]
    n = sum(sizes)
    fsdp = result["backends"]["fsdp"]["model_state_mb"]
    for key, per_param in (("params", 4), ("grads", 4), ("optimizer", 8)):
        # half of each (of both networks for the GAN), plus at most one padded row per sharded tensor
        assert per_param * n / 2 / MB <= fsdp[key] <= 1.02 * per_param * n / 2 / MB, key
    assert 0.5 <= result["mem_ratio_fsdp_vs_ddp"] <= 0.51
    zero3 = result["backends"]["zero3"]["model_state_mb"]
    # ZeRO-3: each parameter's partition (numel / 2, rounded up, padded), plus the whole tensor of
    # the small ones it keeps persistent; fp32 master partitions beside them, partitioned gradients.
    persistent = sum(s for s in sizes if s <= ZERO3_PERSISTENCE_THRESHOLD)
    halves = sum(math.ceil(s / 2) for s in sizes)
    assert 4 * (persistent + halves) / MB <= zero3["params"] <= 4 * (persistent + 1.01 * halves) / MB
    assert 4 * n / 2 / MB <= zero3["grads"] <= 1.01 * 4 * n / 2 / MB
    assert (4 + 8) * n / 2 / MB <= zero3["optimizer"] <= 1.01 * (4 + 8) * n / 2 / MB
    expected = (4 * persistent + 4 * n / 2 + 4 * n / 2 + 12 * n / 2) / (16 * n)
    assert result["mem_ratio_zero3_vs_ddp"] == pytest.approx(expected, abs=0.01)
