"""``engine.compile=true``: ``torch.compile`` of the networks inside each phase's objective (the
VDM's denoiser network, the GAN's G and D), in place, before the backend wraps them.

Only the networks are compiled, not the objective around them: the objectives' Python
(time-step samplers, ELBO bookkeeping, logging) would break the graph everywhere for no gain,
while the networks hold nearly all the FLOPs. ``nn.Module.compile`` compiles in place, so
parameter names, state dicts and checkpoints are the same as without it, and DDP, FSDP2 and
ZeRO-1/2 wrap the module as usual. ZeRO-3 is refused by ``Config.validate``: its parameters
are swapped for partitions by hooks around every submodule, which a compiled graph bypasses.
"""

from __future__ import annotations

import torch.nn as nn

from pipeline.models import MLP, UNet
from pipeline.models.gan_nets import _Discriminator, _Generator

NETWORKS = (UNet, MLP, _Generator, _Discriminator)


def compile_networks(module: nn.Module) -> list[str]:
    """Compile every outermost network in ``module``; their names (``[]``: nothing to compile)."""
    done: list[str] = []
    for name, m in module.named_modules():
        if isinstance(m, NETWORKS) and not any(name.startswith(d + ".") for d in done):
            m.compile()
            done.append(name)
    return done
