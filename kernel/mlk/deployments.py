"""The model registry: named models, their versions, which version serves (production, canary), and
what the servers observed.

Every ``deploy/<id>`` node registers its bundle as a new version of a named model; the bundle's
files are copied to ``MLK_HOME/models/NAME/VERSION`` so a server needs only this folder. Routing is
one row per model (production, canary and its traffic share, auto-rollback thresholds) that a
server polls; promotions and rollbacks are appended to a history with their reason. Servers write
their drift and traffic scores with :meth:`Registry.record_monitor`; ``mlk monitor`` reads them.
The tables live in the run store's SQLite database (:mod:`mlk.store`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlk.errors import UserError
from mlk.store import RunStore

#: Monitor rows kept per model (older ones are dropped as new ones arrive).
MONITOR_KEEP = 5000


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model.

    Attributes:
        bundle: a local folder holding the bundle's files (``MLK_HOME/models/NAME/VERSION``).
        format: the bundle's format (``bundle.server``, ``bundle.jetson``...).
        meta: the bundle's facts, the target's check report, the artifacts it came from and, under
            ``thresholds``, the score thresholds ``mlk monitor`` alerts at.
    """

    name: str
    version: int
    run_id: str
    target: str
    bundle: Path
    format: str
    created: float
    meta: dict[str, Any]


@dataclass(frozen=True)
class Routing:
    """Which versions of a model take traffic: ``production`` takes ``100 - canary_percent`` percent and
    ``canary`` (when set) the rest. ``auto_rollback`` holds the thresholds of
    :class:`mlk.target.AutoRollback` (empty: none)."""

    name: str
    production: ModelVersion | None
    canary: ModelVersion | None
    canary_percent: float
    auto_rollback: dict[str, Any]
    changed: float


