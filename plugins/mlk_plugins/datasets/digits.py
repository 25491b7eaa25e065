"""``digits``: scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels, 10 classes).

It ships inside scikit-learn, so it needs no download: the dataset of quick runs and tests.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from mlk.datasets import Dataset, DataSplits
from mlk.sections import DataConfig

#: Fractions of the shuffled examples in train and val; the rest is test.
TRAIN_FRACTION = 0.6
VAL_FRACTION = 0.2
#: The split is drawn once with this seed, never with the run's, so every run sees the same data.
SPLIT_SEED = 0


class DigitsConfig(DataConfig):
    """``data:`` for ``name: digits``."""

    subset: int | None = Field(
        None, ge=1, description="use only the first N training examples (quick runs); val and test stay whole"
    )


class DigitsDataset(Dataset):
    """8x8 digit images as flat float32 vectors in [0, 1] (64 features), labels int64 0-9.

    Split 60/20/20 into train/val/test by a fixed permutation (``RandomState(0)``).
    """

    name = "digits"
    Config: ClassVar[type[DigitsConfig]] = DigitsConfig
    requires = ("sklearn", "numpy")
    preload = ("numpy", "sklearn.datasets")
    extra = "sklearn"
    config: DigitsConfig

    def load(self) -> DataSplits:
        import numpy as np
        from sklearn.datasets import load_digits

        bunch = load_digits()
        inputs = np.ascontiguousarray(bunch.data / 16.0, dtype=np.float32)
        labels = np.ascontiguousarray(bunch.target, dtype=np.int64)
        order = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
        n_train = int(len(labels) * TRAIN_FRACTION)
        n_val = int(len(labels) * VAL_FRACTION)
        parts = np.split(order, [n_train, n_train + n_val])
        train, val, test = ((inputs[idx], labels[idx]) for idx in parts)
        if self.config.subset is not None:
            train = (train[0][: self.config.subset], train[1][: self.config.subset])
        meta = {
            "input_shape": [inputs.shape[1]],
            "num_classes": 10,
            "layout": "flat",
            "classes": [str(c) for c in bunch.target_names],
        }
        return DataSplits(train=train, val=val, test=test, meta=meta)
