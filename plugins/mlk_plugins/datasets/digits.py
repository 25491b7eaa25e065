"""``digits``: scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels, 10 classes).

It ships inside scikit-learn, so it needs no download: the dataset of quick runs and tests.
The file is read with numpy from scikit-learn's package folder, without importing scikit-learn
(``sklearn.datasets`` takes ~2.5 s to import here, in the driver and again in every worker pool;
the file takes ~15 ms to read). ``load_digits`` is the fallback when the file is not where
scikit-learn keeps it; both give the same arrays (tested).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Any, ClassVar

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
    preload = ("numpy",)
    extra = "sklearn"
    config: DigitsConfig

    def load(self) -> DataSplits:
        import numpy as np

        pixels, target = read_digits()
        inputs = np.ascontiguousarray(pixels / 16.0, dtype=np.float32)
        labels = np.ascontiguousarray(target, dtype=np.int64)
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
            "classes": [str(c) for c in range(10)],
        }
        return DataSplits(train=train, val=val, test=test, meta=meta)


def bundled_file() -> Path | None:
    """Where scikit-learn keeps ``digits.csv.gz`` (found without importing scikit-learn), or None."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def read_digits() -> tuple[Any, Any]:
    """The 1797 x 64 pixel values (float64, 0-16) and the labels, as ``load_digits`` returns them."""
    import numpy as np

    path = bundled_file()
    if path is None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data, bunch.target
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)
