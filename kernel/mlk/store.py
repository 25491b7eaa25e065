"""The run store: one SQLite database (WAL) under ``MLK_HOME`` (default ``./.mlk``).

It holds runs, their graph nodes, trials, per-epoch metrics, checkpoints, artifacts and events,
and the model registry's tables (``model_*``, used by :mod:`mlk.deployments`). Every table is
created with ``IF NOT EXISTS``, in one transaction, so opening an older store adds the tables it
lacks and a reader never sees half a schema; the database's ``user_version`` holds a checksum of the
schema, so opening an up-to-date store (every trial request does) writes nothing.
Trial processes write their own metrics and checkpoints, so every connection sets a generous
busy timeout and every write is one short transaction. Files (checkpoints, artifacts) live in
the storage plugin's place; the store records their URIs and checksums.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlk.errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    spec_name TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    status TEXT NOT NULL,
    pid INTEGER,
    host TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    finished REAL,
    provenance_json TEXT,
    summary_json TEXT,
    error TEXT,
    reproduces TEXT
);
CREATE TABLE IF NOT EXISTS nodes (
    run_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    state_json TEXT,
    outputs_json TEXT,
    reused_from TEXT,
    started REAL,
    finished REAL,
    error TEXT,
    PRIMARY KEY (run_id, node_id)
);
CREATE INDEX IF NOT EXISTS nodes_by_key ON nodes (key, status);
CREATE TABLE IF NOT EXISTS trials (
    run_id TEXT NOT NULL,
    trial_id INTEGER NOT NULL,
    hparams_json TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL,
    resource INTEGER NOT NULL DEFAULT 0,
    target INTEGER NOT NULL DEFAULT 0,
    parent INTEGER,
    value REAL,
    metrics_json TEXT,
    restarts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (run_id, trial_id)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL,
    trial_id INTEGER NOT NULL,
    resource INTEGER NOT NULL,
    metrics_json TEXT NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (run_id, trial_id, resource)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL,
    trial_id INTEGER NOT NULL,
    resource INTEGER NOT NULL,
    uri TEXT NOT NULL,
    manifest_json TEXT NOT NULL,
    value REAL,
    created REAL NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, trial_id, resource)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    payload_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS model_versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    target TEXT NOT NULL,
    bundle TEXT NOT NULL,
    format TEXT NOT NULL,
    created REAL NOT NULL,
    meta_json TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS model_routing (
    name TEXT PRIMARY KEY,
    production INTEGER,
    canary INTEGER,
    canary_percent REAL NOT NULL DEFAULT 0,
    auto_rollback_json TEXT NOT NULL DEFAULT '{}',
    stack_json TEXT NOT NULL DEFAULT '[]',
    changed REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS model_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    time REAL NOT NULL,
    action TEXT NOT NULL,
    version INTEGER,
    previous INTEGER,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS model_monitor (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    time REAL NOT NULL,
    scores_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS model_monitor_by_name ON model_monitor (name, id);
"""

#: Changes whenever SCHEMA does; stored as the database's ``user_version``.
SCHEMA_VERSION = zlib.crc32(SCHEMA.encode()) & 0x7FFFFFFF


def mlk_home() -> Path:
    """``MLK_HOME``, or ``./.mlk`` of the working directory."""
    return Path(os.environ.get("MLK_HOME") or ".mlk").resolve()


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None


