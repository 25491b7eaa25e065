"""The dataset contract (``mlk.datasets``).

A dataset plugin turns the spec's ``data:`` section into arrays split three ways. The split is
fixed by the dataset, never by the run's seed, so trials and runs compare on the same data. The
kernel records :meth:`DataSplits.fingerprint` in every run's provenance.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mlk.plugin import Plugin
from mlk.sections import DataConfig


@dataclass
class DataSplits:
    """Arrays (numpy) of one dataset: ``train``, ``val`` and ``test`` are ``(inputs, labels)``.

    ``meta`` describes them for models and frameworks: ``input_shape`` (one example, without
    the batch axis), ``num_classes``, ``layout`` (``"flat"`` or ``"nchw"``), ``classes``.
    """

    train: tuple[Any, Any]
    val: tuple[Any, Any]
    test: tuple[Any, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """sha256 over every array's dtype, shape and bytes, in split order."""
        h = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            for arr in split:
                h.update(f"{arr.dtype}{arr.shape}".encode())
                h.update(memoryview(arr).tobytes() if arr.flags["C_CONTIGUOUS"] else arr.copy().tobytes())
        return h.hexdigest()

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train[1]), "val": len(self.val[1]), "test": len(self.test[1])}


class Dataset(Plugin):
    """Base class of dataset plugins. Implement :meth:`load`; raise ``UserError`` for missing files."""

    Config: ClassVar[type[DataConfig]] = DataConfig

    def __init__(self, config: DataConfig) -> None:
        self.config = config

    def load(self) -> DataSplits:
        raise NotImplementedError
