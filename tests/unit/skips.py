"""Shared by the tests of the VDM's skips (vdm.skip): one module standing for every rank's."""

from __future__ import annotations

import torch

from pipeline.objectives.base import StepContext
from pipeline.objectives.vdm import VDM


def train_skip_over_ranks(m: VDM, parts_per_step) -> VDM:
    """Feed ``m`` micro batches split over "ranks" (one list of batches per step; a batch is the
    samples' tensor, or a dict with "x" and "label") through forward
    and after_micro_step, with a fake all_gather that concatenates the ranks' outputs: one module
    stands for every rank's, and each adds all ranks' skip sums once (vdm.skip)."""
    for step, parts in enumerate(parts_per_step):
        outs = [m(p if isinstance(p, dict) else {"x": p}, StepContext(step, 0, 1, r, len(parts), 0)) for r, p in enumerate(parts)]

        def gather(t):  # the stratified sampler gathers nothing: the calls are the skip's sums, then counts
            if t.dim() > 1:
                return torch.cat([o.data_sums.unsqueeze(0) for o in outs])
            return torch.cat([torch.tensor([float(o.u.shape[0])], dtype=torch.float64) for o in outs])

        m.after_micro_step(outs[0], gather)
    return m
