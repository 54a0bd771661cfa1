"""DeepSpeed ZeRO (stages 1-3) behind the engine seam.

One ``deepspeed.initialize`` per phase: a GAN's D and G each get their own DeepSpeed engine.
(Accelerate's multi-model DeepSpeed support assumes disjoint models; G's loss runs through
D, so they are not.) We call DeepSpeed directly rather than through Accelerate's DeepSpeed
plugin, which needs ``transformers`` to build its config.

The seam's contract maps onto DeepSpeed like this:

* micro steps: ``set_gradient_accumulation_boundary(is_last)`` then
  ``backward(loss, scale_wrt_gas=False)`` (the loop already divides by grad_accum_steps),
  and ``step()`` once per optimizer step.
* skip on NaN/Inf: the decision is collective (``Engine.any_rank`` on the local loss check;
  DeepSpeed's own overflow check on the reduced gradients is collective too). A skipped step
  goes through DeepSpeed's overflow path, which drops the accumulated gradients without
  touching parameters or optimizer state. The LR schedule advances either way.
* clipping: DeepSpeed config ``gradient_clipping``; norm from ``get_global_grad_norm()``.
* checkpoints: ``save_checkpoint`` into ``<dir>/ds-<phase>/`` with a fixed tag and no
  ``latest`` file, so everything stays inside the Checkpointer's directory. Loading onto a
  different world size rebuilds full fp32 weights and Adam moments from the shards
  (DeepSpeed's zero_to_fp32 merge) and scatters them into the new partitions
  (``deepspeed_reshard``).
* ZeRO-3 and frozen modules: a GAN's G loss runs through D, whose parameters D's own engine
  has partitioned. G's phase gathers its frozen modules' parameters around forward and
  backward (``deepspeed.zero.GatheredParameters``) so D runs with full weights.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from pipeline.config import EngineConfig, TrainConfig
from pipeline.errors import ConfigError
from pipeline.train.engines.base import Engine, PreparedPhase
from pipeline.train.engines.deepspeed_reshard import consolidate, is_zero3_param, link_optimizer_state, set_full_state
from pipeline.train.engines.half_weights import cast_inputs_to_weights
from pipeline.train.phases import Phase
from pipeline.train.schedule import lr_lambda

TAG = "state"  # fixed DeepSpeed checkpoint tag: one DeepSpeed checkpoint per Checkpointer dir


def _import_deepspeed():
    # DeepSpeed picks its accelerator at import time; without CUDA it must be told "cpu"
    # (gloo collectives), or it fails looking for a GPU.
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    return deepspeed


# Keys the training config owns: a base JSON that sets them is refused, since the two would
# silently disagree.
_OWNED = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
          "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")


def load_base_config(path: str | None) -> dict:
    """The user's DeepSpeed JSON (``engine.deepspeed_config``, e.g. launch/ds_zero3.json): the
    ZeRO tuning knobs (bucket sizes, prefetch, overlap) that the training config has no keys for."""
    if path is None:
        return {}

    try:
        with open(path) as f:
            base = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"engine.deepspeed_config={path!r} cannot be read as JSON: {e}") from None
    if not isinstance(base, dict):
        raise ConfigError(f"engine.deepspeed_config={path!r} must hold a JSON object")
    owned = sorted(set(base) & set(_OWNED))
    if owned:
        raise ConfigError(
            f"engine.deepspeed_config={path!r} sets {owned}; these come from the training config "
            "(data.batch_per_rank, train.grad_accum_steps, train.grad_clip_norm, engine.mixed_precision; "
            "the optimizer is AdamW with train.lr): remove them from the JSON")
    return base


def ds_config(cfg: EngineConfig, train: TrainConfig, overrides: dict | None = None) -> dict:
    """The DeepSpeed config dict for one phase: the base JSON (if any), then what the training
    config decides (batching is ours: micro batch 1 is nominal), then ``overrides``."""
    base = load_base_config(cfg.deepspeed_config)
    zero: dict[str, Any] = dict(base.pop("zero_optimization", {}))
    zero["stage"] = int(cfg.zero_stage)
    zero.pop("offload_optimizer", None)
    if not torch.cuda.is_available():
        # Both were seen to break ZeRO-2 on CPU/gloo (hangs / wrong buckets); they only
        # overlap communication with compute on GPUs anyway.
        zero["overlap_comm"] = False
        zero["contiguous_gradients"] = False
    else:
        zero.setdefault("overlap_comm", False)
        zero.setdefault("contiguous_gradients", False)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    config: dict[str, Any] = {
        **base,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": int(train.grad_accum_steps),
        "gradient_clipping": float(train.grad_clip_norm) if train.grad_clip_norm is not None else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW as the base optimizer
        "bf16": {"enabled": cfg.mixed_precision == "bf16"},
        "fp16": {"enabled": cfg.mixed_precision == "fp16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@contextlib.contextmanager
def _forced_overflow(optimizer) -> Iterator[None]:
    """Make the ZeRO optimizer's next ``step`` take its overflow path on this rank.

    That path is DeepSpeed's own way of dropping a step: it clears the accumulated (and
    already reduced/partitioned) gradients and returns before touching the fp32 master
    weights or the optimizer state. Every rank enters this together (the skip decision is an
    all-reduce), so the ranks stay in lock step.
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        name = "_overflow_check_and_loss_scale_update"

        def forced(update_scale=True):
            optimizer.overflow = True
            return optimizer._loss_scale_update_and_overflow_cleanup() if update_scale else True

    elif isinstance(optimizer, DeepSpeedZeroOptimizer):
        # fp32 ZeRO-1/2 decides "overflow" from a non-finite global norm (check_grad_overflow
        # is off unless loss scaling is on); report one, and the overflow flag if checked.
        assert optimizer.compute_grad_norm or optimizer.check_grad_overflow, "ZeRO optimizer cannot skip"
        name = "scaled_global_norm" if optimizer.compute_grad_norm else "check_overflow"

        def forced(*args, **kwargs):
            optimizer.overflow = True
            return float("inf")

    else:
        raise TypeError(f"no forced-skip path for optimizer type {type(optimizer).__name__}")
    assert hasattr(optimizer, name), f"DeepSpeed {type(optimizer).__name__} has no {name} (version change?)"
    setattr(optimizer, name, forced)  # instance attribute shadows the method for this step
    try:
        yield
    finally:
        delattr(optimizer, name)


