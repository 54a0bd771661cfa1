"""Objectives: VDM and GAN losses as plain modules (no processes, no backends)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.data.meta import DataMeta
    from pipeline.train.phases import Phase


def build_phases(cfg: "Config", meta: "DataMeta") -> "list[Phase]":
    """The phases of the configured objective; exactly one of them has ``ema=True``."""
    if cfg.objective == "vdm":
        from pipeline.objectives import vdm

        phases = vdm.build_phases(cfg.vdm, meta, lr=cfg.train.lr, betas=cfg.train.betas)
    else:
        from pipeline.objectives import gan

        phases = gan.build_phases(cfg.gan, meta, betas=cfg.train.betas)
    assert sum(p.ema for p in phases) == 1, "exactly one phase holds the model that is sampled"
    return phases
