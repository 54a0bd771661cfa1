"""Sample grids as PNG (Pillow only: torchvision is not a dependency)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.arrays import as_numpy

NAN_RGB = (255, 0, 0)  # non-finite pixels (corrupt samples) show up red instead of vanishing


def to_uint8(images: Any, value_range: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Map ``images`` [N, H, W] to 0..255 and return ``(gray_uint8, finite_mask)``.

    Fixed mappings keep meaning across grids: spins {-1, +1} -> black/white, values in
    [0, 1] -> x * 255. Anything else is min-max normalised over the whole batch (not per
    image, so a uniform lattice stays distinguishable from a mixed one); a constant batch is
    mid-gray. ``value_range=(lo, hi)`` forces a linear mapping.
    """
    x = as_numpy(images, np.float64)
    finite = np.isfinite(x)
    vals = x[finite]
    if value_range is not None:
        lo, hi = value_range
        if not hi > lo:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    elif vals.size == 0:
        lo, hi = 0.0, 1.0
    elif np.all((vals == -1.0) | (vals == 1.0)):
        lo, hi = -1.0, 1.0
    elif vals.min() >= 0.0 and vals.max() <= 1.0:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = float(vals.min()), float(vals.max())
    if hi > lo:
        y = (np.where(finite, x, lo) - lo) / (hi - lo)
    else:
        y = np.full_like(x, 0.5)
    return np.round(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8), finite


def is_image_shape(sample_shape: tuple[int, ...]) -> bool:
    """Whether samples of this shape can be drawn as a grid: [H, W], [1, H, W], and single-channel
    3-D fields [1, D, H, W] by their middle slice (:func:`drawable`)."""
    return len(sample_shape) == 2 or (len(sample_shape) in (3, 4) and sample_shape[0] == 1)


def drawable(samples: np.ndarray) -> np.ndarray | None:
    """The [N, H, W] images that stand for a batch of samples in a grid: [N, H, W] and
    [N, 1, H, W] as they are, single-channel 3-D fields [N, 1, D, H, W] by their middle slice
    x[:, 0, D // 2]; None for samples that are not images (vectors, points, multi-channel)."""
    if not is_image_shape(tuple(samples.shape[1:])):
        return None
    if samples.ndim == 5:
        return samples[:, 0, samples.shape[2] // 2]
    return samples[:, 0] if samples.ndim == 4 else samples


def grid_shape(num_images: int, ncols: int | None = None) -> tuple[int, int]:
    """(rows, cols) of the grid: as square as possible unless ``ncols`` is given."""
    cols = ncols if ncols is not None else math.ceil(math.sqrt(num_images))
    return math.ceil(num_images / cols), cols


def save_grid_png(
    images: Any,
    path: str | Path,
    *,
    ncols: int | None = None,
    pad_px: int = 1,
    scale: int = 1,
    value_range: tuple[float, float] | None = None,
) -> Path:
    """Write a grid of ``images`` ([N, H, W] or [N, 1, H, W]) to ``path`` as an RGB PNG.

    Tiles are upscaled ``scale`` times (nearest neighbour: lattice sites stay sharp) and
    separated by ``pad_px`` pixels of gray. Image size: width ``cols * W * scale + (cols + 1)
    * pad_px``, height likewise with rows.
    """
    x = as_numpy(images, np.float64)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"images must have shape [N, H, W] or [N, 1, H, W], got {tuple(x.shape)}")
    n, h, w = x.shape
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"images must be non-empty, got shape {tuple(x.shape)}")
    if scale < 1 or pad_px < 0:
        raise ValueError(f"scale must be >= 1 and pad_px >= 0, got scale={scale}, pad_px={pad_px}")
    if ncols is not None and ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    from PIL import Image

    gray, finite = to_uint8(x, value_range)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    rgb[~finite] = NAN_RGB
    if scale > 1:
        rgb = rgb.repeat(scale, axis=1).repeat(scale, axis=2)
    th, tw = h * scale, w * scale
    rows, cols = grid_shape(n, ncols)
    canvas = np.full((rows * th + (rows + 1) * pad_px, cols * tw + (cols + 1) * pad_px, 3), 128, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad_px + r * (th + pad_px), pad_px + c * (tw + pad_px)
        canvas[top : top + th, left : left + tw] = rgb[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(canvas).save(tmp, format="PNG")
    tmp.replace(path)  # a reader never sees a half-written PNG
    return path
