"""Plugin locks: pin the exact plugin set a platform team allows.

``mlk plugins lock > plugins.lock`` writes every installed plugin with its distribution,
version and a sha256 of its source. A spec's ``plugins.lock`` (or ``MLK_PLUGINS_LOCK``) makes
the kernel refuse to run when the installed set differs, listing every difference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlk.errors import UserError


def lock_data(reg: Any) -> dict[str, Any]:
    plugins = [
        {"group": e.group, "name": e.name, "value": e.value, "distribution": e.distribution,
         "version": e.version, "sha256": e.content_hash()}
        for e in reg.entries()
    ]
    return {"mlk_plugins_lock": 1, "plugins": plugins}


def enforce_lock(reg: Any, path: Path) -> None:
    """Raise a :class:`UserError` listing every way the installed plugins differ from ``path``."""
    try:
        locked = json.loads(path.read_text())
        wanted = {f"{p['group']}/{p['name']}": p for p in locked["plugins"]}
    except FileNotFoundError:
        raise UserError(f"plugin lock file {path} does not exist", where="plugins.lock",
                        hint="write one with `mlk plugins lock > plugins.lock`") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"plugin lock file {path} is not a lock written by `mlk plugins lock`: {e}",
                        where="plugins.lock") from None
    have = {p["group"] + "/" + p["name"]: p for p in lock_data(reg)["plugins"]}
    diffs = []
    for key in sorted(set(wanted) | set(have)):
        w, h = wanted.get(key), have.get(key)
        if h is None:
            assert w is not None
            diffs.append(f"missing: {key} ({w['distribution']} {w['version']}) is locked but not installed")
        elif w is None:
            diffs.append(f"extra: {key} ({h['distribution']} {h['version']}) is installed but not in the lock")
        else:
            for field in ("distribution", "version", "value", "sha256"):
                if w[field] != h[field]:
                    diffs.append(f"changed: {key} {field} is {h[field]!r}, the lock says {w[field]!r}")
    if diffs:
        raise UserError(f"installed plugins do not match the lock {path}:\n    " + "\n    ".join(diffs),
                        where="plugins.lock",
                        hint="install the locked set, or write a new lock with `mlk plugins lock`")
