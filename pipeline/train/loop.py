"""The training loop: phases in order, every step, on any backend.

A loop step runs each phase ``repeats`` times (GAN: D ``n_critic`` times, then G; VDM: one
phase). Each optimizer step accumulates ``grad_accum_steps`` micro batches, checks the loss
and gradient norm for NaN/Inf on every rank together, clips, steps. Then EMA, logging,
checkpoints, and a collective check for a preemption signal.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from pipeline.config import Config, TrainConfig, save_config, saved_dict
from pipeline.data.meta import DataMeta
from pipeline.data.stream import Stream, build_stream, read_meta
from pipeline.errors import ConfigError
from pipeline.objectives.registry import build_phases
from pipeline.objectives.base import StepContext
from pipeline.run_dir import RunDir
from pipeline.track.metrics import memory_metrics
from pipeline.track.tracker import Tracker
from pipeline.train.checkpoint import LATEST, Checkpointer, atomic_write_text
from pipeline.train.ema import EMA
from pipeline.train.compile import compile_networks
from pipeline.train.engines import build_engine
from pipeline.train.engines.base import Engine, PreparedPhase
from pipeline.train.export import export_step, write_export
from pipeline.train.state import RNGState, TrainState, seed_everything

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: checkpointed on a signal, asks the launcher to requeue


class TrainingDiverged(RuntimeError):
    """train.max_bad_steps consecutive NaN/Inf steps: the run stops (exit 1)."""


# RunDir.preempted is written by rank 0 once the preemption checkpoint is complete. `accelerate
# launch` does not pass the ranks' 75 on (its elastic agent exits 128 + 15 on SIGTERM), so
# slurm/train.sbatch and launch/requeue_exit.sh read that file to exit 75 themselves.
class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1; acted on at the next step boundary by every rank together."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True

    @staticmethod
    def record(run_dir: RunDir, step: int) -> None:
        """Say in run.dir that the preemption checkpoint of ``step`` is complete: written after
        it (``latest`` names it by then), atomically, so a reader never sees half a file."""
        name = (run_dir.checkpoints / LATEST).read_text().strip()
        atomic_write_text(run_dir.preempted,
                          json.dumps({"step": step, "checkpoint": name, "exit_code": REQUEUE_EXIT_CODE}))

    def ignore_further(self) -> None:
        """Once the checkpoint is written, a second signal must not kill the process on its way
        out: when one rank exits 75, torch's elastic agent SIGTERMs the others, and Python's
        shutdown restores the default action (terminate) of handled signals, not of ignored
        ones. Without this a rank still exiting was seen to end with -15 instead of 75."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)


