"""FSDP2 (``torch.distributed.fsdp.fully_shard``) behind the engine seam, on Accelerate's process group."""

from __future__ import annotations

import contextlib
import copy
import weakref
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.config import EngineConfig, TrainConfig
from pipeline.train.engines.accelerate import AccelerateEngine, _AcceleratePhase, _trainable
from pipeline.train.engines.base import PreparedPhase
from pipeline.train.phases import Phase


class _FSDPPhase(_AcceleratePhase):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and Adam state
    sharded over the ranks. Everything else (LR schedule, collective NaN skip) is DDP's.

    Accelerate's own FSDP plugin is not used: Accelerate 1.15 never enables it without a
    GPU. ``fully_shard`` works on CPU (gloo) and GPU alike.

    * Sharding unit: the phase's whole module (one ``fully_shard`` on the root). Anything may
      then read its parameters inside its forward, e.g. the VDM's learned schedule, which is
      called through ``schedule.net`` and ``endpoints()``, not through its own forward; peak
      memory still holds one phase's full parameters during its forward and backward, the
      saving is in gradients and optimizer state at rest (/ world size).
    * Modules a phase runs through but does not own (``Phase.frozen``: a GAN's D in G's
      loss) belong to another phase's FSDP module: ``accumulating`` all-gathers them around
      each micro step (forward and backward), like DeepSpeed ZeRO-3's GatheredParameters.
      The loop enters it inside ``frozen()``: requires_grad is already off, so FSDP's
      unsharded copies do not require gradients either and none reach the other phase.
    * Initial weights: rank 0's, broadcast before sharding, as DDP does.
    * 0-dim parameters (FSDP2 cannot shard scalars; the learned noise schedule has some)
      stay replicated, as under DDP: ``_clip`` averages their gradients over the ranks.
    * Checkpoints: torch.distributed.checkpoint, one file per rank with its shards of model
      and optimizer, in ``<dir>/fsdp-<phase>/``; loading reshards onto any world size.
    * bf16 (``engine.mixed_precision=bf16``): bf16 parameters and compute, fp32 gradient
      reduction and fp32 master weights and Adam state (``FSDPEngine.mp_policy``).
    """

    def __init__(self, phase: Phase, train: TrainConfig, engine: FSDPEngine):
        self.engine = engine
        super().__init__(phase, train, engine)

    def _wrap(self, phase: Phase, train: TrainConfig):
        from torch.distributed.fsdp import fully_shard

        module = phase.module.to(self.engine.device)  # fully_shard does not move ignored params
        if self.engine.world_size > 1:
            # Rank 0's initial weights everywhere, as DDP does (ranks seed their RNGs apart);
            # fully_shard itself keeps each rank's own values for its shard.
            with torch.no_grad():
                for t in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(t, src=0)
        self.replicated = [p for p in module.parameters() if p.dim() == 0]
        # full_shard frees the gathered parameters after forward (gathered again for backward);
        # shard_grad_op keeps them until the end of backward: less communication, more memory.
        fully_shard(module, mesh=self.engine.mesh, reshard_after_forward=self.engine.cfg.fsdp == "full_shard",
                    ignored_params=set(self.replicated), mp_policy=self.engine.mp_policy())
        self.engine.fsdp_modules.append(weakref.ref(module))
        # AdamW over the sharded parameters (DTensors), built after sharding; the replicated
        # ones in a group of their own (foreach kernels do not mix DTensors and tensors).
        trainable = _trainable(module)
        groups = [{"params": [p for p in trainable if p.dim() > 0]}, {"params": [p for p in trainable if p.dim() == 0]}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=phase.lr, betas=phase.betas,
                                weight_decay=train.weight_decay)
        return module, opt, opt

    def forward(self, batch, ctx):
        # bf16: FSDP hands the forward bf16 parameters (MixedPrecisionPolicy); autocast, as
        # Accelerate does for DDP, runs the ops that need range or precision (norms, log/exp,
        # reductions) in fp32 and casts the fp32 inputs where a bf16 weight meets them.
        with self.engine.autocast():
            return self.wrapped(batch, ctx)

    def backward(self, loss):
        loss.backward()

    @contextlib.contextmanager
    def accumulating(self, is_last_micro_step: bool):
        # Inner micro steps accumulate unreduced gradients; the last one reduce-scatters the sum.
        self.wrapped.set_requires_gradient_sync(is_last_micro_step)
        with self.engine.gathered(self.phase.frozen):
            yield

    def full_weights(self):
        return self.engine.gathered([self.wrapped])

    @contextlib.contextmanager
    def full_state(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.engine.cfg.mixed_precision == "no":
            with super().full_state() as full:
                yield full
            return
        # Under bf16, unsharding gives bf16 copies; the EMA and the export want the fp32 master
        # weights, gathered from the shards themselves.
        from torch.distributed.tensor import DTensor

        with torch.no_grad():
            named = [*self.module.named_parameters(), *self.module.named_buffers()]
            yield {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach() for n, t in named}

    def _deepcopy(self, memo: dict[int, object]) -> nn.Module:
        module = self.module
        for m in module.modules():
            for key, value in m.__dict__.items():  # FSDP2's composable state (process groups)
                if key.startswith("__composable_api"):
                    memo[id(value)] = {}
        # fully_shard swaps a module's class for an FSDP<Class> subclass whose __deepcopy__
        # refuses; copy as the original class (the copy is a plain module), then swap back.
        swapped = [(m, type(m)) for m in module.modules() if _unsharded_class(type(m)) is not type(m)]
        try:
            for m, cls in swapped:
                m.__class__ = _unsharded_class(cls)
            out = copy.deepcopy(module, memo)
        finally:
            for m, cls in swapped:
                m.__class__ = cls
        for m in out.modules():
            for key in [k for k in m.__dict__ if k.startswith("__composable_api")]:
                del m.__dict__[key]
        return out

    def _clip(self, max_norm: float) -> float:
        from torch.distributed.tensor import DTensor

        world = self.engine.world_size
        rep = [p.grad for p in self.replicated if p.grad is not None]
        if rep and world > 1:  # FSDP leaves the replicated (ignored) parameters' gradients to us
            flat = torch.stack([g.reshape(()) for g in rep])
            dist.all_reduce(flat)
            for g, v in zip(rep, flat / world):
                g.copy_(v)
        grads = [p.grad for p in self.wrapped.parameters() if p.grad is not None]
        # The global norm: every element of a sharded gradient lives on exactly one rank, so the
        # squares of the local shards summed over ranks; the replicated ones once.
        sq = torch.zeros((), device=self.engine.device)
        for g in grads:
            if isinstance(g, DTensor):
                sq += g.to_local().float().pow(2).sum()
        if world > 1:
            dist.all_reduce(sq)
        for g in rep:
            sq += g.float().pow(2).sum()
        norm = float(sq.sqrt())
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:  # False for a NaN norm: that step is skipped anyway
            for g in grads:
                g.mul_(coef)
        return norm

    # Checkpoints: DDP's (``_AcceleratePhase.save``/``save_async``/``load``, DCP) with sharded
    # state dicts (DTensors): each rank writes its own shards of the parameters and Adam
    # moments, rank 0 the metadata; loading reads the slices this rank now owns, on any world size.
    DCP_PREFIX = "fsdp"


def _unsharded_class(cls: type) -> type:
    """The module's own class under FSDP2's FSDP<Class>(FSDPModule, Class) subclass."""
    if not any(c.__name__ == "FSDPModule" for c in cls.__mro__[1:]):
        return cls
    return next(c for c in cls.__mro__[1:] if c.__name__ != "FSDPModule" and not c.__name__.startswith("FSDP"))


class FSDPEngine(AccelerateEngine):
    """Accelerate's process group (and device choice), every phase sharded with FSDP2."""

    def __init__(self, cfg: EngineConfig):
        super().__init__(cfg)
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():  # one process without a launcher: a world of one
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=cfg.timeout_s))
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        self.fsdp_modules: list[weakref.ref] = []  # every phase's sharded module

    def prepare(self, phase: Phase, train: TrainConfig) -> PreparedPhase:
        return _FSDPPhase(phase, train, self)

    def mp_policy(self):
        """bf16: parameters all-gathered and computed in bf16, gradients reduce-scattered in fp32
        into the fp32 sharded master parameters the optimizer steps (FSDP2's
        MixedPrecisionPolicy). Inputs are not cast: autocast decides per op (``autocast``)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.cfg.mixed_precision == "no":
            return MixedPrecisionPolicy()
        assert self.cfg.mixed_precision == "bf16", "Config.validate refuses fp16 with FSDP"
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @contextlib.contextmanager
    def gathered(self, modules: list[nn.Module]) -> Iterator[None]:
        """Full parameters of ``modules`` (parts of any phase's FSDP module) until exit.

        Unsharding is per FSDP module: the FSDP modules containing any of ``modules`` are
        all-gathered. Collective: every rank enters it with the same modules.
        """
        owners = []
        for ref in self.fsdp_modules:
            owner = ref()
            if owner is not None and owner not in owners:
                subs = set(owner.modules())
                if any(m in subs for m in modules):
                    owners.append(owner)
        for owner in owners:
            owner.unshard()
        try:
            yield
        finally:
            for owner in owners:
                owner.reshard()
