"""Convolutions over 1, 2 or 3 spatial dimensions, looked up by the number of spatial
dimensions of a sample [C, L], [C, H, W], [C, D, H, W]: the one table the UNet and the GAN's
conv networks share."""

from __future__ import annotations

import torch.nn as nn

# ndim -> (convolution, transposed convolution) over that many spatial dimensions.
CONVS: dict[int, tuple[type[nn.Module], type[nn.Module]]] = {
    1: (nn.Conv1d, nn.ConvTranspose1d),
    2: (nn.Conv2d, nn.ConvTranspose2d),
    3: (nn.Conv3d, nn.ConvTranspose3d),
}
SAMPLE_LAYOUTS = {1: "(C, L)", 2: "(C, H, W)", 3: "(C, D, H, W)"}


def convs(ndim: int, who: str = "a conv net") -> tuple[type[nn.Module], type[nn.Module]]:
    """(Conv, ConvTranspose) for ``ndim`` spatial dimensions; ValueError naming ``who`` otherwise."""
    if ndim not in CONVS:
        raise ValueError(f"{who} needs 1, 2 or 3 spatial dimensions (samples {', '.join(SAMPLE_LAYOUTS.values())}), "
                         f"got {ndim!r}")
    return CONVS[ndim]
