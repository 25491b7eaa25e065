"""``cifar10``: the CIFAR-10 images (60000 colour images of 32x32 pixels, 10 classes).

Reads the official *python version* as published by its authors: the archive
``cifar-10-python.tar.gz`` or its extracted folder ``cifar-10-batches-py``. Each batch is a pickle,
and a pickle can run code while it loads, so batches are read by an unpickler that rebuilds only
numpy arrays and plain containers and refuses anything else.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import pickle
import sys
import tarfile
import urllib.request
import zlib
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from mlk.datasets import Dataset, DataSplits
from mlk.errors import UserError
from mlk.sections import DataConfig

#: Where the authors publish the archive; ``MLK_CIFAR10_URL`` overrides it (a mirror, a test).
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
URL_ENV = "MLK_CIFAR10_URL"
#: md5 of the official archive, as given on the dataset's page.
MD5 = "c58f30108f718f92721af3b95e74349a"
PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
#: Seconds to wait for the server at each step of a download (this machine may be offline).
TIMEOUT = 15.0

ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
TEST_BATCH = "test_batch"
META = "batches.meta"
#: The last tenth of the training batches is the validation split (5000 of the official 50000).
VAL_FRACTION = 0.1
IMAGE_SHAPE = (3, 32, 32)


class AugmentConfig(BaseModel):
    """``data.augment``: random changes to each training image, drawn afresh every epoch.

    The training framework applies them (the torch framework does, to ``nchw`` data); val and
    test images are never augmented.
    """

    model_config = ConfigDict(extra="forbid")

    width_shift: float = Field(
        0.0, ge=0.0, lt=1.0, description="shift left/right by up to this fraction of the width, zero-filled"
    )
    height_shift: float = Field(
        0.0, ge=0.0, lt=1.0, description="shift up/down by up to this fraction of the height, zero-filled"
    )
    horizontal_flip: bool = Field(False, description="mirror half of the images left to right")


class Cifar10Config(DataConfig):
    """``data:`` for ``name: cifar10``."""

    path: str | None = Field(
        None,
        description=f"the archive {ARCHIVE}, the folder {FOLDER}, or a folder holding either; "
        "default $MLK_HOME/data/cifar10",
    )
    subset: int | None = Field(
        None, ge=1, description="use only the first N training examples (quick runs); val and test stay whole"
    )
    download: bool = Field(True, description=f"download {ARCHIVE} into `path` when it is not there")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="training-time augmentation")


class Cifar10Dataset(Dataset):
    """CIFAR-10 as float32 NCHW images in [0, 1] and int64 labels.

    train: the first 45000 images of ``data_batch_1..5``; val: the last 5000; test: ``test_batch``.
    """

    name = "cifar10"
    Config: ClassVar[type[Cifar10Config]] = Cifar10Config
    requires = ("numpy",)
    extra = "torch"
    config: Cifar10Config

    def root(self) -> Path:
        """Where the files are looked for (and downloaded to)."""
        if self.config.path:
            return Path(self.config.path).expanduser()
        from mlk.store import mlk_home

        return mlk_home() / "data" / "cifar10"

    def load(self) -> DataSplits:
        import numpy as np

        root = self.root()
        source = find_source(root)
        if source is None:
            if not self.config.download:
                raise missing_error(root, reason=None, download=False)
            source = download(archive_destination(root), root)
        batches = read_batches(source)

        train = [_examples(batches[n], n) for n in TRAIN_BATCHES]
        train_x = np.concatenate([x for x, _ in train])
        train_y = np.concatenate([y for _, y in train])
        n_val = int(len(train_y) * VAL_FRACTION)
        n_train = len(train_y) - n_val
        keep = n_train if self.config.subset is None else min(self.config.subset, n_train)
        test_x, test_y = _examples(batches[TEST_BATCH], TEST_BATCH)
        meta = {
            "input_shape": list(IMAGE_SHAPE),
            "num_classes": 10,
            "layout": "nchw",
            "classes": _label_names(batches[META]),
        }
        return DataSplits(
            train=(_to_float(train_x[:keep]), train_y[:keep].copy()),
            val=(_to_float(train_x[n_train:]), train_y[n_train:].copy()),
            test=(_to_float(test_x), test_y),
            meta=meta,
        )


# -- finding and downloading ---------------------------------------------------------------------


def find_source(root: Path) -> Path | None:
    """The archive or extracted folder at or directly under ``root``, or None."""
    if root.is_file():
        return root
    if not root.is_dir():
        return None
    if (root / TRAIN_BATCHES[0]).is_file():
        return root
    if (root / FOLDER / TRAIN_BATCHES[0]).is_file():
        return root / FOLDER
    if (root / ARCHIVE).is_file():
        return root / ARCHIVE
    return None


def archive_destination(root: Path) -> Path:
    """Where a download goes: ``root`` itself when it names an archive, else ``root/ARCHIVE``."""
    return root if root.name.endswith((".tar.gz", ".tgz")) else root / ARCHIVE


def missing_error(root: Path, reason: str | None, download: bool) -> UserError:
    folder = root.parent if root.name.endswith((".tar.gz", ".tgz")) else root
    message = f"CIFAR-10 is not at {root}"
    if reason:
        message += f", and downloading it failed: {reason}"
    hint = (
        f"download the python version, {ARCHIVE} (from {PAGE}), and put it at {folder / ARCHIVE}, "
        f"or put its extracted folder at {folder / FOLDER} "
        f"(it holds {', '.join(TRAIN_BATCHES)}, {TEST_BATCH} and {META}); "
        "or point data.path at where you keep it"
    )
    if not download:
        hint += "; or set data.download=true to fetch it"
    return UserError(message, where="data.path", hint=hint)


def download(dest: Path, root: Path) -> Path:
    """Fetch the archive to ``dest`` with progress on stderr, check its md5; UserError on failure."""
    url = os.environ.get(URL_ENV) or URL
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            # The folder is made only once the server answers, so a failed attempt leaves nothing.
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "wb") as out:
                progress = _Progress(url, dest, int(response.headers.get("Content-Length") or 0))
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    progress.advance(len(block))
                progress.done()
    except (OSError, http.client.HTTPException, ValueError) as e:
        part.unlink(missing_ok=True)
        raise missing_error(root, reason=f"{url}: {e}", download=True) from None
    if digest.hexdigest() != MD5:
        part.unlink(missing_ok=True)
        raise missing_error(
            root, reason=f"{url} sent a file whose md5 is {digest.hexdigest()}, not the official {MD5}",
            download=True,
        )
    os.replace(part, dest)
    return dest


class _Progress:
    """Download progress on stderr: one updating line on a terminal, every 10% otherwise."""

    def __init__(self, url: str, dest: Path, total: int) -> None:
        self.total = total
        self.received = 0
        self.shown = -1
        self.tty = sys.stderr.isatty()
        sys.stderr.write(f"downloading {url}\n  to {dest}\n")

    def advance(self, n: int) -> None:
        self.received += n
        mb = self.received / 1e6
        if self.total:
            pct = int(100 * self.received / self.total)
            step = pct if self.tty else pct // 10 * 10
            if step != self.shown:
                self.shown = step
                self._write(f"  {mb:.1f} / {self.total / 1e6:.1f} MB ({pct}%)")
        elif self.tty:
            self._write(f"  {mb:.1f} MB")

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def _write(self, text: str) -> None:
        sys.stderr.write(f"\r{text}" if self.tty else f"{text}\n")
        sys.stderr.flush()


# -- reading ---------------------------------------------------------------------------------------


def read_batches(source: Path) -> dict[str, Any]:
    """Every batch (and ``batches.meta``) of the archive or folder ``source``, safely unpickled."""
    names = (*TRAIN_BATCHES, TEST_BATCH, META)
    raw: dict[str, bytes] = {}
    if source.is_dir():
        for name in names:
            if (source / name).is_file():
                raw[name] = (source / name).read_bytes()
    else:
        raw = _read_archive(source, names)
    missing = [n for n in names if n not in raw]
    if missing:
        raise UserError(
            f"{source} has no {', '.join(missing)}; it is not a complete copy of CIFAR-10's python version",
            where="data.path", hint=f"replace it with a fresh {ARCHIVE} from {PAGE}",
        )
    return {name: safe_unpickle(data, f"{source}:{name}") for name, data in raw.items()}


def _read_archive(path: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    # Members are read in memory, never extracted, so no path inside the archive can escape.
    raw: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in names and base not in raw:
                    handle = tar.extractfile(member)
                    if handle is not None:
                        raw[base] = handle.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(
            f"{path} is not a readable {ARCHIVE}: {e}", where="data.path",
            hint=f"delete it and put a fresh copy from {PAGE} there (or set data.download=true)",
        ) from None
    return raw


class UnsafePickleError(pickle.UnpicklingError):
    """A batch's pickle refers to something that a CIFAR-10 batch never contains."""


