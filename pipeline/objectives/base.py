"""The contract between objectives and the training loop.

An objective is an ``nn.Module`` subclassing :class:`Objective`. The loop may call exactly
what is declared here, nothing else (it never probes with ``hasattr``):

- ``forward(batch, ctx)`` -> an :class:`ObjectiveOutput`: a scalar ``loss`` to back-propagate
  and ``metrics()`` (floats to log: every ELBO term, or the adversarial balance);
- ``after_micro_step(output, all_gather)``: after each micro batch's backward (e.g. a time-step
  sampler's loss history, which must agree across ranks); no-op by default;
- ``after_optimizer_step(all_gather)``: after each optimizer step of this objective's phase;
  no-op by default;
- ``report()`` -> :class:`Report`: views for logging at each logging step (per-t profiles,
  sampler state); empty by default. The loop calls it with the phase's full weights in place
  (an FSDP-sharded parameter such as a learned schedule's is gathered first);
- ``sample(...)`` and ``check_sample_options(...)``, on the objective whose weights are kept as
  EMA and exported (:class:`SampledObjective`).

Objectives know nothing of processes or backends: the loop hands them a :class:`StepContext`
with the few integers that cross-rank schemes (stratified time steps) need, and an
``all_gather`` callable when they have state that must agree across ranks.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn

AllGather = Callable[[torch.Tensor], torch.Tensor]  # concatenates a tensor over ranks along dim 0


@dataclass(frozen=True)
class StepContext:
    step: int  # 0-based index of the optimizer step being computed
    micro_step: int  # index within gradient accumulation, 0 .. grad_accum_steps - 1
    grad_accum_steps: int
    rank: int
    world_size: int
    seed: int = 0  # the run's seed (run.seed), for draws keyed by a sample's global position


class ObjectiveOutput(Protocol):
    loss: torch.Tensor  # scalar, what is back-propagated

    def metrics(self) -> dict[str, float]: ...


class Profile(Protocol):
    """A per-t curve for the tracker (e.g. :class:`pipeline.track.metrics.TimeProfile`)."""

    def as_dict(self) -> dict[str, list]: ...


@dataclass
class Report:
    metrics: dict[str, float] = field(default_factory=dict)  # logged with the step's metrics
    profiles: dict[str, Profile] = field(default_factory=dict)  # name -> curve, logged as events


class Objective(nn.Module, metaclass=ABCMeta):
    """A module the loop trains as one phase (see the module docstring for the contract)."""

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor], ctx: StepContext | None = None) -> ObjectiveOutput: ...

    def after_micro_step(self, output: Any, all_gather: AllGather) -> None:
        """Called after each micro batch's backward with that micro batch's output."""

    def after_optimizer_step(self, all_gather: AllGather) -> None:
        """Called after each optimizer step of this objective's phase (skipped steps included)."""

    def report(self) -> Report:
        """Views since the last report, for logging; called on every rank at a logging step."""
        return Report()


class SampledObjective(Objective):
    """An objective whose module is sampled from (the EMA copy, and the export)."""

    @abstractmethod
    def sample(self, num_samples: int, labels: torch.Tensor | None = None, num_steps: int | None = None,
               generator: torch.Generator | None = None, sampler: Any = None) -> torch.Tensor:
        """``num_samples`` samples in data space. ``num_steps`` and ``sampler`` (a VDM's
        :class:`~pipeline.objectives.vdm.config.SamplerConfig`): how an iterative sampler runs;
        :meth:`check_sample_options` says which values this objective accepts."""

    @abstractmethod
    def check_sample_options(self, num_steps: int | None, sampler: Any) -> None:
        """ValueError naming what is wrong when ``sample`` would refuse these options; called
        before anything is sampled or written (an objective that samples in one forward pass,
        a GAN's generator, accepts only None for both)."""

    def sampling_settings(self, num_steps: int | None, sampler: Any) -> dict[str, Any]:
        """What ``sample`` will use for these options with the model's defaults resolved (the
        sampler, its grid, the number of steps), for what an evaluation or a sample set records;
        empty for an objective that samples in one forward pass."""
        return {}
