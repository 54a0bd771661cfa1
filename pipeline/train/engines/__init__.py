"""The one seam between the training loop and the distributed backend (see ``base``).

``build_engine`` imports a backend's module only when the config chooses it: DeepSpeed is
slow to import and picks its accelerator at import time. This package's ``__init__`` stays
torch-free, so the ``pipeline`` entry point can import ``process_exit`` for every command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import EngineConfig
    from pipeline.train.engines.base import Engine


def build_engine(cfg: EngineConfig) -> Engine:
    if cfg.backend == "accelerate" and cfg.fsdp != "off":
        from pipeline.train.engines.fsdp import FSDPEngine

        return FSDPEngine(cfg)
    if cfg.backend == "accelerate":
        from pipeline.train.engines.accelerate import AccelerateEngine

        return AccelerateEngine(cfg)
    from pipeline.train.engines.deepspeed import DeepSpeedEngine

    return DeepSpeedEngine(cfg)
