"""One rank of ``pipeline bench scale``: build the VDM from the config overrides, train a few
optimizer steps on random spin fields through the real engine, count the model state after the
last backward, time a checkpoint save and load, write ``<out>/rank-<r>.json``.

    python -m pipeline.bench.scale_worker '{"overrides": [...], "size": 64, "batch_per_rank": 2,
                                            "num_steps": 3, "out": "DIR"}'
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.data.meta import DataMeta
from pipeline.objectives.base import StepContext
from pipeline.objectives.registry import build_phases
from pipeline.train.engines import build_engine
from pipeline.train.engines.process_exit import exit_process


def _sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    engine.barrier()


def _timed(engine, fn) -> float:
    _sync(engine)
    t0 = time.perf_counter()
    fn()
    _sync(engine)
    return time.perf_counter() - t0


def _async_save(engine, prepared, out: Path, one_step, first_step: int) -> dict:
    """train.async_checkpoint: the time the save blocks (staging), then training steps on while
    the write is in flight, until every rank's write is done (as the loop's ``poll`` does)."""
    ckpt = out / "checkpoint-async"
    if engine.is_main:
        ckpt.mkdir(parents=True, exist_ok=True)
    engine.barrier()
    holder = []
    t0 = time.perf_counter()
    stage_s = _timed(engine, lambda: holder.append(prepared.save_async(ckpt, engine.rank)))
    flight_s, step = [], first_step
    while engine.any_rank(not holder[0].done()):
        flight_s.append(_timed(engine, lambda: one_step(step)))
        step += 1
    holder[0].result()
    return {"async_stage_s": stage_s, "async_flight_step_s": flight_s, "async_write_s": time.perf_counter() - t0}


def main(spec: dict) -> None:
    cfg = load_config(None, spec["overrides"])
    engine = build_engine(cfg.engine)
    torch.manual_seed(cfg.run.seed)
    size, batch = spec["size"], spec["batch_per_rank"]
    meta = DataMeta(sample_shape=(1, size, size), data_kind="spins", boundary="periodic")
    phase = build_phases(cfg, meta)[0]
    num_params = sum(p.numel() for p in phase.module.parameters())
    prepared = engine.prepare(phase, cfg.train)
    g = torch.Generator().manual_seed(engine.rank)
    step_s, state = [], None

    def one_step(step: int, count_state: bool = False) -> None:
        nonlocal state
        x = torch.randint(0, 2, (batch, 1, size, size), generator=g).float().mul_(2).sub_(1)
        ctx = StepContext(step, 0, 1, engine.rank, engine.world_size)
        with prepared.accumulating(True):
            prepared.backward(prepared.forward({"x": x.to(engine.device)}, ctx).loss)
        if count_state:  # Adam state exists from the first step on
            state = prepared.model_state_bytes()
        prepared.step(True)

    for step in range(spec["num_steps"]):
        step_s.append(_timed(engine, lambda: one_step(step, count_state=step == spec["num_steps"] - 1)))
    ckpt = Path(spec["out"]) / "checkpoint"
    if engine.is_main:
        ckpt.mkdir(parents=True, exist_ok=True)
    engine.barrier()
    save_s = _timed(engine, lambda: prepared.save(ckpt, engine.rank))
    load_s = _timed(engine, lambda: prepared.load(ckpt, engine.rank))
    extra = _async_save(engine, prepared, Path(spec["out"]), one_step, spec["num_steps"]) \
        if cfg.train.async_checkpoint else {}
    record = {"rank": engine.rank, "params": num_params, "model_state_bytes": state, "step_s": step_s,
              "save_s": save_s, "load_s": load_s, **extra,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "cuda_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if engine.device.type == "cuda" else None}
    (Path(spec["out"]) / f"rank-{engine.rank}.json").write_text(json.dumps(record))
    engine.barrier()
    engine.close()
    exit_process(0)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