class Registry:
    """The model registry of one ``MLK_HOME`` (default: the run store's). Safe to share between threads."""

    def __init__(self, home: Path | None = None) -> None:
        self.store = RunStore(home)
        self.home = self.store.home
        self.db = self.store.db
        self._lock = threading.RLock()

    def close(self) -> None:
        self.store.close()

    # -- versions ----------------------------------------------------------------------------------

    def register(self, name: str, run_id: str, target: str, bundle: Path, fmt: str,
                 meta: dict[str, Any]) -> ModelVersion:
        """Copy the bundle folder to ``MLK_HOME/models/NAME/VERSION`` and record it as the next version."""
        check_model_name(name, "deploy.model")
        folder = self.home / "models" / name
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=folder))
        try:
            shutil.copytree(bundle, staging, dirs_exist_ok=True)
            with self._lock, self.store.transaction() as db:
                other = db.execute("SELECT target FROM model_versions WHERE name = ? AND target != ? LIMIT 1",
                                   (name, target)).fetchone()
                if other is not None:
                    raise UserError(f"model '{name}' holds {other['target']} bundles, not {target} ones; the versions "
                                    "of a model come from one target", where="deploy.model",
                                    hint=f"deploy under another name, e.g. `model: {name}-{target}`")
                row = db.execute("SELECT MAX(version) AS v FROM model_versions WHERE name = ?", (name,)).fetchone()
                version = int(row["v"] or 0) + 1
                dest = folder / str(version)
                if dest.exists():  # left by a registration whose transaction did not commit
                    shutil.rmtree(dest)
                os.replace(staging, dest)
                now = time.time()
                db.execute("INSERT INTO model_versions (name, version, run_id, target, bundle, format, created,"
                           " meta_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (name, version, run_id, target, str(dest), fmt, now, json.dumps(meta, default=str)))
                db.execute("INSERT INTO model_history (name, time, action, version, reason) VALUES (?, ?, ?, ?, ?)",
                           (name, now, "registered", version, f"run {run_id}, target {target}"))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.get(name, version)

    def names(self) -> list[str]:
        with self._lock:
            return [r["name"] for r in self.db.execute("SELECT DISTINCT name FROM model_versions ORDER BY name")]

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of ``name``, oldest first; a :class:`UserError` for an unknown model."""
        with self._lock:
            rows = self.db.execute("SELECT * FROM model_versions WHERE name = ? ORDER BY version", (name,)).fetchall()
        if not rows:
            raise UserError(f"no model '{name}' in the registry ({self.store.path})", choices=self.names(), got=name,
                            hint="`mlk models list` shows the models; `mlk deploy RUN --target T` makes one")
        return [_version(r) for r in rows]

    def get(self, name: str, version: int) -> ModelVersion:
        """Version ``version`` of ``name``; a :class:`UserError` naming the versions there are."""
        with self._lock:
            row = self.db.execute("SELECT * FROM model_versions WHERE name = ? AND version = ?",
                                  (name, int(version))).fetchone()
        if row is None:
            known = [str(v.version) for v in self.versions(name)]
            raise UserError(f"model '{name}' has no version {version}", choices=known, got=str(version))
        return _version(row)

    def by_run(self, run_id: str, target: str | None = None) -> list[ModelVersion]:
        """The versions registered from run ``run_id`` (of ``target``), oldest first."""
        q, args = "SELECT * FROM model_versions WHERE run_id = ?", [run_id]
        if target is not None:
            q += " AND target = ?"
            args.append(target)
        with self._lock:
            return [_version(r) for r in self.db.execute(q + " ORDER BY created", args)]

    # -- routing -----------------------------------------------------------------------------------

    def routing(self, name: str) -> Routing:
        """The current routing of ``name`` (cheap: servers poll it)."""
        with self._lock:
            row = self.db.execute("SELECT * FROM model_routing WHERE name = ?", (name,)).fetchone()
            if row is None:
                self.versions(name)  # unknown name -> UserError
                return Routing(name, None, None, 0.0, {}, 0.0)
            production = self._maybe(name, row["production"])
            canary = self._maybe(name, row["canary"])
        return Routing(name, production, canary, float(row["canary_percent"]) if canary else 0.0,
                       json.loads(row["auto_rollback_json"]), float(row["changed"]))

    def promote(self, name: str, version: int, canary_percent: float | None = None,
                auto_rollback: dict[str, Any] | None = None) -> Routing:
        """Make ``version`` production (``canary_percent`` None: all traffic, and any canary is dropped)
        or the canary taking ``canary_percent`` percent beside production. Promoting the current canary
        without a percentage makes it production. ``auto_rollback`` replaces the stored thresholds."""
        target = self.get(name, version)
        if canary_percent is not None and not 0 < canary_percent < 100:
            raise UserError(f"a canary takes between 0 and 100 percent of the traffic, not {canary_percent}",
                            where="--canary")
        with self._lock, self.store.transaction() as db:
            row = db.execute("SELECT * FROM model_routing WHERE name = ?", (name,)).fetchone()
            production = row["production"] if row else None
            canary = row["canary"] if row else None
            percent = float(row["canary_percent"]) if row else 0.0
            stack = json.loads(row["stack_json"]) if row else []
            rollback = json.loads(row["auto_rollback_json"]) if row else {}
            if auto_rollback is not None:
                rollback = auto_rollback
            if canary_percent is None:
                action, previous = "production", production
                if production != target.version:
                    stack.append(target.version)
                production, canary, percent = target.version, None, 0.0
            else:
                if production is None:
                    raise UserError(f"model '{name}' has no production version, so nothing to split traffic with",
                                    where="--canary", hint=f"promote one first: `mlk models promote {name} "
                                                           f"{target.version}`")
                if production == target.version:
                    raise UserError(f"version {target.version} of '{name}' is already production", where="--canary")
                action, previous = "canary", canary
                canary, percent = target.version, float(canary_percent)
            now = time.time()
            db.execute("INSERT INTO model_routing (name, production, canary, canary_percent, auto_rollback_json,"
                       " stack_json, changed) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                       " production = excluded.production, canary = excluded.canary,"
                       " canary_percent = excluded.canary_percent, auto_rollback_json = excluded.auto_rollback_json,"
                       " stack_json = excluded.stack_json, changed = excluded.changed",
                       (name, production, canary, percent, json.dumps(rollback), json.dumps(stack), now))
            reason = f"{canary_percent:g}% of traffic" if canary_percent is not None else ""
            db.execute("INSERT INTO model_history (name, time, action, version, previous, reason)"
                       " VALUES (?, ?, ?, ?, ?, ?)", (name, now, action, target.version, previous, reason))
        return self._changed(name, target.version, action)

    def rollback(self, name: str, reason: str = "") -> Routing:
        """Drop the canary when there is one; otherwise make the previous production version production
        again. A :class:`UserError` when there is nothing to roll back to."""
        self.versions(name)
        with self._lock, self.store.transaction() as db:
            row = db.execute("SELECT * FROM model_routing WHERE name = ?", (name,)).fetchone()
            if row is None or row["production"] is None:
                raise UserError(f"model '{name}' has no production version to roll back",
                                hint=f"`mlk models promote {name} VERSION` makes one")
            stack = json.loads(row["stack_json"])
            now = time.time()
            if row["canary"] is not None:
                db.execute("UPDATE model_routing SET canary = NULL, canary_percent = 0, changed = ? WHERE name = ?",
                           (now, name))
                db.execute("INSERT INTO model_history (name, time, action, version, previous, reason)"
                           " VALUES (?, ?, 'rollback canary', ?, ?, ?)",
                           (name, now, row["production"], row["canary"], reason))
                action, version = "rollback canary", int(row["canary"])
            else:
                if len(stack) < 2:
                    raise UserError(f"model '{name}' has had only one production version ({row['production']}), so "
                                    "there is none to roll back to",
                                    hint=f"promote another version: `mlk models promote {name} VERSION`")
                current = stack.pop()
                db.execute("UPDATE model_routing SET production = ?, stack_json = ?, changed = ? WHERE name = ?",
                           (stack[-1], json.dumps(stack), now, name))
                db.execute("INSERT INTO model_history (name, time, action, version, previous, reason)"
                           " VALUES (?, ?, 'rollback', ?, ?, ?)", (name, now, stack[-1], current, reason))
                action, version = "rollback", int(stack[-1])
        return self._changed(name, version, action)

    def _changed(self, name: str, version: int, action: str) -> Routing:
        """The routing after a committed change, told to the ``mlk_deployment_changed`` hooks."""
        routing = self.routing(name)
        plain = {"production": routing.production.version if routing.production else None,
                 "canary": routing.canary.version if routing.canary else None,
                 "canary_percent": routing.canary_percent}
        from mlk.registry import registry

        try:
            registry().hooks.mlk_deployment_changed(model=name, version=version, action=action, routing=plain)
        except Exception as e:  # the change is committed; a tracker's failure must not look like its failure
            sys.stderr.write(f"mlk: warning: a mlk_deployment_changed hook failed ({type(e).__name__}: {e}); "
                             f"model '{name}' {action} version {version} stands\n")
        return routing

    def history(self, name: str) -> list[dict[str, Any]]:
        """Registrations, promotions and rollbacks of ``name``, oldest first: ``time``, ``action``
        (registered, production, canary, rollback, rollback canary), ``version`` (the version it put in
        place), ``previous`` (the one it replaced) and ``reason``."""
        self.versions(name)
        with self._lock:
            rows = self.db.execute("SELECT time, action, version, previous, reason FROM model_history WHERE name = ?"
                                   " ORDER BY id", (name,)).fetchall()
        return [dict(r) for r in rows]

    # -- monitoring --------------------------------------------------------------------------------

    def record_monitor(self, name: str, version: int, scores: dict[str, float]) -> None:
        """Store what a server observed of ``version`` over its latest window: drift scores
        (``input_psi``, ``input_kl``, ``output_psi``, ``output_kl`` of :mod:`mlk.drift`) and traffic
        (``requests``, ``error_rate``, ``p99_ms``...). ``mlk monitor`` compares each with the threshold
        of the same name in the version's ``meta["thresholds"]``."""
        with self._lock, self.store.transaction() as db:
            db.execute("INSERT INTO model_monitor (name, version, time, scores_json) VALUES (?, ?, ?, ?)",
                       (name, int(version), time.time(), json.dumps({k: float(v) for k, v in scores.items()})))
            db.execute("DELETE FROM model_monitor WHERE name = ? AND id <= (SELECT id FROM model_monitor WHERE"
                       " name = ? ORDER BY id DESC LIMIT 1 OFFSET ?)", (name, name, MONITOR_KEEP))

    def monitor(self, name: str, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` monitor rows of ``name``, newest first: ``version``, ``time``, ``scores``."""
        self.versions(name)
        with self._lock:
            rows = self.db.execute("SELECT version, time, scores_json FROM model_monitor WHERE name = ?"
                                   " ORDER BY id DESC LIMIT ?", (name, int(limit))).fetchall()
        return [{"version": r["version"], "time": r["time"], "scores": json.loads(r["scores_json"])} for r in rows]

    # -- internals ---------------------------------------------------------------------------------

    def _maybe(self, name: str, version: int | None) -> ModelVersion | None:
        if version is None:
            return None
        row = self.db.execute("SELECT * FROM model_versions WHERE name = ? AND version = ?",
                              (name, version)).fetchone()
        return _version(row) if row else None


def _version(row: Any) -> ModelVersion:
    return ModelVersion(row["name"], int(row["version"]), row["run_id"], row["target"], Path(row["bundle"]),
                        row["format"], float(row["created"]), json.loads(row["meta_json"]))


def check_model_name(name: str, where: str) -> None:
    """Model names become folder names and URL path segments: letters, digits, ``_ . -``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name):
        raise UserError(f"model name '{name}' must be letters, digits, '_', '.' or '-' (starting with a letter or "
                        "digit)", where=where)
