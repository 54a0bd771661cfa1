"""scikit-learn's bundled handwritten digits: real data with class labels, no download."""

from __future__ import annotations

import numpy as np

from pipeline.data.meta import DataMeta
from pipeline.data.sources.base import SourceData


def digits() -> SourceData:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16), [1, 8, 8]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.asarray(d.images)
    assert images.min() >= 0 and images.max() <= 16 and np.all(images == np.round(images))
    return SourceData(
        x=images.astype(np.uint8)[:, None],
        meta=DataMeta(
            sample_shape=(1, 8, 8),
            data_kind="levels",
            num_levels=17,
            label_kind="class",
            num_classes=10,
        ),
        cls=np.asarray(d.target, dtype=np.int64),
    )
