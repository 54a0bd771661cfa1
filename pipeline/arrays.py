"""Arrays from numpy arrays or torch tensors, without importing torch (a leaf module).

Evaluation, physics and tracking code takes either; a tensor is recognised by its
``detach`` method, so that these modules (and ``pipeline.config``) never pull in torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def as_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """``x`` as a numpy array on the host (``np.asarray(x, dtype)`` for anything not a tensor).

    With a ``dtype``, a tensor is cast to float32 first (``.float()``): numpy has no bfloat16,
    so half-precision activations and samples convert; this is the conversion the trackers
    always made, and their logged values depend on it.
    """
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach()
        if dtype is not None:
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x, dtype=dtype)