class RunStore:
    """A connection to the run store. Cheap to open; open one per process."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = (home or mlk_home()).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.path = self.home / "mlk.db"
        self.db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA busy_timeout = 60000")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")
        # The schema's checksum is the database's user_version: an up-to-date store is one read away,
        # and a new or older one gets all its tables in one transaction (a reader sees none or all).
        if self.db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            self.db.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}PRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken eagerly so concurrent writers queue instead of deadlocking."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- runs ---------------------------------------------------------------------------------

    def create_run(self, run_id: str, spec_name: str, spec_hash: str, spec: dict[str, Any],
                   reproduces: str | None = None) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO runs (id, spec_name, spec_hash, spec_json, status, pid, host, created, updated,"
                " reproduces) VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                (run_id, spec_name, spec_hash, json.dumps(spec), os.getpid(), os.uname().nodename, now, now,
                 reproduces),
            )

    def update_run(self, run_id: str, **fields: Any) -> None:
        cols = []
        vals = []
        for k, v in fields.items():
            if k.endswith("_json"):
                v = json.dumps(v)
            cols.append(f"{k} = ?")
            vals.append(v)
        cols.append("updated = ?")
        vals.append(time.time())
        with self.transaction() as db:
            db.execute(f"UPDATE runs SET {', '.join(cols)} WHERE id = ?", (*vals, run_id))

    def run(self, run_id: str) -> dict[str, Any]:
        """A run by id or unique id prefix; a :class:`UserError` otherwise."""
        rows = self.db.execute("SELECT * FROM runs WHERE id = ? OR id LIKE ? ORDER BY created",
                               (run_id, run_id + "%")).fetchall()
        exact = [r for r in rows if r["id"] == run_id]
        if exact:
            rows = exact
        if not rows:
            known = [r["id"] for r in self.db.execute("SELECT id FROM runs ORDER BY created DESC LIMIT 50")]
            raise UserError(f"no run '{run_id}' in {self.path}", choices=known, got=run_id)
        if len(rows) > 1:
            raise UserError(f"'{run_id}' matches several runs: {', '.join(r['id'] for r in rows)}")
        return self._run_row(rows[0])

    def _run_row(self, row: sqlite3.Row) -> dict[str, Any]:
        d = dict(row)
        for k in ("spec_json", "provenance_json", "summary_json"):
            d[k.removesuffix("_json")] = _loads(d.pop(k))
        return d

    def runs(self) -> list[dict[str, Any]]:
        return [self._run_row(r) for r in self.db.execute("SELECT * FROM runs ORDER BY created")]

    def resumable_run(self, spec_hash: str) -> dict[str, Any] | None:
        """The latest run of this exact spec that was interrupted (Ctrl-C, or killed: still 'running'
        with its driver gone). A run that failed is not resumed by itself: its cause needs a fix
        first, and `mlk runs resume RUN` resumes it on purpose."""
        rows = self.db.execute(
            "SELECT * FROM runs WHERE spec_hash = ? AND status IN ('running', 'interrupted')"
            " AND reproduces IS NULL ORDER BY created DESC", (spec_hash,)).fetchall()
        for row in rows:
            if row["status"] == "running" and row["host"] == os.uname().nodename and pid_alive(row["pid"]):
                continue
            return self._run_row(row)
        return None

    def latest_run_of(self, spec_name: str) -> dict[str, Any] | None:
        """The newest run of ``spec_name`` that is not a reproduction."""
        row = self.db.execute("SELECT * FROM runs WHERE spec_name = ? AND reproduces IS NULL ORDER BY created DESC"
                              " LIMIT 1", (spec_name,)).fetchone()
        return self._run_row(row) if row else None

    # -- nodes ----------------------------------------------------------------------------------

    def node(self, run_id: str, node_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM nodes WHERE run_id = ? AND node_id = ?", (run_id, node_id)).fetchone()
        if row is None:
            return None
        d = dict(row)
        d["state"] = _loads(d.pop("state_json"))
        d["outputs"] = _loads(d.pop("outputs_json"))
        return d

    def nodes(self, run_id: str) -> list[dict[str, Any]]:
        ids = [r["node_id"] for r in self.db.execute("SELECT node_id FROM nodes WHERE run_id = ? ORDER BY started",
                                                       (run_id,))]
        return [n for n in (self.node(run_id, i) for i in ids) if n is not None]

    def completed_node(self, key: str) -> dict[str, Any] | None:
        """The most recent completed node with this key, from any run."""
        row = self.db.execute("SELECT run_id, node_id FROM nodes WHERE key = ? AND status = 'done'"
                              " ORDER BY finished DESC LIMIT 1", (key,)).fetchone()
        return self.node(row["run_id"], row["node_id"]) if row else None

    def last_volatile_output(self, kind: str, planned_key: str) -> dict[str, Any] | None:
        """Outputs of the latest completed volatile node of ``kind`` planned with ``planned_key``."""
        for row in self.db.execute("SELECT outputs_json FROM nodes WHERE kind = ? AND status = 'done'"
                                   " ORDER BY finished DESC LIMIT 50", (kind,)):
            outputs = _loads(row["outputs_json"])
            if isinstance(outputs, dict) and outputs.get("planned_key") == planned_key:
                return outputs
        return None

    def start_node(self, run_id: str, node_id: str, key: str, kind: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO nodes (run_id, node_id, key, kind, status, started) VALUES (?, ?, ?, ?, 'running', ?)"
                " ON CONFLICT (run_id, node_id) DO UPDATE SET status = 'running', key = excluded.key, error = NULL",
                (run_id, node_id, key, kind, time.time()),
            )

    def save_node_state(self, run_id: str, node_id: str, state: Any) -> None:
        with self.transaction() as db:
            db.execute("UPDATE nodes SET state_json = ? WHERE run_id = ? AND node_id = ?",
                       (json.dumps(state), run_id, node_id))

    def finish_node(self, run_id: str, node_id: str, outputs: Any, reused_from: str | None = None,
                    key: str | None = None, kind: str | None = None) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO nodes (run_id, node_id, key, kind, status, outputs_json, reused_from, started, finished)"
                " VALUES (?, ?, ?, ?, 'done', ?, ?, ?, ?) ON CONFLICT (run_id, node_id) DO UPDATE SET"
                " status = 'done', key = excluded.key, outputs_json = excluded.outputs_json,"
                " reused_from = excluded.reused_from, finished = excluded.finished",
                (run_id, node_id, key or "", kind or "", json.dumps(outputs), reused_from, now, now),
            )

    def fail_node(self, run_id: str, node_id: str, error: str, status: str = "failed", outputs: Any = None,
                  key: str = "", kind: str = "") -> None:
        """Record that a node did not complete: ``failed``, ``unavailable`` here, or ``skipped``."""
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO nodes (run_id, node_id, key, kind, status, error, outputs_json, started, finished)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, node_id) DO UPDATE SET"
                " status = excluded.status, error = excluded.error, outputs_json = excluded.outputs_json,"
                " finished = excluded.finished",
                (run_id, node_id, key, kind, status, error, json.dumps(outputs) if outputs is not None else None,
                 now, now))

    # -- trials ---------------------------------------------------------------------------------

    def upsert_trial(self, run_id: str, trial_id: int, hparams: dict[str, Any], seed: int, status: str,
                     target: int, parent: int | None = None) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO trials (run_id, trial_id, hparams_json, seed, status, target, parent, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, trial_id) DO UPDATE SET"
                " status = excluded.status, target = excluded.target, updated = excluded.updated",
                (run_id, trial_id, json.dumps(hparams), seed, status, target, parent, now, now),
            )

    def update_trial(self, run_id: str, trial_id: int, **fields: Any) -> None:
        cols, vals = [], []
        for k, v in fields.items():
            if k.endswith("_json"):
                v = json.dumps(v)
            cols.append(f"{k} = ?")
            vals.append(v)
        cols.append("updated = ?")
        vals.append(time.time())
        with self.transaction() as db:
            db.execute(f"UPDATE trials SET {', '.join(cols)} WHERE run_id = ? AND trial_id = ?",
                       (*vals, run_id, trial_id))

    def trials(self, run_id: str) -> list[dict[str, Any]]:
        out = []
        for row in self.db.execute("SELECT * FROM trials WHERE run_id = ? ORDER BY trial_id", (run_id,)):
            d = dict(row)
            d["hparams"] = _loads(d.pop("hparams_json"))
            d["metrics"] = _loads(d.pop("metrics_json"))
            out.append(d)
        return out

    def record_metrics(self, run_id: str, trial_id: int, resource: int, metrics: dict[str, Any],
                       value: float | None) -> None:
        """One report of a trial: its metrics at ``resource``, and the trial's progress."""
        now = time.time()
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO metrics (run_id, trial_id, resource, metrics_json, time)"
                       " VALUES (?, ?, ?, ?, ?)", (run_id, trial_id, resource, json.dumps(metrics), now))
            db.execute("UPDATE trials SET resource = ?, metrics_json = ?, value = ?, updated = ?"
                       " WHERE run_id = ? AND trial_id = ?",
                       (resource, json.dumps(metrics), value, now, run_id, trial_id))

    def metrics(self, run_id: str, trial_id: int | None = None) -> list[dict[str, Any]]:
        q = "SELECT * FROM metrics WHERE run_id = ?"
        args: list[Any] = [run_id]
        if trial_id is not None:
            q += " AND trial_id = ?"
            args.append(trial_id)
        rows = self.db.execute(q + " ORDER BY trial_id, resource", args).fetchall()
        return [{"trial_id": r["trial_id"], "resource": r["resource"], "metrics": json.loads(r["metrics_json"])}
                for r in rows]

    # -- checkpoints -----------------------------------------------------------------------------

    def add_checkpoint(self, run_id: str, trial_id: int, resource: int, uri: str, manifest: dict[str, Any],
                       value: float | None) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO checkpoints (run_id, trial_id, resource, uri, manifest_json, value,"
                       " created, deleted) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                       (run_id, trial_id, resource, uri, json.dumps(manifest), value, time.time()))

    def checkpoints(self, run_id: str, trial_id: int | None = None, live: bool = True) -> list[dict[str, Any]]:
        q = "SELECT * FROM checkpoints WHERE run_id = ?"
        args: list[Any] = [run_id]
        if trial_id is not None:
            q += " AND trial_id = ?"
            args.append(trial_id)
        if live:
            q += " AND deleted = 0"
        out = []
        for row in self.db.execute(q + " ORDER BY trial_id, resource", args):
            d = dict(row)
            d["manifest"] = json.loads(d.pop("manifest_json"))
            out.append(d)
        return out

    def mark_checkpoint_deleted(self, run_id: str, trial_id: int, resource: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE checkpoints SET deleted = 1 WHERE run_id = ? AND trial_id = ? AND resource = ?",
                       (run_id, trial_id, resource))

    # -- events ----------------------------------------------------------------------------------

    def add_event(self, run_id: str, kind: str, payload: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO events (run_id, time, kind, payload_json) VALUES (?, ?, ?, ?)",
                       (run_id, time.time(), kind, json.dumps(payload, default=str)))

    def events(self, run_id: str) -> list[dict[str, Any]]:
        return [{"time": r["time"], "kind": r["kind"], "payload": json.loads(r["payload_json"])}
                for r in self.db.execute("SELECT * FROM events WHERE run_id = ? ORDER BY id", (run_id,))]


def pid_alive(pid: int | None) -> bool:
    """Whether process ``pid`` exists on this machine."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
