"""Labels to condition samples on, when the model is conditional."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.meta import DataMeta


def default_labels(meta: DataMeta, n: int, values: list[float] | None = None) -> torch.Tensor | None:
    """``n`` labels cycling over ``values`` (or every class / every temperature of the data)."""
    if meta.label_kind == "none":
        if values:
            raise ValueError("this model is unconditional: it takes no labels")
        return None
    if meta.label_kind == "class":
        assert meta.num_classes is not None
        fractional = [v for v in values or () if float(v) != int(v)]
        if fractional:  # int() would silently take class 2 for 2.5 (issue 15 item 14)
            raise ValueError(f"labels {fractional} are not class indices; allowed: integers 0..{meta.num_classes - 1}")
        pool = [int(v) for v in values] if values else list(range(meta.num_classes))
        bad = [v for v in pool if not 0 <= v < meta.num_classes]
        if bad:
            raise ValueError(f"labels {bad} out of range; allowed: 0..{meta.num_classes - 1}")
        return torch.tensor([pool[i % len(pool)] for i in range(n)], dtype=torch.long)
    pool = [float(v) for v in values] if values else list(meta.label_values or ())
    if not pool:
        raise ValueError("this model is conditional on a continuous label: give --label VALUE")
    return torch.tensor([pool[i % len(pool)] for i in range(n)], dtype=torch.float32)


def grid_labels(meta: DataMeta, n: int) -> torch.Tensor | None:
    """Labels for the training loop's sample grids: :func:`default_labels` (every class, every
    label value of the data), and for a continuous label the data knows only by its range (a
    label drawn per sample, e.g. a shower's incident energy, log-uniform in CaloChallenge) ``n``
    values spread over that range: geometrically when it is positive and spans a factor of 10
    or more, evenly otherwise. (``pipeline sample`` asks for ``--label`` instead.)"""
    if meta.label_kind == "continuous" and not meta.label_values and meta.label_range is not None:
        lo, hi = (float(v) for v in meta.label_range)
        spread = np.geomspace(lo, hi, n) if lo > 0 and hi >= 10 * lo else np.linspace(lo, hi, n)
        return torch.tensor(spread, dtype=torch.float32)
    return default_labels(meta, n)


def label_warnings(meta: DataMeta, values: list[float] | None) -> list[str]:
    """Continuous labels outside the range the model was trained on: allowed (a model may be
    asked to extrapolate), but what it draws there was never compared with data, so say so."""
    if meta.label_kind != "continuous" or not values or not meta.label_values:
        return []
    lo, hi = min(meta.label_values), max(meta.label_values)
    outside = [v for v in values if not lo <= v <= hi]
    if not outside:
        return []
    return [f"labels {outside} lie outside the labels the model was trained on ({lo:g}..{hi:g}: "
            f"{', '.join(f'{v:g}' for v in meta.label_values)}); its samples there are an extrapolation"]