class Meter:
    """Sums of metrics over a logging interval, averaged over steps and ranks when read."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, prefix: str, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[f"{prefix}/{k}"] += float(v)
            self.counts[f"{prefix}/{k}"] += 1

    def reduce(self, engine: Engine) -> dict[str, float]:
        keys = sorted(self.sums)  # identical on every rank: same phases, same metric names
        t = torch.tensor([[self.sums[k], self.counts[k]] for k in keys], dtype=torch.float64).reshape(-1, 2)
        t = engine.all_reduce_sum(t.to(engine.device)).cpu()
        self.sums.clear()
        self.counts.clear()
        return {k: float(s / c) for k, (s, c) in zip(keys, t.tolist()) if c > 0}


def optimizer_step(ph: PreparedPhase, batches, state: TrainState, engine: Engine, train: TrainConfig,
                   seed: int) -> dict:
    """One optimizer step of one phase over ``grad_accum_steps`` micro batches (``seed``: the
    run's, for the objectives' per-sample draws)."""
    metrics: dict[str, float] = defaultdict(float)
    losses = []
    for micro in range(train.grad_accum_steps):
        t0 = time.perf_counter()
        batch = {k: v.to(engine.device, non_blocking=True) for k, v in next(batches).items()}
        metrics["data_wait_s"] += time.perf_counter() - t0
        ctx = StepContext(state.step, micro, train.grad_accum_steps, engine.rank, engine.world_size, seed)
        with ph.accumulating(is_last_micro_step=micro == train.grad_accum_steps - 1):
            out = ph.forward(batch, ctx)
            ph.backward(out.loss / train.grad_accum_steps)
        losses.append(out.loss.detach())
        for k, v in out.metrics().items():
            metrics[k] += v / train.grad_accum_steps
        ph.module.after_micro_step(out, engine.all_gather)  # e.g. a time-step sampler's loss history
    loss_ok = all(bool(torch.isfinite(x).all()) for x in losses)
    grad_norm, skipped = ph.step(local_ok=loss_ok)
    ph.module.after_optimizer_step(engine.all_gather)
    metrics["lr"] = ph.lr()
    metrics["skipped"] = float(skipped)
    if not skipped:
        metrics["grad_norm"] = grad_norm
        state.consecutive_bad_steps = 0
        return dict(metrics)
    state.bad_steps += 1
    state.consecutive_bad_steps += 1
    if state.consecutive_bad_steps >= train.max_bad_steps:
        raise TrainingDiverged(
            f"{state.consecutive_bad_steps} consecutive steps with NaN/Inf loss or gradients "
            f"(train.max_bad_steps={train.max_bad_steps}) in phase {ph.name!r} at step {state.step}; "
            "stopping. The last good checkpoint is intact."
        )
    return dict(metrics)


def train(cfg: Config, meta: DataMeta | None = None) -> int:
    """Train ``cfg`` to ``train.num_steps``; return the process's exit code (0, or
    :data:`REQUEUE_EXIT_CODE` when preempted). ``meta``: the data's metadata as the CLI read
    it (read here when None).

    The outline, read top to bottom (edm's training_loop); each step is a method of
    :class:`_Training`. Every exit path goes through ``finally``: the tracker's record of how
    the run ended, then the stream and the engine closed."""
    run = _Training(cfg, build_engine(cfg.engine))
    exit_code: int | None = None  # set on the way out; an exception leaves it None until caught
    try:
        run.set_up(meta)  # networks, phases, EMA, stream, checkpoint restored, tracker
        while run.state.step < cfg.train.num_steps:
            run.loop_step()  # each phase `repeats` optimizer steps, then EMA
            run.maintenance()  # log, sample, checkpoint at their cadence
            if run.engine.any_rank(run.preempt.requested):  # every rank together
                exit_code = run.preempted()
                return exit_code
        run.finish()  # final samples, where everything is
        exit_code = 0
        return exit_code
    except BaseException as e:
        # What the process will exit with (pipeline.cli: 2 for a ConfigError; an uncaught
        # exception, e.g. TrainingDiverged, exits 1), so the tracker records the failure
        # instead of a success (issue 15 item 4).
        exit_code = 2 if isinstance(e, ConfigError) else 1
        run.record_error(e)
        raise
    finally:
        run.close(exit_code)


class _Training:
    """One run's components (typed attributes, as torchtitan's trainer lists them) and the
    steps :func:`train` calls in order. Attributes are set by :meth:`set_up`; until then the
    stream and the tracker are None, which :meth:`close` allows for."""

    def __init__(self, cfg: Config, engine: Engine):
        self.cfg, self.engine = cfg, engine
        self.run_dir = RunDir(cfg.run.dir)
        self.tracker: Tracker | None = None
        self.stream: Stream | None = None
        self.ckpt: Checkpointer | None = None

    # ---- set-up and restore

    def set_up(self, meta: DataMeta | None) -> None:
        cfg, engine = self.cfg, self.engine
        if engine.is_main:
            self.run_dir.root.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.run.seed * 1000 + engine.rank)
        self.meta = meta if meta is not None else read_meta(cfg.data.train_urls)
        built = build_phases(cfg, self.meta)
        if cfg.engine.compile:
            for p in built:
                assert compile_networks(p.module), f"phase {p.name!r} holds no network to compile"
        self.phases = [engine.prepare(p, cfg.train) for p in built]
        self.sampled = next(p for p in self.phases if p.phase.ema)
        self.ema = EMA(self.sampled, cfg.train.ema_decay)
        self.stream = build_stream(cfg.data, rank=engine.rank, world_size=engine.world_size, seed=cfg.run.seed,
                                   meta=self.meta)
        self.state, self.rng = TrainState(), RNGState()
        self.ckpt = Checkpointer(self.run_dir.checkpoints, engine, keep_last=cfg.train.keep_last_checkpoints,
                                 keep_every=cfg.train.keep_every_steps, config_hash=cfg.hash(), seed=cfg.run.seed)
        self.shared = {"trainer": self.state, "ema": self.ema}
        self.per_rank = {"stream": self.stream, "rng": self.rng}
        manifest = _restore(self.ckpt, self.phases, self.shared, self.per_rank, cfg, engine, self.run_dir)
        self.tracker = _tracker(cfg, self.run_dir, engine, resume=manifest is not None)
        if manifest is not None:
            self._repair_export()
        if self.state.step >= cfg.train.num_steps and engine.is_main:
            print(f"step {self.state.step} = train.num_steps: the run is finished, nothing to train "
                  f"(raise train.num_steps to train longer)", flush=True)
        self.preempt = PreemptionFlag()
        self.reference: dict = {}  # a real batch, to compare the physics of samples against
        self.batches = _remember_first(iter(self.stream), self.reference)
        self.meter = Meter()
        self.global_batch = cfg.data.batch_per_rank * engine.world_size * cfg.train.grad_accum_steps
        self.t_log, self.steps_since_log = time.perf_counter(), 0

    def _repair_export(self) -> None:
        """A crash between a checkpoint and its export (or a damaged export) leaves sample and
        evaluate without the weights of the step resumed from: write them again."""
        if self.engine.is_main and export_step(self.run_dir.root) != self.state.step:
            print(f"export: missing or not of step {self.state.step}; rewriting it from the checkpoint", flush=True)
            write_export(self.run_dir.root, self.ema.module, saved_dict(self.cfg), self.meta, self.state.step)

    # ---- one loop step: each phase `repeats` optimizer steps, then EMA

    def loop_step(self) -> None:
        for ph in self.phases:
            with ph.frozen():
                for _ in range(ph.phase.repeats):
                    metrics = optimizer_step(ph, self.batches, self.state, self.engine, self.cfg.train,
                                             self.cfg.run.seed)
                    self.meter.add(ph.name, metrics)
        self.ema.update(self.sampled)
        self.state.step += 1
        self.state.samples_seen += self.global_batch
        self.steps_since_log += 1

    # ---- maintenance: log, sample, checkpoint (every rank together)

    def maintenance(self) -> None:
        t, step = self.cfg.train, self.state.step
        self._committed(self.ckpt.poll())  # an asynchronous checkpoint whose writes are all done
        if step % t.log_every_steps == 0 or step == t.num_steps:
            elapsed = time.perf_counter() - self.t_log
            _log_interval(self.meter, self.phases, self.engine, self.tracker, self.stream, self.state,
                          self.global_batch * self.steps_since_log, elapsed, self.steps_since_log)
            self.t_log, self.steps_since_log = time.perf_counter(), 0
        every = t.sample_every_steps
        if self.engine.is_main and every and step % every == 0 and step < t.num_steps:
            _sample_and_observe(self.ema.module, self.meta, self.cfg, self.tracker, self.reference, step)
        if step % t.checkpoint_every_steps == 0 or step == t.num_steps:
            self.save()

    def save(self) -> None:
        """A checkpoint of every rank, then (rank 0) the export of its EMA weights. With
        train.async_checkpoint the checkpoint is only staged here and committed later
        (:meth:`_committed`); the export is of this step either way."""
        self._committed(self.ckpt.finalize())  # the one still in flight counts first
        self.t_save, self.saved_step = time.perf_counter(), self.state.step  # at most one in flight
        args = (self.state.step, self.phases, self.shared, self.per_rank)
        if self.cfg.train.async_checkpoint:
            self.ckpt.save_async(*args, data=self.stream.position_record())
            path = None
        else:
            path = self.ckpt.save(*args, data=self.stream.position_record())
        if self.engine.is_main:
            write_export(self.run_dir.root, self.ema.module, saved_dict(self.cfg), self.meta, self.state.step)
        self._committed(path)

    def _committed(self, path: Path | None) -> None:
        """Log the checkpoint that now counts (``seconds``: since its save began)."""
        if path is not None and self.engine.is_main:
            self.tracker.log_event("checkpoint", step=self.saved_step, path=str(path),
                                   seconds=time.perf_counter() - self.t_save)

    def preempted(self) -> int:
        """A signal reached some rank: checkpoint (unless this step just did), say so in
        run.dir, and return the exit code that asks the launcher to requeue."""
        if self.state.step % self.cfg.train.checkpoint_every_steps != 0:
            self.save()
        self._committed(self.ckpt.finalize())  # before saying so: `latest` must name it
        if self.engine.is_main:
            PreemptionFlag.record(self.run_dir, self.state.step)
            print(f"preempted: checkpoint at step {self.state.step}; exiting {REQUEUE_EXIT_CODE} to requeue",
                  file=sys.stderr, flush=True)
        self.preempt.ignore_further()
        return REQUEUE_EXIT_CODE

    # ---- the end

    def finish(self) -> None:
        self._committed(self.ckpt.finalize())
        if self.engine.is_main:
            path = _sample_and_observe(self.ema.module, self.meta, self.cfg, self.tracker, self.reference,
                                       self.state.step)
            _print_where(self.run_dir, path, self.ckpt)
        self.engine.barrier()  # ranks leave together: none tears down the process group mid-sampling

    def record_error(self, e: BaseException) -> None:
        if self.tracker is not None:  # the reason beside the flag (scrubbed like every event field)
            self.tracker.log_event("error", error=f"{type(e).__name__}: {e}")

    def close(self, exit_code: int | None) -> None:
        """What every exit path does: the tracker's record of the outcome, then the stream and
        the engine closed."""
        if exit_code not in (0, REQUEUE_EXIT_CODE) and self.ckpt is not None:
            self.ckpt.abandon()  # finish() and preempted() commit it; after an error it does not count
        if self.tracker is not None:
            failed = exit_code not in (0, REQUEUE_EXIT_CODE)  # preempted: checkpointed, to be resumed
            self.tracker.close(failed=failed, exit_code=exit_code)
        if self.stream is not None:
            self.stream.close()
        self.engine.close()


def _tracker(cfg: Config, run_dir: RunDir, engine: Engine, *, resume: bool) -> Tracker:
    return Tracker(cfg.track, run_dir.root, cfg.to_dict(), is_main=engine.is_main, total_steps=cfg.train.num_steps,
                   resume=resume)


def _restore(ckpt: Checkpointer, phases, shared: dict, per_rank: dict, cfg: Config, engine: Engine,
             run_dir: RunDir) -> dict | None:
    """Restore the newest valid checkpoint (None: a fresh start), then write config.yaml: only
    now, so that until a resume is accepted config.yaml stays the config that produced the
    checkpoints (see train/resume.py)."""
    manifest = ckpt.restore(phases, shared, per_rank)
    if manifest is not None and engine.is_main:
        print(f"resumed from step {shared['trainer'].step} ({manifest['step']})", flush=True)
    if engine.is_main:
        save_config(cfg, run_dir.config)
    return manifest


def _log_interval(meter: Meter, phases: list[PreparedPhase], engine: Engine, tracker, stream, state: TrainState,
                  num_samples: int, elapsed_s: float, num_steps: int) -> None:
    """One logging step: the interval's metrics averaged over steps and ranks, throughput,
    counters, memory, and each objective's report (its metrics, and its profiles as events)."""
    metrics = meter.reduce(engine)
    metrics["perf/samples_per_s"] = num_samples / elapsed_s
    metrics["perf/step_time_s"] = elapsed_s / num_steps
    # Summed over ranks: each rank counts its own slots; their sum is the count of the global
    # positions so far, the same on any world size (substitutes are defined globally).
    corrupt = torch.tensor([float(stream.corrupt_count)], dtype=torch.float64, device=engine.device)
    metrics["data/corrupt_samples"] = float(engine.all_reduce_sum(corrupt).item())
    metrics["data/storage_retries"] = float(stream.storage_retries)
    metrics["train/bad_steps"] = float(state.bad_steps)
    metrics["train/samples_seen"] = float(state.samples_seen)
    metrics.update(memory_metrics())
    reports = []
    for ph in phases:  # objective-specific views (VDM: per-t profile, p_t, ELBO variance)
        with ph.full_weights():  # e.g. gamma(t) of a learned schedule, outside forward
            reports.append(ph.module.report())
    for rep in reports:
        metrics.update(rep.metrics)
    tracker.log(metrics, step=state.step)
    for rep in reports:
        for name, profile in rep.profiles.items():
            tracker.log_profile(name, profile, step=state.step)


