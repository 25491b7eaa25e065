"""The example plugins pass mlk's conformance suites: one line each."""

from mlk.testing.searcher import SearcherContract
from mlk.testing.storage import StorageContract


class TestSweep(SearcherContract):
    plugin = "sweep"


class TestFlatDir(StorageContract):
    plugin = "flatdir"

    def config(self, tmp_path):
        return {"name": "flatdir", "folder": str(tmp_path / "flat")}