class _DeepSpeedPhase(PreparedPhase):
    """One phase on its own DeepSpeed engine: ``engine`` is the pipeline's :class:`DeepSpeedEngine`
    (rank, collectives), ``ds_engine`` DeepSpeed's engine object wrapping ``module``."""

    def __init__(self, phase: Phase, train: TrainConfig, cfg: EngineConfig, engine: "DeepSpeedEngine"):
        super().__init__(phase)
        ds = _import_deepspeed()
        self.engine = engine
        self.stage = int(cfg.zero_stage)
        params = [p for p in phase.module.parameters() if p.requires_grad]
        assert params, f"phase {phase.name!r} has no trainable parameters"
        if cfg.offload_optimizer:
            opt = _cpu_adam(params, phase, train)
        else:
            opt = torch.optim.AdamW(params, lr=phase.lr, betas=phase.betas, weight_decay=train.weight_decay)
        # Our own scheduler on the base optimizer: ZeRO keeps the base optimizer's param-group
        # dicts, so LR changes reach it; and we step it on skipped steps too (DeepSpeed's
        # scheduler hook only runs on applied steps).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train, phase.repeats))
        self.ds_engine, self.optimizer, _, _ = ds.initialize(
            model=phase.module,
            model_parameters=params,
            optimizer=opt,
            config=ds_config(cfg, train),
            dist_init_required=False,
        )
        self.base_optimizer = opt
        # bf16/fp16: DeepSpeed has converted the parameters themselves (no autocast), so float32
        # inputs are cast where they meet them; objectives stay unaware of the backend.
        self.half_weights = cfg.mixed_precision != "no"
        if self.half_weights:
            cast_inputs_to_weights(phase.module)

    # -- micro steps --------------------------------------------------------------------

    @contextlib.contextmanager
    def _frozen_gathered(self) -> Iterator[None]:
        """Under ZeRO-3, the full weights of the modules this phase runs through but does not train."""
        frozen = [p for m in self.phase.frozen for p in m.parameters() if is_zero3_param(p)]
        if not frozen:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(frozen, modifier_rank=None):
            yield

    def full_weights(self):
        """Under ZeRO-3, this phase's own partitioned parameters gathered (read-only) until exit."""
        params = [p for p in self.module.parameters() if is_zero3_param(p)]
        if not params:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def _deepcopy(self, memo: dict[int, object]) -> nn.Module:
        out = copy.deepcopy(self.module, memo)
        for m in out.modules():  # a plain module: no ZeRO-3 parameter dict, no ds_* attributes
            if type(m._parameters) is not OrderedDict and type(m._parameters) is not dict:
                m._parameters = OrderedDict(m._parameters)  # DeepSpeed's gathering dict
            for key in [k for k in m.__dict__ if k.startswith("ds_")]:
                del m.__dict__[key]
        return out

    def plain_copy(self) -> nn.Module:
        out = super().plain_copy()  # bf16/fp16 weights like the original, without its hooks
        if self.half_weights:
            cast_inputs_to_weights(out)  # so that the EMA copy samples from float32 inputs too
        return out

    def forward(self, batch, ctx):
        return self.ds_engine(batch, ctx)

    def backward(self, loss):
        self.ds_engine.backward(loss, scale_wrt_gas=False)

    @contextlib.contextmanager
    def accumulating(self, is_last_micro_step: bool):
        self.ds_engine.set_gradient_accumulation_boundary(bool(is_last_micro_step))
        # Forward and backward both run through the frozen modules (G's loss through D).
        with self._frozen_gathered():
            yield

    def step(self, local_ok):
        # Clipping to train.grad_clip_norm happens inside ds_engine.step() (the DeepSpeed config's
        # gradient_clipping, fixed at initialisation).
        bad = self.engine.any_rank(not local_ok)
        with _forced_overflow(self.ds_engine.optimizer) if bad else contextlib.nullcontext():
            self.ds_engine.step()
        skipped = not self.ds_engine.was_step_applied()
        norm = self.ds_engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if skipped:
            norm = norm if not math.isfinite(norm) else float("nan")
        self.scheduler.step()  # the LR is a function of the step count, skipped or not
        return norm, skipped

    def lr(self):
        return float(self.base_optimizer.param_groups[0]["lr"])

    def model_state_bytes(self) -> dict[str, int]:
        """As the base class counts, plus what the ZeRO optimizer holds: its fp32 master
        partitions (attributes named ``*fp32*``) as optimizer state, their ``.grad`` and its gradient
        partitions and buffers (``*grad*``) as gradients; its flat parameter buffers are the parameters."""
        from pipeline.train.engines.memory import StateCounter, optimizer_state_tensors, tensors_in

        zero = self.ds_engine.optimizer
        counter = StateCounter()
        params = list(self.module.parameters())
        counter.add("params", params)
        counter.add("optimizer", optimizer_state_tensors(self.base_optimizer))
        attrs = {k: v for k, v in vars(zero).items() if k != "optimizer"}
        counter.add("optimizer", [t for k, v in attrs.items() if "fp32" in k for t in tensors_in(v)])
        counter.add("grads", [p.grad for p in params])
        counter.add("grads", [p.grad for k, v in attrs.items() if "fp32" in k for p in tensors_in(v)])
        counter.add("grads", [t for k, v in attrs.items() if "grad" in k.lower() for t in tensors_in(v)])
        return counter.bytes

    # -- checkpoints --------------------------------------------------------------------

    def _dir(self, directory: Path) -> Path:
        return Path(directory) / f"ds-{self.name}"

    def save(self, directory: Path, rank: int) -> None:
        sub = self._dir(directory)
        # Every rank writes its own shard; save_latest=False: no 'latest' pointer, the
        # Checkpointer's manifest is the only index.
        self.ds_engine.save_checkpoint(str(sub), tag=TAG, client_state={}, save_latest=False)
        if rank == 0:
            meta = {"world_size": self.engine.world_size, "zero_stage": self.stage}
            (sub / "meta.json").write_text(json.dumps(meta))
            torch.save(self.scheduler.state_dict(), sub / "scheduler.pt")

    def load(self, directory: Path, rank: int) -> None:
        sub = self._dir(directory)
        meta = json.loads((sub / "meta.json").read_text())
        if meta["world_size"] == self.engine.world_size and meta["zero_stage"] == self.stage:
            path, _ = self.ds_engine.load_checkpoint(
                str(sub), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load the checkpoint in {sub}")
            link_optimizer_state(self.ds_engine.optimizer)
        else:
            self._load_resharded(sub / TAG)
        self.scheduler.load_state_dict(torch.load(sub / "scheduler.pt", map_location="cpu", weights_only=True))
        for group, lr in zip(self.base_optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the resharded path rebuilds the optimizer without its param groups

    def _load_resharded(self, ds_dir: Path) -> None:
        """Load a checkpoint written at another world size (or ZeRO stage).

        Full fp32 master weights and Adam moments are rebuilt from the old shards and written
        into this run's partitions, so training continues as if uninterrupted.
        """
        full = consolidate(ds_dir)
        named = dict(self.ds_engine.module.named_parameters())
        missing = sorted(set(named) - set(full["params"]))
        if missing:
            raise RuntimeError(f"{ds_dir}: checkpoint has no weights for {missing}")
        set_full_state(self.ds_engine.optimizer, self.base_optimizer, named, full)


def _cpu_adam(params, phase: Phase, train: TrainConfig):
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=phase.lr, betas=phase.betas, weight_decay=train.weight_decay, adamw_mode=True)
    except Exception as e:  # JIT build of the cpu_adam op (needs a C++ toolchain)
        raise RuntimeError(
            "engine.offload_optimizer=true needs DeepSpeed's CPU Adam op, which failed to build or load "
            f"here ({type(e).__name__}: {e}). Set engine.offload_optimizer=false."
        ) from e


def _single_process_env() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


class DeepSpeedEngine(Engine):
    def __init__(self, cfg: EngineConfig):
        ds = _import_deepspeed()
        from datetime import timedelta

        if int(cfg.zero_stage) not in (1, 2, 3):
            raise ValueError(f"engine.zero_stage must be 1, 2 or 3, got {cfg.zero_stage!r}")
        self.cfg = cfg
        if "WORLD_SIZE" not in os.environ:  # plain `python ...`: a world of one
            _single_process_env()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        ds.init_distributed(dist_backend=backend, timeout=timedelta(seconds=cfg.timeout_s))
        import torch.distributed as dist

        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")

    def prepare(self, phase: Phase, train: TrainConfig) -> PreparedPhase:
        return _DeepSpeedPhase(phase, train, self.cfg, self)
