"""The dataset plugins: digits (bundled with scikit-learn) and cifar10 (official python format).

CIFAR-10 is never downloaded here: the tests write small archives in the real format (pickled
batch dicts, in a tar.gz) and serve them, when a download is under test, from a local server.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import pickle
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

np = pytest.importorskip("numpy")

from mlk.datasets import Dataset  # noqa: E402
from mlk.errors import UserError  # noqa: E402
from mlk.imports import import_object  # noqa: E402
from mlk.spec import validate_section  # noqa: E402
from mlk_plugins.datasets import cifar10  # noqa: E402
from mlk_plugins.datasets.cifar10 import Cifar10Dataset  # noqa: E402
from mlk_plugins.datasets.digits import DigitsDataset  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
ENTRY_POINTS = {
    "digits": "mlk_plugins.datasets.digits:DigitsDataset",
    "cifar10": "mlk_plugins.datasets.cifar10:Cifar10Dataset",
}
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def declares(group: str, name: str, value: str) -> bool:
    """Whether pyproject.toml declares ``name = "value"`` in the entry-point group ``mlk.<group>``."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split(f'[project.entry-points."mlk.{group}"]', 1)[1].split("\n[", 1)[0]
    return f'{name} = "{value}"' in section


# -- contract ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "cifar10"])
def test_dataset_plugins_declare_their_contract(name: str) -> None:
    assert declares("datasets", name, ENTRY_POINTS[name])
    cls = import_object(ENTRY_POINTS[name], where="test")
    assert issubclass(cls, Dataset) and cls.name == name
    assert cls.Config.model_config["extra"] == "forbid"
    assert [n for n, f in cls.Config.model_fields.items() if not f.description] == []
    assert cls.extra in ("sklearn", "torch") and cls.missing_requirements() == []


# -- digits --------------------------------------------------------------------------------------------


def load_digits(**options: Any) -> Any:
    return DigitsDataset(validate_section(DigitsDataset.Config, {"name": "digits", **options}, "data")).load()


def test_digits_is_split_60_20_20_scaled_and_typed() -> None:
    pytest.importorskip("sklearn")
    splits = load_digits()
    assert splits.sizes() == {"train": 1078, "val": 359, "test": 360}
    for x, y in (splits.train, splits.val, splits.test):
        assert x.dtype == np.float32 and x.shape[1] == 64 and y.dtype == np.int64
        assert x.min() == 0.0 and x.max() == 1.0
        assert set(np.unique(y)) == set(range(10))
    assert splits.meta == {"input_shape": [64], "num_classes": 10, "layout": "flat",
                           "classes": [str(i) for i in range(10)]}
    # Disjoint and complete: the three splits together are the 1797 images, each once.
    rows = np.concatenate([splits.train[0], splits.val[0], splits.test[0]])
    from sklearn.datasets import load_digits as sk_load

    original = (sk_load().data / 16.0).astype(np.float32)
    assert sorted(map(bytes, rows)) == sorted(map(bytes, original))


def test_digits_split_is_fixed_and_subset_limits_train_only() -> None:
    pytest.importorskip("sklearn")
    a, b = load_digits(), load_digits()
    assert a.fingerprint() == b.fingerprint()
    small = load_digits(subset=100)
    assert small.sizes() == {"train": 100, "val": 359, "test": 360}
    assert np.array_equal(small.train[0], a.train[0][:100])
    assert np.array_equal(small.val[1], a.val[1])
    with pytest.raises(UserError, match=r"data\.subset"):
        load_digits(subset=0)
    with pytest.raises(UserError, match=r"data\.augment: unknown key"):
        load_digits(augment={"horizontal_flip": True})


def test_digits_read_from_the_file_equal_load_digits_and_need_no_sklearn_import(monkeypatch: Any) -> None:
    pytest.importorskip("sklearn")
    import subprocess
    import sys

    from sklearn.datasets import load_digits as sk_load

    from mlk_plugins.datasets import digits

    assert digits.bundled_file() is not None
    pixels, labels = digits.read_digits()
    bunch = sk_load()
    assert pixels.dtype == bunch.data.dtype and np.array_equal(pixels, bunch.data)
    assert labels.dtype == np.int64 and np.array_equal(labels, bunch.target)
    fast = load_digits().fingerprint()
    monkeypatch.setattr(digits, "bundled_file", lambda: None)  # where the file moved: load_digits
    assert load_digits().fingerprint() == fast
    code = ("import sys; from mlk_plugins.datasets.digits import DigitsDataset as D; "
            "D(D.Config(name='digits')).load(); print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- cifar10: writing the official format --------------------------------------------------------------


def fake_batches(per_batch: int = 20) -> dict[str, dict[bytes, Any]]:
    """Batch dicts as the official pickles hold them; image i of the whole set has every pixel of
    channel c equal to (i + 50 * c) % 256 except pixel (row 1, col 2), which is 255 - that."""
    out = {}
    for b, name in enumerate(BATCHES):
        data = np.zeros((per_batch, 3072), dtype=np.uint8)
        for i in range(per_batch):
            index = b * per_batch + i
            for c in range(3):
                value = (index + 50 * c) % 256
                data[i, c * 1024:(c + 1) * 1024] = value
                data[i, c * 1024 + 1 * 32 + 2] = 255 - value
        labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        out[name] = {b"batch_label": f"batch {name}".encode(), b"labels": labels, b"data": data,
                     b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)]}
    out["batches.meta"] = {b"label_names": [n.encode() for n in LABEL_NAMES],
                           b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    return out


def write_folder(folder: Path, protocol: int = 2, per_batch: int = 20, skip: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, batch in fake_batches(per_batch).items():
        if name not in skip:
            (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return folder


def write_archive(path: Path, per_batch: int = 20) -> Path:
    staging = write_folder(path.parent / "staging" / "cifar-10-batches-py", per_batch=per_batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(staging, arcname="cifar-10-batches-py")
    return path


def load_cifar(path: Path | None, **options: Any) -> Any:
    section = {"name": "cifar10", "path": str(path) if path else None, **options}
    return Cifar10Dataset(validate_section(Cifar10Dataset.Config, section, "data")).load()


def check_splits(splits: Any, per_batch: int = 20) -> None:
    n = 5 * per_batch
    n_val = n // 10
    assert splits.sizes() == {"train": n - n_val, "val": n_val, "test": per_batch}
    assert splits.meta == {"input_shape": [3, 32, 32], "num_classes": 10, "layout": "nchw",
                           "classes": LABEL_NAMES}
    for x, y in (splits.train, splits.val, splits.test):
        assert x.dtype == np.float32 and x.shape[1:] == (3, 32, 32) and y.dtype == np.int64
        assert 0.0 <= x.min() and x.max() <= 1.0
    # NCHW from row-major RGB planes: channel c of image i is (i + 50c) % 256, pixel (1, 2) inverted.
    for split, first in ((splits.train, 0), (splits.val, n - n_val), (splits.test, n)):
        x, y = split
        for j in (0, len(y) - 1):
            index = first + j
            for c in range(3):
                value = (index + 50 * c) % 256
                assert x[j, c, 0, 0] == np.float32(value) / np.float32(255)
                assert x[j, c, 1, 2] == np.float32(255 - value) / np.float32(255)
            assert y[j] == index % 10


# -- cifar10: reading --------------------------------------------------------------------------------


def test_cifar_reads_the_archive(tmp_path: Path) -> None:
    archive = write_archive(tmp_path / "data" / "cifar-10-python.tar.gz")
    check_splits(load_cifar(archive, download=False))
    # ...and a folder that holds the archive.
    check_splits(load_cifar(archive.parent, download=False))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_reads_the_extracted_folder(tmp_path: Path, protocol: int) -> None:
    folder = write_folder(tmp_path / "cifar-10-batches-py", protocol=protocol)
    check_splits(load_cifar(folder, download=False))
    check_splits(load_cifar(tmp_path, download=False))


def test_cifar_subset_limits_train_only(tmp_path: Path) -> None:
    write_folder(tmp_path / "cifar-10-batches-py")
    full = load_cifar(tmp_path, download=False)
    small = load_cifar(tmp_path, download=False, subset=7)
    assert small.sizes() == {"train": 7, "val": 10, "test": 20}
    assert np.array_equal(small.train[0], full.train[0][:7])
    assert small.fingerprint() != full.fingerprint()
    assert load_cifar(tmp_path, download=False).fingerprint() == full.fingerprint()


def test_cifar_augment_options_are_validated() -> None:
    section = {"name": "cifar10", "augment": {"horizontal_flip": True}}
    ok = validate_section(Cifar10Dataset.Config, section, "data")
    assert ok.augment.horizontal_flip and ok.augment.width_shift == 0.0
    with pytest.raises(UserError, match=r"data\.augment\.rotation: unknown key"):
        validate_section(Cifar10Dataset.Config, {"name": "cifar10", "augment": {"rotation": 10}}, "data")
    with pytest.raises(UserError, match=r"data\.augment\.width_shift"):
        validate_section(Cifar10Dataset.Config, {"name": "cifar10", "augment": {"width_shift": 1.0}}, "data")


def test_cifar_incomplete_folder_names_what_is_missing(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "cifar-10-batches-py", skip=("test_batch", "batches.meta"))
    with pytest.raises(UserError, match=r"has no test_batch, batches\.meta"):
        load_cifar(folder, download=False)


def test_cifar_damaged_archive_is_a_user_error(tmp_path: Path) -> None:
    archive = write_archive(tmp_path / "cifar-10-python.tar.gz")
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(UserError, match=r"not a readable cifar-10-python\.tar\.gz"):
        load_cifar(archive, download=False)


# -- cifar10: refusing malicious pickles --------------------------------------------------------------


class RunsACommand:
    """Unpickling this calls os.system: what a hostile 'batch' file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


class CallsEval:
    def __reduce__(self) -> Any:
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("hostile", ["system", "eval"])
def test_cifar_refuses_a_pickle_that_would_run_code(tmp_path: Path, hostile: str) -> None:
    folder = write_folder(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    payload = RunsACommand(marker) if hostile == "system" else CallsEval()
    batch = fake_batches()["data_batch_3"]
    batch[b"labels"] = payload
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(UserError, match=rf"data_batch_3 was refused: it refers to \w+\.{hostile}") as err:
        load_cifar(folder, download=False)
    assert "could run code" in str(err.value)
    assert not marker.exists()


def test_cifar_refuses_a_hostile_pickle_inside_the_archive(tmp_path: Path) -> None:
    staging = write_folder(tmp_path / "staging" / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    (staging / "test_batch").write_bytes(pickle.dumps({b"data": RunsACommand(marker)}, protocol=4))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging, arcname="cifar-10-batches-py")
    with pytest.raises(UserError, match="test_batch was refused"):
        load_cifar(archive, download=False)
    assert not marker.exists()


# -- cifar10: missing files and downloads -----------------------------------------------------------


def test_cifar_missing_without_download_says_where_to_put_it(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(UserError) as err:
        load_cifar(root, download=False)
    text = str(err.value)
    assert text.startswith(f"data.path: CIFAR-10 is not at {root}")
    assert str(root / "cifar-10-python.tar.gz") in text
    assert str(root / "cifar-10-batches-py") in text
    assert "data.download=true" in text
    assert not root.exists()


def test_cifar_offline_download_fails_fast_with_the_same_advice(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLK_CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    monkeypatch.setenv("MLK_HOME", str(tmp_path / "home"))
    default_root = tmp_path / "home" / "data" / "cifar10"
    started = time.monotonic()
    with pytest.raises(UserError) as err:
        load_cifar(None)
    assert time.monotonic() - started < 10
    text = str(err.value)
    assert f"CIFAR-10 is not at {default_root}, and downloading it failed: http://127.0.0.1:9/" in text
    assert str(default_root / "cifar-10-python.tar.gz") in text
    assert str(default_root / "cifar-10-batches-py") in text
    assert not default_root.exists()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A tiny archive served over HTTP on loopback: ``(url, md5)``."""
    archive = write_archive(tmp_path / "served" / "cifar-10-python.tar.gz")
    handler = functools.partial(QuietHandler, directory=str(archive.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        md5 = hashlib.md5(archive.read_bytes(), usedforsecurity=False).hexdigest()
        yield f"http://127.0.0.1:{server.server_address[1]}/{archive.name}", md5
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_cifar_downloads_verifies_and_reuses_the_archive(tmp_path: Path, served: tuple[str, str],
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    url, md5 = served
    monkeypatch.setenv("MLK_CIFAR10_URL", url)
    monkeypatch.setattr(cifar10, "MD5", md5)
    root = tmp_path / "cifar"
    check_splits(load_cifar(root))
    assert (root / "cifar-10-python.tar.gz").is_file()
    err = capsys.readouterr().err
    assert f"downloading {url}" in err and "(100%)" in err
    monkeypatch.setenv("MLK_CIFAR10_URL", "http://127.0.0.1:9/gone")  # the second load reads the file
    check_splits(load_cifar(root))
    assert "downloading" not in capsys.readouterr().err


def test_cifar_download_with_a_wrong_checksum_is_discarded(tmp_path: Path, served: tuple[str, str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = served
    monkeypatch.setenv("MLK_CIFAR10_URL", url)
    root = tmp_path / "cifar"
    with pytest.raises(UserError, match=f"md5 is [0-9a-f]{{32}}, not the official {cifar10.MD5}"):
        load_cifar(root)
    assert list(root.iterdir()) == []
