"""Watching a run: metrics.jsonl, sample grids, events, progress, and W&B (optional).

Every run directory gets, from the main process only:

    metrics.jsonl            one JSON object per line, flushed per line (survives a crash):
                             scalars {"step", "time", **metrics}, or anything else as
                             {"event": kind, "step", "time", ...} -- kind "start", "resume",
                             "close", "image", "profile", or the loop's ("checkpoint", ...).
                             A line without "event" is a row of scalars.
    samples/{name}-{step:07d}.png
    track.json               W&B run id, last logged step, one entry per (re)start
    wandb/                   W&B's own files (offline-run-*/run-*.wandb when offline)

A resumed run continues the same W&B run (same id, ``resume="allow"``) and never logs a step
at or below the last step logged before the restart: those steps are being recomputed from
an older checkpoint and their first values are already on record.

Secrets: config values, the command line and event fields pass through
:class:`~pipeline.track.secrets.Scrubber`; W&B's own metadata collection (which records the
raw command line and git remote URL) and console capture are off.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from pipeline.arrays import as_numpy
from pipeline.config import TrackConfig
from pipeline.errors import ConfigError
from pipeline.run_dir import RunDir
from pipeline.track.images import save_grid_png
from pipeline.track.jsonl import atomic_write_json, json_line, last_step_in_jsonl, repair_torn_tail
from pipeline.track.metrics import TimeProfile
from pipeline.track.secrets import Scrubber

_WANDB_MODES = ("auto", "online", "offline", "off")
_RESERVED_KEYS = {"step", "time", "event"}
_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def resolve_wandb_mode(setting: str, environ: Mapping[str, str] | None = None, netrc_file: str | None = None) -> str:
    """``"online" | "offline" | "off"`` for a ``track.wandb`` setting.

    auto: ``WANDB_MODE=offline|dryrun|disabled`` in the environment wins (tests, clusters
    without network); otherwise online when ``WANDB_API_KEY`` is set or a netrc login for
    the W&B host exists, offline otherwise.
    """
    if setting not in _WANDB_MODES:
        raise ConfigError(f"track.wandb={setting!r} is not allowed; allowed: {', '.join(map(repr, _WANDB_MODES))}")
    if setting != "auto":
        return setting
    environ = os.environ if environ is None else environ
    env_mode = environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("offline", "dryrun"):
        return "offline"
    if env_mode == "disabled":
        return "off"
    if environ.get("WANDB_API_KEY", "").strip():
        return "online"
    return "online" if _netrc_has_login(environ, netrc_file) else "offline"


def _netrc_has_login(environ: Mapping[str, str], netrc_file: str | None) -> bool:
    host = urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = netrc_file or environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None  # presence only; never read out
    except (OSError, netrc.NetrcParseError):
        return False


def git_info(where: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the repository holding ``where`` (default: this package);
    ``{}`` outside a git repository or without git. The remote URL is deliberately not
    recorded (it can embed a token)."""
    where = where or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return {}
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return {"git_commit": commit.stdout.strip(), "git_dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


def _to_number(key: str, value: Any) -> float | int | None:
    if hasattr(value, "item"):  # numpy / torch scalar
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {key!r} must be a number, got {type(value).__name__} {value!r}") from None
    return f if math.isfinite(f) else None  # strict JSON has no NaN/Inf: written as null


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Tracker:
    """Logs a run to ``run_dir`` (metrics.jsonl, sample PNGs) and W&B; no-op off the main rank.

    Use as a context manager or call :meth:`close` in a ``finally`` block.
    """

    def __init__(
        self,
        cfg: TrackConfig,
        run_dir: str | Path,
        config: dict[str, Any],
        is_main: bool,
        total_steps: int,
        resume: bool,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.paths = RunDir(run_dir)
        self.is_main = is_main
        self.total_steps = int(total_steps)
        self.mode = resolve_wandb_mode(cfg.wandb)
        self._closed = False
        self._wandb_run = None
        self._bar = None
        self._file = None
        self.num_dropped_steps = 0  # log calls at steps already on record (resume) or going back
        self.run_id: str | None = None
        self.resume_step = self.last_step = -1
        if cfg.run_id is not None and (not cfg.run_id or not set(cfg.run_id) <= _ID_CHARS):
            raise ConfigError(f"track.run_id={cfg.run_id!r} must be non-empty letters, digits, '_', '-', '.'")
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.scrub = Scrubber()
        state = self._restore(resume)
        self.last_step = self.resume_step
        self.run_id = self._choose_run_id(state, resume)
        self.meta = self._segment_meta(resume)
        self.config = self.scrub.value(config)
        self._state = {
            "wandb_run_id": self.run_id,
            "last_step": self.last_step,
            "segments": [*state.get("segments", []), self.meta],
        }
        atomic_write_json(self.paths.track_state, self._state)
        self._file = self.paths.metrics.open("a", encoding="utf-8")
        self._pending_wandb: dict[str, float] = {}
        self._event_counts: dict[str, int] = {}
        self._rate_origin: tuple[float, int] | None = None  # (time, step) of this session's first log
        self._start_step = max(self.resume_step, 0)
        if self.mode != "off":
            self._wandb_run = self._init_wandb()
        if cfg.progress_bar:
            self._bar = self._progress_bar()
        self._write({"event": "resume" if resume else "start", "step": self.last_step, "time": time.time(),
                     "wandb_run_id": self.run_id, "wandb_mode": self.mode})

    # ---------------------------------------------------------------- setup

    def _restore(self, resume: bool) -> dict[str, Any]:
        """track.json's state on a resume ({} otherwise), with ``resume_step`` set; a fresh
        start moves an existing metrics.jsonl aside."""
        metrics_path = self.paths.metrics
        state_path = self.paths.track_state
        state = json.loads(state_path.read_text()) if resume and state_path.is_file() else {}
        if resume:
            repair_torn_tail(metrics_path)
            self.resume_step = max(int(state.get("last_step", -1)), last_step_in_jsonl(metrics_path))
        else:
            self.resume_step = -1
            if metrics_path.exists():  # a fresh start in a used directory: keep, don't mix
                aside = metrics_path.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
                metrics_path.rename(aside)
                print(f"[track] fresh start: previous {metrics_path.name} moved to {aside.name}", flush=True)
        return state

    def _segment_meta(self, resume: bool) -> dict[str, Any]:
        """This (re)start's entry in track.json's segments, scrubbed of secrets."""
        meta = self.scrub.value(
            {
                **git_info(),
                "command": [Path(sys.executable).name, *sys.argv],
                "host": socket.gethostname(),
                "python": sys.version.split()[0],
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "resumed_after_step": self.resume_step if resume else None,
            }
        )
        meta["command"] = self.scrub.argv(meta["command"])
        return meta

    def _progress_bar(self) -> Any:
        from tqdm.auto import tqdm

        # disable=None: no bar when stderr is not a terminal (batch logs get the summary lines)
        return tqdm(total=self.total_steps, initial=min(self._start_step, self.total_steps),
                    unit="step", dynamic_ncols=True, disable=None, file=sys.stderr)

    def _choose_run_id(self, state: dict[str, Any], resume: bool) -> str:
        persisted = state.get("wandb_run_id")
        if resume and persisted:
            if self.cfg.run_id and self.cfg.run_id != persisted:
                print(f"[track] track.run_id={self.cfg.run_id} ignored: this run directory continues "
                      f"W&B run {persisted}", flush=True)
            return persisted
        if self.cfg.run_id:
            return self.cfg.run_id
        import secrets as _secrets

        return _secrets.token_hex(4)  # 8 hex chars, W&B's own id length

    def _init_wandb(self) -> Any:
        try:
            import wandb
        except ImportError:
            if self.cfg.wandb == "auto":
                print("[track] wandb is not installed: W&B logging off", flush=True)
                self.mode = "off"
                return None
            raise
        run_cfg = self.config.get("run") if isinstance(self.config.get("run"), dict) else {}
        kwargs = dict(
            project=self.scrub.text(self.cfg.project),
            entity=self.cfg.entity,
            group=self.scrub.text(self.cfg.group) if self.cfg.group else None,
            tags=[self.scrub.text(t) for t in self.cfg.tags] or None,
            name=self.scrub.text(run_cfg.get("name") or self.run_dir.resolve().name),
            id=self.run_id,
            resume="allow",
            dir=str(self.run_dir),  # W&B makes its own wandb/ inside (RunDir.wandb)
            config={**self.config, "meta": self.meta},
            # x_disable_meta: W&B's metadata holds the raw argv and the git remote URL (either
            # can carry a token); ours above is scrubbed. console="off": stdout is the job log.
            settings=wandb.Settings(x_disable_meta=True, console="off", silent=True),
            reinit="finish_previous",
        )
        try:
            return wandb.init(mode=self.mode, **kwargs)
        except Exception as e:  # noqa: BLE001 -- network/auth failures come in many types
            if self.cfg.wandb != "auto" or self.mode != "online":
                raise
            print(f"[track] W&B online init failed ({type(e).__name__}: {self.scrub.text(str(e))}); "
                  "continuing offline (sync later with `wandb sync`)", flush=True)
            self.mode = "offline"
            return wandb.init(mode="offline", **kwargs)

    # ---------------------------------------------------------------- logging

    def _write(self, obj: dict[str, Any]) -> None:
        self._file.write(json_line(obj))
        self._file.flush()

    def _accept_step(self, step: int, what: str) -> bool:
        """Steps at or below the pre-restart last step, or going backwards, are dropped."""
        if step <= self.resume_step or step < self.last_step:
            self.num_dropped_steps += 1
            if self.num_dropped_steps == 1:
                why = (f"already logged before the restart (up to step {self.resume_step})"
                       if step <= self.resume_step else f"behind the last logged step {self.last_step}")
                self._print(f"[track] not logging {what} at step {step}: {why}; further drops are counted "
                            "in tracker.num_dropped_steps")
            return False
        return True

    def _advance(self, step: int) -> None:
        if step > self.last_step:
            self.last_step = step
            self._state["last_step"] = step
            atomic_write_json(self.paths.track_state, self._state)

    def _print(self, line: str) -> None:
        if self._bar is not None and not self._bar.disable:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def _wandb_log(self, data: dict[str, Any], step: int) -> None:
        if self._wandb_run is None:
            return
        if self._pending_wandb:
            data = {**self._pending_wandb, **data}
            self._pending_wandb = {}
        try:
            self._wandb_run.log(data, step=step)
        except Exception as e:  # noqa: BLE001 -- W&B dying (e.g. its service got SIGTERM) must not kill training
            print(f"[track] W&B logging failed, continuing with metrics.jsonl only: {type(e).__name__}: "
                  f"{self.scrub.text(str(e))}", file=sys.stderr, flush=True)
            self._wandb_run = None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalars at ``step`` (optimizer steps completed: drives the progress bar/ETA)."""
        if not self.is_main or self._closed:
            return
        step = int(step)
        clean = {}
        for k, v in metrics.items():
            if k in _RESERVED_KEYS:
                raise ValueError(f"metric name {k!r} is reserved in {self.paths.metrics.name}; rename it")
            clean[str(k)] = _to_number(k, v)
        if not self._accept_step(step, "metrics"):
            return
        self._write({"step": step, "time": time.time(), **clean})
        self._wandb_log({k: (v if v is not None else float(metrics[k])) for k, v in clean.items()}, step)
        self._advance(step)
        self._progress(step, clean)

    def _progress(self, step: int, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        if self._rate_origin is None:
            self._rate_origin = (now, step)
        elapsed, done = now - self._rate_origin[0], step - self._rate_origin[1]
        rate = done / elapsed if elapsed > 0 and done > 0 else math.nan
        eta = (self.total_steps - step) / rate if rate and math.isfinite(rate) else math.nan
        if self._bar is not None and not self._bar.disable:
            self._bar.update(max(0, min(step, self.total_steps) - self._bar.n))
        parts = [f"step {step}/{self.total_steps}", f"{rate:.3g} step/s" if math.isfinite(rate) else "- step/s",
                 f"eta {_format_duration(eta)}"]
        parts += [f"{k} {v:.4g}" if v is not None else f"{k} nan/inf" for k, v in metrics.items()]
        self._print(" | ".join(parts))

    def log_images(self, name: str, images: Any, step: int) -> Path | None:
        """Save a sample grid to ``samples/{name}-{step:07d}.png`` and log it to W&B."""
        if not self.is_main or self._closed:
            return None
        step = int(step)
        if not self._accept_step(step, f"images {name!r}"):
            return None
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        arr = as_numpy(images)
        tile = max(arr.shape[-2:])
        path = save_grid_png(arr, self.paths.samples / f"{safe}-{step:07d}.png",
                             scale=max(1, math.ceil(64 / tile)), pad_px=2)
        self._write({"event": "image", "step": step, "time": time.time(), "name": name,
                     "path": str(path.relative_to(self.run_dir)), "num_images": int(arr.shape[0])})
        if self._wandb_run is not None:
            import wandb

            self._wandb_log({f"samples/{name}": wandb.Image(str(path), caption=f"{name} step {step}")}, step)
        self._advance(step)
        return path

    def log_profile(self, name: str, profile: TimeProfile, step: int) -> None:
        """Log a per-t loss profile: a JSON line and a W&B line plot of mean loss vs t."""
        if not self.is_main or self._closed:
            return
        step = int(step)
        if not self._accept_step(step, f"profile {name!r}"):
            return
        d = profile.as_dict()
        self._write({"event": "profile", "step": step, "time": time.time(), "name": name, **d})
        if self._wandb_run is not None:
            import wandb

            rows = [[t, m, c] for t, m, c in zip(d["t"], d["mean"], d["count"]) if m is not None]
            table = wandb.Table(data=rows, columns=["t", "mean", "count"])
            self._wandb_log({f"{name}": wandb.plot.line(table, "t", "mean", title=f"{name} (step {step})")}, step)
        self._advance(step)

    def log_event(self, kind: str, **fields: Any) -> None:
        """Record an event (checkpoint saved, skipped step, corrupt samples, ...).

        ``step`` may be passed as a field (default: the last logged step). Numeric fields also
        go to W&B as ``events/{kind}/{field}`` with the next logged step.
        """
        if not self.is_main or self._closed:
            return
        step = int(fields.pop("step", self.last_step))
        clean = self.scrub.value({k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()})
        self._write({"event": str(kind), "step": step, "time": time.time(), **clean})
        self._event_counts[kind] = self._event_counts.get(kind, 0) + 1
        self._pending_wandb[f"events/{kind}/count"] = self._event_counts[kind]
        for k, v in clean.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._pending_wandb[f"events/{kind}/{k}"] = v
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in clean.items())
        self._print(f"[event] {kind} step={step} {shown}".rstrip())

    # ---------------------------------------------------------------- teardown

    def close(self, failed: bool = False, exit_code: int | None = None) -> None:
        """Flush files and finish W&B (offline files complete). Idempotent; safe in ``finally``.

        ``failed`` and ``exit_code`` (the process's, default 1 if failed else 0) go into the
        closing line of metrics.jsonl and to ``wandb.finish``, so a crashed run is not
        recorded as a success (W&B marks a run with a non-zero exit code as failed)."""
        if exit_code is None:
            exit_code = 1 if failed else 0
        assert not (failed and exit_code == 0), "a failed run must not report exit code 0"
        if self._closed:
            return
        self._closed = True
        if not self.is_main:
            return
        errors = []
        try:
            if self._wandb_run is not None:
                if self._pending_wandb and self.last_step > self.resume_step:
                    self._wandb_run.log(self._pending_wandb, step=self.last_step)  # same row: merged
                self._pending_wandb = {}
                self._wandb_run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001 -- closing must not mask the run's own outcome
            errors.append(f"W&B finish failed: {type(e).__name__}: {self.scrub.text(str(e))}")
        finally:
            self._wandb_run = None
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            try:
                self._write({"event": "close", "step": self.last_step, "time": time.time(),
                             "failed": failed, "exit_code": exit_code, "num_dropped_steps": self.num_dropped_steps})
                os.fsync(self._file.fileno())
            finally:
                self._file.close()
        for err in errors:
            print(f"[track] {err}", file=sys.stderr, flush=True)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None)