def _print_where(run_dir: RunDir, samples_path, ckpt: Checkpointer) -> None:
    """The last lines of a finished run: where its directory, samples and checkpoint are."""
    print(f"run: {run_dir.root.resolve()}")
    # No grid for samples that are not images (vectors, points): say so rather than "None".
    where = (Path(samples_path).resolve() if samples_path
             else "no PNG grid (only [H, W], [1, H, W] and, by middle slices, [1, D, H, W] samples make one)")
    print(f"samples: {where}")
    print(f"checkpoint: {ckpt.find_latest_valid()[0].resolve()}")


def _remember_first(batches, store: dict):
    for batch in batches:
        store.setdefault("x", batch["x"][:256].clone())
        yield batch


def _sample_and_observe(module, meta, cfg: Config, tracker, reference: dict, step: int):
    """Sample a grid from the EMA model; for spin data, log its physics against real data."""
    from pipeline.train.export import sample_from
    from pipeline.track.images import drawable
    from pipeline.train.sampling import grid_labels

    n = cfg.train.num_sample_images
    x = sample_from(module, n, grid_labels(meta, n), seed=cfg.run.seed + step).cpu().numpy()
    # Only single-channel 2-D samples make an image grid, and 3-D fields by their middle slice;
    # vectors (e.g. GMM points) have none.
    images = drawable(x)
    path = None if images is None else tracker.log_images("mid_slices" if x.ndim == 5 else "samples", images, step=step)
    if meta.data_kind == "spins" and len(meta.sample_shape) == 3:
        from pipeline.track.metrics import physics_metrics

        tracker.log_event("physics", step=step, **physics_metrics(x, reference.get("x")))
    return path
