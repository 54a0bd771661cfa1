"""launch/*.yaml are Accelerate configs that Accelerate itself accepts and turns into the
intended launch; launch/ds_zero*.json are DeepSpeed configs DeepSpeed's validator accepts.

Each YAML goes through Accelerate's own parsing and validation (the code `accelerate launch
--config_file X` runs) and, for multi-process configs, through the environment it would hand
to torchrun; a misspelt key, an unknown distributed type or a wrong sharding strategy fails.
cpu.yaml is also launched for real: two processes must start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"

# file -> (distributed type, processes, environment entries torchrun's workers would get)
EXPECTED = {
    "cpu.yaml": ("MULTI_GPU", 2, {}),
    "gpu.yaml": ("NO", 1, {}),
    "multi_gpu.yaml": ("MULTI_GPU", 8, {}),
    # FSDP and DeepSpeed through the project's own backends: plain multi-process launches.
    "fsdp.yaml": ("MULTI_GPU", 8, {}),
    "deepspeed_zero2.yaml": ("MULTI_GPU", 8, {}),
    "deepspeed_zero3.yaml": ("MULTI_GPU", 8, {}),
}


def test_every_launch_config_is_covered():
    assert sorted(p.name for p in LAUNCH.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_accepts_launch_config(name, monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType
    from accelerate.utils.launch import prepare_multi_gpu_env

    kind, num_processes, env = EXPECTED[name]
    path = str(LAUNCH / name)
    cfg = load_config_from_file(path)  # unknown keys / values raise here
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type == DistributedType(kind)
    assert cfg.num_processes == num_processes
    assert cfg.use_cpu is False  # --cpu would start a single process (see cpu.yaml)

    args = launch_command_parser().parse_args(["--config_file", path, "--main_process_port", "0", "x.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == num_processes
    assert bool(args.multi_gpu) == (kind == "MULTI_GPU")
    assert not args.use_fsdp  # the FSDP backend applies fully_shard itself (engine.fsdp)
    assert not args.use_deepspeed  # the DeepSpeed backend calls deepspeed.initialize itself
    if kind == "MULTI_GPU":
        worker_env = prepare_multi_gpu_env(args)
        for key, value in env.items():
            assert worker_env.get(key) == value, key
        assert args.nproc_per_node == str(num_processes)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_json_is_what_the_backend_runs(stage, tmp_path):
    """The launch JSON is the base of the backend's DeepSpeed config: its ZeRO tuning survives the
    merge, the training config decides batching/clipping/precision, and DeepSpeed's own
    validator accepts the result."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from pipeline.config import ConfigError, EngineConfig, TrainConfig
    from pipeline.train.engines.deepspeed import ds_config

    assert (LAUNCH / f"deepspeed_zero{stage}.yaml").is_file()
    text = (LAUNCH / f"deepspeed_zero{stage}.yaml").read_text()
    path = LAUNCH / f"ds_zero{stage}.json"
    assert f"ds_zero{stage}.json" in text and f"engine.zero_stage={stage}" in text
    raw = json.loads(path.read_text())
    eng = EngineConfig(backend="deepspeed", zero_stage=stage, deepspeed_config=str(path))
    merged = ds_config(eng, TrainConfig(num_steps=10, grad_accum_steps=4, grad_clip_norm=0.5))
    ds = DeepSpeedConfig(merged)  # pydantic: unknown or mistyped ZeRO keys raise
    assert ds.zero_optimization_stage == stage
    assert merged["gradient_accumulation_steps"] == 4 and merged["gradient_clipping"] == 0.5
    assert merged["zero_optimization"]["reduce_bucket_size"] == raw["zero_optimization"]["reduce_bucket_size"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**raw, "train_micro_batch_size_per_gpu": 64}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        ds_config(EngineConfig(backend="deepspeed", zero_stage=stage, deepspeed_config=str(bad)),
                  TrainConfig(num_steps=10))


def test_cpu_config_starts_two_processes(tmp_path):
    # Each worker leaves a file named after its rank: evidence that does not depend on how the
    # launcher forwards the workers' stdout (a CI run once captured none of it, exit code 0).
    script = tmp_path / "rank.py"  # no torch import: keeps this fast
    script.write_text(
        "import os, pathlib, sys\n"
        "rank, world = os.environ['RANK'], os.environ['WORLD_SIZE']\n"
        "pathlib.Path(sys.argv[1], f'rank-{rank}-of-{world}').write_text(str(os.getpid()))\n"
        "print('rank', rank, 'of', world, flush=True)\n"
    )
    out = tmp_path / "ranks"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "cpu.yaml"),
         "--main_process_port", "0", str(script), str(out)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    why = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0, why
    assert sorted(p.name for p in out.iterdir()) == ["rank-0-of-2", "rank-1-of-2"], why
    pids = {p.read_text() for p in out.iterdir()}
    assert len(pids) == 2, f"both ranks ran in one process: {pids}"
