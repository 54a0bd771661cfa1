"""The learning-rate schedule: linear warm-up, then cosine decay (SGDR, Loshchilov & Hutter 2017,
without restarts) to a floor. Every backend drives its optimizer's LR with it, once per
optimizer step."""

from __future__ import annotations

import math

from pipeline.config import TrainConfig


def lr_lambda(train: TrainConfig, repeats: int = 1):
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``, as a
    function of the phase's optimizer step count. A phase that steps ``repeats`` times per loop
    step (a GAN's D: n_critic) follows the same curve over the loop's steps as the others:
    ``train.num_steps`` and ``train.warmup_steps`` count loop steps, not a phase's own."""
    assert repeats >= 1, repeats

    def f(optimizer_step: int) -> float:
        step = optimizer_step // repeats
        if train.warmup_steps > 0 and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.min_lr_ratio >= 1.0:
            return 1.0
        span = max(1, train.num_steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
