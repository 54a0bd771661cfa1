"""Driver for test_mixed_precision: one tiny conv regression trained by a real engine on the
ranks of ``accelerate launch``; rank 0 writes what it saw to ``--out`` (torch.save).

Recorded: the loss of every step; the dtype of the conv weight and output inside forward (bf16
under mixed precision); the dtype of every gradient FSDP reduce-scatters (recorded by wrapping
``torch.distributed.reduce_scatter_single``, which FSDP2 calls for it); the dtypes of the
parameters the optimizer steps and of their gradients and Adam moments after training.

    precision_toy.py --backend accelerate [--fsdp full_shard] --mixed-precision bf16 --out OUT.pt
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import EngineConfig, TrainConfig
from pipeline.objectives.base import StepContext
from pipeline.train.engines import build_engine
from pipeline.train.engines.process_exit import exit_process
from pipeline.train.phases import Phase

NUM_STEPS = 15
BATCH_PER_RANK = 16


@dataclass
class Out:
    loss: torch.Tensor

    def metrics(self) -> dict[str, float]:
        return {"loss": float(self.loss.detach())}


class ConvRegression(nn.Module):
    """Predict a fixed smoothing of a random field: conv -> silu -> conv, MSE."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, batch, ctx):
        pred = self.c2(F.silu(self.c1(batch["x"])))
        return Out(F.mse_loss(pred.float(), batch["y"]))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="accelerate")
    p.add_argument("--fsdp", default="off")
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    reduced: list[torch.dtype] = []
    original = dist.reduce_scatter_single

    def recording(output, input, *args, **kwargs):
        reduced.append(input.dtype)
        return original(output, input, *args, **kwargs)

    dist.reduce_scatter_single = recording
    engine = build_engine(EngineConfig(backend=a.backend, fsdp=a.fsdp, mixed_precision=a.mixed_precision))
    torch.manual_seed(0)
    model = ConvRegression()
    seen: dict[str, torch.dtype] = {}
    model.c1.register_forward_hook(lambda m, i, o: seen.update(weight=m.weight.dtype, output=o.dtype))
    prepared = engine.prepare(Phase("reg", model, lr=3e-3), TrainConfig(num_steps=NUM_STEPS, grad_clip_norm=None))
    kernel = torch.full((1, 1, 3, 3), 1 / 9)
    losses = []
    for step in range(NUM_STEPS):
        g = torch.Generator().manual_seed(1000 * step + engine.rank)  # each rank its own batch
        x = torch.randn(BATCH_PER_RANK, 1, 8, 8, generator=g)
        batch = {"x": x.to(engine.device), "y": F.conv2d(x, kernel, padding=1).to(engine.device)}
        with prepared.accumulating(True):
            out = prepared.forward(batch, StepContext(step, 0, 1, engine.rank, engine.world_size))
            prepared.backward(out.loss)
        grad_dtypes = sorted({str(_local(q.grad).dtype) for q in prepared.wrapped.parameters() if q.grad is not None})
        prepared.step(True)
        losses.append(float(engine.all_reduce_sum(out.loss.detach().float().reshape(1))) / engine.world_size)
    state = [t for s in prepared.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    record = {
        "losses": losses, "forward_weight": str(seen["weight"]), "forward_output": str(seen["output"]),
        "reduce_scatter": sorted({str(d) for d in reduced}), "grad_dtypes": grad_dtypes,
        "param_dtypes": sorted({str(_local(q).dtype) for q in prepared.wrapped.parameters()}),
        "moment_dtypes": sorted({str(_local(t).dtype) for t in state}), "world_size": engine.world_size,
    }
    if engine.rank == 0:
        torch.save(record, a.out)
    engine.barrier()
    engine.close()
    exit_process(0)


if __name__ == "__main__":
    main()