#: Builtins a batch pickle may name: harmless constructors of plain data.
_SAFE_BUILTINS = frozenset({"set", "frozenset", "bytearray", "complex", "slice", "range"})
#: numpy functions that rebuild arrays (``multiarray._reconstruct`` up to protocol 4, ``_frombuffer`` in 5).
_NUMPY_CORE = frozenset({("multiarray", "_reconstruct"), ("numeric", "_frombuffer")})


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "numpy" and name in ("ndarray", "dtype"):
            import numpy

            return getattr(numpy, name)
        for prefix in ("numpy.core.", "numpy._core."):
            sub = module[len(prefix):]
            if module.startswith(prefix) and (sub, name) in _NUMPY_CORE:
                return _numpy_core(sub, name)
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            import builtins

            return getattr(builtins, name)
        if module == "_codecs" and name == "encode":
            # Python 3 writes bytes this way at protocol 2: _codecs.encode(text, "latin1").
            return _latin1_encode
        raise UnsafePickleError(f"it refers to {module}.{name}, which a CIFAR-10 batch never contains")


def _numpy_core(sub: str, name: str) -> Any:
    import importlib

    try:
        module = importlib.import_module(f"numpy._core.{sub}")
    except ImportError:  # numpy < 1.26 has only numpy.core
        module = importlib.import_module(f"numpy.core.{sub}")
    return getattr(module, name)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"it encodes text as {encoding!r}; only latin1 is expected")
    return text.encode("latin1")


