"""A small real image set in the official CIFAR-10 python format, made from scikit-learn's digits.

There is no CIFAR-10 on this machine and nothing is downloaded: each 8x8 digit is scaled to 32x32
(nearest neighbour), tinted per channel and written as the ``data_batch_1..5`` / ``test_batch``
pickles of ``cifar-10-python.tar.gz``, so the ``cifar10`` dataset plugin, the ``cifar_cnn`` model
and the augmentation options run on learnable data.
"""

from __future__ import annotations

import pickle
import tarfile
import tempfile
from pathlib import Path

BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


def write_archive(path: Path, per_batch: int = 250) -> Path:
    """Write ``path`` (a ``.tar.gz``) with ``per_batch`` images in each of the six batches."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.repeat(np.repeat(digits.images / 16.0, 4, axis=1), 4, axis=2)  # N, 32, 32 in [0, 1]
    tint = np.array([1.0, 0.7, 0.4])[None, :, None, None]
    pixels = (images[:, None] * tint * 255).astype(np.uint8).reshape(len(images), 3072)
    labels = digits.target
    order = np.random.RandomState(0).permutation(len(labels))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cifar-10-batches-py"
        root.mkdir()
        for b, name in enumerate(BATCHES):
            idx = order[np.arange(b * per_batch, (b + 1) * per_batch) % len(order)]
            batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels[idx]],
                     b"data": pixels[idx], b"filenames": [f"digit_{i}.png".encode() for i in idx]}
            (root / name).write_bytes(pickle.dumps(batch, protocol=2))
        meta = {b"label_names": [str(i).encode() for i in range(10)], b"num_cases_per_batch": per_batch,
                b"num_vis": 3072}
        (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w:gz") as tar:
            tar.add(root, arcname="cifar-10-batches-py")
    return path
