"""DeepSpeed ZeRO checkpoints across a world-size (or ZeRO stage) change.

DeepSpeed loads its own checkpoints only at the world size and stage that wrote them. Here
full fp32 weights and Adam moments are rebuilt from the old shards (DeepSpeed's zero_to_fp32
merge) and scattered into the new run's partitions, so training continues as if
uninterrupted. The helpers for ZeRO's per-parameter optimizer views live here too.

Why not DeepSpeed's universal checkpoint (``deepspeed.checkpoint.ds_to_universal``, issue 18
asks to prefer it where it can replace this module; read against deepspeed 0.19.8):
* it unpickles every model and optimizer file with ``torch.load(..., weights_only=False)``
  (``ds_to_universal.py``, ``universal_checkpoint.py``), which would run arbitrary code from a
  checkpoint directory; this project loads DeepSpeed's files with ``weights_only=True`` and an
  allow-list (``_load_optim_shard``, docs/reliability.md);
* it is an offline conversion that writes a second, per-parameter copy of the fp32 weights and
  both Adam moments beside the checkpoint, outside the atomic manifest of train/checkpoint.py;
* it is read only when ``checkpoint.load_universal`` is set in the DeepSpeed config at
  ``deepspeed.initialize``, before this project's restore knows the old world size.
So the merge below stays; it is tested across world sizes (2 -> 1 -> 2, every ZeRO stage)
(tests/integration/test_engine_backends.py, test_backends_real.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def is_zero3_param(p: torch.Tensor) -> bool:
    """Partitioned by ZeRO-3 (DeepSpeed tags its parameters with a ``ds_id``)."""
    return hasattr(p, "ds_id")


def _load_optim_shard(path: str) -> dict:
    """One rank's ZeRO optimizer file, unpickled with ``weights_only=True``.

    Besides tensors and plain containers, DeepSpeed's files hold a few small DeepSpeed objects
    (the loss scaler, the ZeRO stage enum, ZeRO-1/2's per-parameter fragment addresses: what
    fp32 ZeRO-2 and ZeRO-3 files hold; DynamicLossScaler is fp16's scaler): those are
    allow-listed, anything else is refused by torch's restricted unpickler.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location="cpu", weights_only=True)


def consolidate(ds_dir: Path) -> dict:
    """Full fp32 weights and Adam state of a ZeRO checkpoint directory, at any world size.

    Returns {"params": {name: fp32 tensor}, "moments": {key: {name: tensor}}, "step": int|None}.
    DeepSpeed's zero_to_fp32 merges the fp32 master partitions; the Adam moments are
    partitioned exactly like the master weights (same flat groups, same padding), so the
    same merge is applied to them.
    """
    from deepspeed.utils import zero_to_fp32 as z

    model_states = z.parse_model_states(z.get_model_state_files(str(ds_dir)))
    optim_files = z.get_optim_files(str(ds_dir))
    shards = [_load_optim_shard(f) for f in optim_files]
    osd = [s["optimizer_state_dict"] for s in shards]
    stage = osd[0]["zero_stage"]
    world = osd[0]["partition_count"]
    world = max(world) if isinstance(world, list) else world
    assert world == len(shards), f"{ds_dir}: {len(shards)} optimizer shards for world size {world}"
    key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
    paddings = osd[0].get("param_alignment_paddings")

    def merge(flat_groups):
        if stage <= 2:
            sd = z._get_fp32_state_dict_from_zero2_checkpoint(world, flat_groups, model_states, False, paddings)
        else:
            sd = z._get_fp32_state_dict_from_zero3_checkpoint(world, flat_groups, model_states, False)
        return z.to_torch_tensor(sd)

    params = merge([o[key] for o in osd])
    moments: dict[str, dict[str, torch.Tensor]] = {}
    step = None
    # The base (torch) optimizer's state_dict, one state entry per flat fp32 group
    # (ZeRO-1/2 name it base_optimizer_state, ZeRO-3 optimizer_state_dict).
    base = [o.get("base_optimizer_state", o.get("optimizer_state_dict")) for o in osd]
    if all(isinstance(b, dict) and b.get("state") for b in base):
        states = [b["state"] for b in base]
        groups = sorted(states[0])
        for mkey in ADAM_MOMENTS:
            moments[mkey] = merge([[st[g][mkey] for g in groups] for st in states])
        step = int(states[0][groups[0]]["step"]) if "step" in states[0][groups[0]] else None
    return {"params": params, "moments": moments, "step": step}


def link_optimizer_state(optimizer) -> None:
    """Point ZeRO-1/2's per-parameter views at the optimizer state.

    DeepSpeed links them lazily after the first step; after a load (or before reading or
    writing full optimizer state with ``safe_*_full_optimizer_state``) they must be linked
    by hand. ZeRO-3 reads the state directly and needs nothing.
    """
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state") and optimizer.optimizer.state:
        optimizer._hp_optimizer_states_linked = False  # relink: a load replaces the state tensors
        optimizer._lazy_init_hp_params_optimizer_state()


def _set_z3_partition(zero_opt, param, value: torch.Tensor, key: str | None) -> None:
    """This rank's slice of ``value`` into ZeRO-3's fp32 partition (``key=None``) or Adam state.

    DeepSpeed's ``set_full_hp_param`` does not account for the padding of the last
    partition (a 1-element bias over 2 ranks fails), so the slice is taken here, padding
    left at zero.
    """
    if not param.requires_grad:
        return
    part, _ = zero_opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    n = part.numel()
    start = n * zero_opt._get_param_partition_rank(param)
    flat = value.detach().flatten().to(part.dtype)
    count = max(0, min(n, flat.numel() - start))
    part.data.zero_()
    part.data[:count].copy_(flat[start : start + count])


def set_full_state(zero_opt, base, named: dict[str, nn.Parameter], full: dict) -> None:
    """Write ``full`` (from :func:`consolidate`) into this rank's partitions of ``named``: the fp32
    master weights and Adam moments of the ZeRO optimizer ``zero_opt`` over the torch optimizer
    ``base``, and the module's working copy."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    # Adam state is created lazily on the first step: create it so the moments have a home.
    # The flat fp32 partitions Adam steps on (ZeRO-3 swaps them into the param groups per step).
    flats = getattr(zero_opt, "fp32_partitioned_groups_flat", None) or [
        flat for group in base.param_groups for flat in group["params"]
    ]
    for flat in flats:
        st = base.state[flat]
        for mkey in ADAM_MOMENTS:
            st.setdefault(mkey, torch.zeros_like(flat))
        if full["step"] is not None:
            st["step"] = torch.tensor(float(full["step"]))
    link_optimizer_state(zero_opt)
    params = list(named.values())
    gather = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        if any(is_zero3_param(p) for p in params)
        else contextlib.nullcontext()
    )
    with torch.no_grad():
        for name, p in named.items():
            if is_zero3_param(p):
                _set_z3_partition(zero_opt, p, full["params"][name], None)
                for mkey, tensors in full["moments"].items():
                    _set_z3_partition(zero_opt, p, tensors[name], mkey)
                continue
            safe_set_full_fp32_param(p, full["params"][name].float())  # the fp32 master copy
            for mkey, tensors in full["moments"].items():
                safe_set_full_optimizer_state(p, tensors[name].float(), mkey)
        with gather:  # the working (module) copy; under ZeRO-3 re-partitioned on exit
            for name, p in named.items():
                p.data.copy_(full["params"][name].to(p.dtype).view_as(p.data))
