"""One rank of ``pipeline bench scale``: build the objective's phases (the VDM's one; the GAN's D
and G) from the config overrides, train a few optimizer steps on random spin fields through the
real engine (each phase with its frozen modules, as the training loop does), count each phase's
model state after its last backward, time a checkpoint save and load of every phase, write
``<out>/rank-<r>.json``.

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
    futures = []
    t0 = time.perf_counter()
    stage_s = _timed(engine, lambda: futures.extend(ph.save_async(ckpt, engine.rank) for ph in prepared))
    flight_s, step = [], first_step
    while engine.any_rank(not all(f.done() for f in futures)):
        flight_s.append(_timed(engine, lambda: one_step(step)))
        step += 1
    for f in futures:
        f.result()
    return {"async_stage_s": stage_s, "async_flight_step_s": flight_s, "async_write_s": time.perf_counter() - t0}


def main(spec: dict) -> None:
    cfg = load_config(None, spec["overrides"])
    engine = build_engine(cfg.engine)
    torch.manual_seed(cfg.run.seed)
    size, batch = spec["size"], spec["batch_per_rank"]
    meta = DataMeta(sample_shape=(1, size, size), data_kind="spins", boundary="periodic")
    phases = build_phases(cfg, meta)
    num_params = {p.name: sum(t.numel() for t in p.module.parameters()) for p in phases}
    prepared = [engine.prepare(p, cfg.train) for p in phases]
    g = torch.Generator().manual_seed(engine.rank)
    step_s, state = [], {}

    def one_step(step: int, count_state: bool = False) -> None:
        x = torch.randint(0, 2, (batch, 1, size, size), generator=g).float().mul_(2).sub_(1)
        ctx = StepContext(step, 0, 1, engine.rank, engine.world_size)
        for ph in prepared:
            with ph.frozen():  # a GAN phase runs through the other network, frozen
                with ph.accumulating(True):
                    ph.backward(ph.forward({"x": x.to(engine.device)}, ctx).loss)
                if count_state:  # Adam state exists from the first step on
                    state[ph.name] = ph.model_state_bytes()
                ph.step(True)

    for step in range(spec["num_steps"]):
        step_s.append(_timed(engine, lambda: one_step(step, count_state=step == spec["num_steps"] - 1)))
    ckpt = Path(spec["out"]) / "checkpoint"
    if engine.is_main:
        ckpt.mkdir(parents=True, exist_ok=True)
    engine.barrier()
    save_s = _timed(engine, lambda: [ph.save(ckpt, engine.rank) for ph in prepared])
    load_s = _timed(engine, lambda: [ph.load(ckpt, engine.rank) for ph in prepared])
    extra = _async_save(engine, prepared, Path(spec["out"]), one_step, spec["num_steps"]) \
        if cfg.train.async_checkpoint else {}
    # Per phase, and summed over the phases: the GAN's D and G both live on every rank
    total = {k: sum(v[k] for v in state.values()) for k in next(iter(state.values()))}
    record = {"rank": engine.rank, "params": sum(num_params.values()), "params_per_phase": num_params,
              "model_state_bytes": total, "model_state_bytes_per_phase": state, "step_s": step_s,
              "save_s": save_s, "load_s": load_s, **extra,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "cuda_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if engine.device.type == "cuda" else None}
    (Path(spec["out"]) / f"rank-{engine.rank}.json").write_text(json.dumps(record))
    engine.barrier()
    engine.close()
    exit_process(0)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