def safe_unpickle(data: bytes, where: str) -> Any:
    """Unpickle one batch file, refusing any global but numpy's array rebuilders and plain builtins."""
    try:
        return _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as e:
        raise UserError(
            f"{where} was refused: {e}. It is not an official CIFAR-10 batch and loading it could run code",
            where="data.path", hint=f"replace the file with one from the official {ARCHIVE} ({PAGE})",
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{where} is not a readable CIFAR-10 batch: {e}", where="data.path",
                        hint=f"replace it with a fresh copy from {PAGE}") from None


def _field(batch: Any, key: str, where: str) -> Any:
    if isinstance(batch, dict):
        for k in (key.encode(), key):
            if k in batch:
                return batch[k]
    raise UserError(f"{where} has no '{key}' entry; it is not a CIFAR-10 batch", where="data.path")


def _examples(batch: Any, where: str) -> tuple[Any, Any]:
    """``(images uint8 (N, 3, 32, 32), labels int64 (N,))`` of one batch, checked."""
    import numpy as np

    data = _field(batch, "data", where)
    size = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != size:
        got = f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        raise UserError(f"{where}: 'data' should be uint8 of shape (N, {size}), got {got}", where="data.path")
    n = data.shape[0]
    try:
        labels = np.asarray(_field(batch, "labels", where), dtype=np.int64)
    except (TypeError, ValueError):
        labels = None
    if labels is None or labels.shape != (n,) or (n and (labels.min() < 0 or labels.max() > 9)):
        raise UserError(f"{where}: 'labels' should be {n} integers in 0..9", where="data.path")
    return data.reshape(n, *IMAGE_SHAPE), labels


def _label_names(meta: Any) -> list[str]:
    names = _field(meta, "label_names", META)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _to_float(images: Any) -> Any:
    import numpy as np

    out = images.astype(np.float32)
    out /= 255.0
    return out
