"""The export: EMA weights + resolved config, loadable without the training stack.

``run_dir/export/weights.safetensors`` and ``run_dir/export/export.json`` (config, data
meta, step). Replaced atomically: a new export is written beside the old one and swapped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from pipeline.data.meta import DataMeta
from pipeline.errors import ConfigError
from pipeline.run_dir import RunDir

EXPORT_INFO = "export.json"  # inside RunDir.export, beside the weights
EXPORT_WEIGHTS = "weights.safetensors"


def write_export(run_dir: Path, module: nn.Module, config: dict[str, Any], meta: DataMeta, step: int) -> Path:
    rd = RunDir(run_dir)
    final, tmp = rd.export, rd.export_partial
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(tensors, str(tmp / EXPORT_WEIGHTS))
    info = {"step": step, "config": config, "meta": dataclasses.asdict(meta)}
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1, default=str))
    old = rd.export_old
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def export_step(run_dir: Path) -> int | None:
    """The step of the run's export, None when there is none (or it cannot be read)."""
    path = RunDir(run_dir).export / EXPORT_INFO
    try:
        return int(json.loads(path.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_export(run_dir: Path) -> tuple[nn.Module, DataMeta, dict[str, Any]]:
    """Rebuild the sampled module (the phase with ``ema=True``) with the exported weights."""
    from pipeline.config import config_from_dict
    from pipeline.objectives.registry import build_phases

    if not Path(run_dir).is_dir():
        raise ConfigError(f"no such run directory: {run_dir}")
    d = RunDir(run_dir).export
    if not (d / EXPORT_INFO).is_file():
        raise ConfigError(f"{run_dir}: no export found (expected {d / EXPORT_INFO}; has the run saved a checkpoint?)")
    info = json.loads((d / EXPORT_INFO).read_text())
    cfg = config_from_dict(info["config"])
    m = info["meta"]
    meta = DataMeta(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.items()})
    (phase,) = [p for p in build_phases(cfg, meta) if p.ema]
    phase.module.load_state_dict(load_file(str(d / EXPORT_WEIGHTS)))
    phase.module.eval()
    info["config_obj"] = cfg
    return phase.module, meta, info


@torch.no_grad()
def sample_from(module: nn.Module, num_samples: int, labels: torch.Tensor | None, seed: int,
                num_steps: int | None = None, sampler: Any = None) -> torch.Tensor:
    """``module.sample`` with a generator seeded by ``seed``; ``num_steps`` / ``sampler`` passed
    only when given, so that an objective without them (a GAN) is called as before."""
    g = torch.Generator().manual_seed(seed)
    kwargs: dict[str, Any] = {"labels": labels, "generator": g}
    if num_steps is not None:
        kwargs["num_steps"] = num_steps
    if sampler is not None:
        kwargs["sampler"] = sampler
    return module.sample(num_samples, **kwargs)
