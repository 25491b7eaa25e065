"""Finding plugins: entry points read from package metadata, loaded one at a time on demand.

Every plugin, builtin or third-party, is an entry point in a group ``mlk.<group>`` whose NAME is
unique in its group; the value names its class (or, for ``mlk.hooks``, a module or object of
hook implementations). Discovery reads metadata only; a plugin's module is imported the first
time it is needed, and a failure to import it is reported against that plugin and its
distribution without affecting any other plugin.

``MLK_DISABLE_PLUGIN_AUTOLOAD=1`` keeps only the plugins of the ``mlk-kernel`` distribution.
``MLK_TRACE_PLUGINS=1`` prints every hook call to stderr.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import importlib.metadata as md
import importlib.util
import os
import sys
import traceback
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pluggy

from mlk import hookspecs
from mlk.errors import PluginError, UserError
from mlk.plugin import DISTRIBUTION

#: Plugin groups whose entries are plugin classes, each keyed by NAME.
CLASS_GROUPS = ("frameworks", "searchers", "backends", "storage", "datasets", "models", "compilers", "targets")
#: ``mlk.hooks``: modules or objects implementing hooks; ``mlk.specs``: packages holding spec files.
GROUPS = (*CLASS_GROUPS, "hooks", "specs")

_BASES = {
    "frameworks": "mlk.framework:Framework",
    "searchers": "mlk.searcher:Searcher",
    "backends": "mlk.backend:Backend",
    "storage": "mlk.storage:Storage",
    "datasets": "mlk.datasets:Dataset",
    "models": "mlk.models:Model",
    "compilers": "mlk.compiler:Compiler",
    "targets": "mlk.target:Target",
}


@dataclass
class PluginEntry:
    """One entry point: where a plugin is, before it is imported."""

    group: str
    name: str
    value: str
    distribution: str
    version: str
    _loaded: Any = field(default=None, repr=False)
    _error: str | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}"

    @property
    def module(self) -> str:
        return self.value.partition(":")[0].strip()

    def load(self) -> Any:
        """Import the plugin; :class:`PluginError` naming it and its distribution on failure."""
        if self._loaded is not None:
            return self._loaded
        if self._error is not None:
            raise PluginError(self.group, self.name, self.distribution, self._error)
        module_name, _, attr = self.value.partition(":")
        try:
            obj: Any = importlib.import_module(module_name.strip())
            for part in filter(None, attr.strip().split(".")):
                obj = getattr(obj, part)
        except Exception as e:
            self._error = f"cannot import {self.value}: {type(e).__name__}: {e}"
            if os.environ.get("MLK_FULL_ERROR"):
                self._error += "\n" + traceback.format_exc()
            raise PluginError(self.group, self.name, self.distribution, self._error) from e
        if self.group in CLASS_GROUPS:
            self._check_class(obj)
            obj.distribution = self.distribution
        self._loaded = obj
        return obj

    def _check_class(self, obj: Any) -> None:
        module_name, _, base_name = _BASES[self.group].partition(":")
        base = getattr(importlib.import_module(module_name), base_name)
        if not (isinstance(obj, type) and issubclass(obj, base)):
            self._error = f"{self.value} is not a subclass of {_BASES[self.group].replace(':', '.')}"
            raise PluginError(self.group, self.name, self.distribution, self._error)
        declared = getattr(obj, "name", None)
        if declared != self.name:
            self._error = f"{self.value} declares name '{declared}' but is registered as '{self.name}'"
            raise PluginError(self.group, self.name, self.distribution, self._error)

    def content_hash(self) -> str:
        """sha256 of the plugin's source: its module file, or every .py file of its package."""
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin or not os.path.exists(spec.origin):
            return "unknown"
        origin = Path(spec.origin)
        files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
        h = hashlib.sha256()
        for f in files:
            h.update(f.relative_to(origin.parent).as_posix().encode())
            h.update(f.read_bytes())
        return h.hexdigest()

    def status(self) -> tuple[str, str]:
        """``("ok", "")``, ``("unavailable", reason + install hint)`` or ``("broken", error)``.

        Imports the plugin's own module (cheap by contract), never the framework it wraps.
        """
        try:
            obj = self.load()
        except PluginError as e:
            return "broken", e.detail
        if self.group in CLASS_GROUPS:
            missing = obj.missing_requirements()
            if missing:
                return "unavailable", f"needs {', '.join(missing)}; {obj.install_hint()}"
        return "ok", ""


def _discover() -> tuple[dict[str, dict[str, PluginEntry]], list[str], list[PluginEntry]]:
    autoload = not os.environ.get("MLK_DISABLE_PLUGIN_AUTOLOAD")
    groups: dict[str, dict[str, PluginEntry]] = {g: {} for g in GROUPS}
    problems: list[str] = []
    dupes: list[PluginEntry] = []
    seen: set[tuple[str, str, str]] = set()
    for dist in md.distributions():
        dist_name = dist.metadata["Name"] or "?"
        if not autoload and dist_name != DISTRIBUTION:
            continue
        for ep in dist.entry_points:
            if not ep.group.startswith("mlk."):
                continue
            group = ep.group[4:]
            if group not in groups:
                problems.append(f"{dist_name} declares entry points in unknown group '{ep.group}'")
                continue
            ident = (group, ep.name, ep.value)
            if ident in seen:  # the same distribution found twice on sys.path
                continue
            seen.add(ident)
            entry = PluginEntry(group, ep.name, ep.value, dist_name, dist.version)
            other = groups[group].get(ep.name)
            if other is not None:
                message = (f"duplicate plugin name '{ep.name}' in group mlk.{group}: {other.value} "
                           f"(distribution {other.distribution}) and {ep.value} (distribution {dist_name}); "
                           "uninstall one of them")
                problems.append(message)
                other._error = entry._error = message
                dupes.append(entry)
                continue
            groups[group][ep.name] = entry
    return groups, problems, dupes


class Registry:
    """The plugins installed in this environment and the hook manager."""

    def __init__(self) -> None:
        self.groups, self.problems, self.duplicates = _discover()
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.allow: list[str] | None = None
        self._hooks_loaded = False
        if os.environ.get("MLK_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(lambda msg: sys.stderr.write(f"[mlk-trace] {msg}"))
            self.pm.enable_tracing()

    # -- lookup ---------------------------------------------------------------------------------

    def entries(self, group: str | None = None) -> list[PluginEntry]:
        groups = [group] if group else list(GROUPS)
        return [e for g in groups
                for e in sorted([*self.groups[g].values(), *(d for d in self.duplicates if d.group == g)],
                                key=lambda e: (e.name, e.distribution))]

    def names(self, group: str) -> list[str]:
        return sorted(n for n, e in self.groups[group].items() if self.allowed(e))

    def allowed(self, entry: PluginEntry) -> bool:
        if self.allow is None or (entry.distribution == DISTRIBUTION and entry.group in ("hooks", "specs")):
            return True
        return any(fnmatch.fnmatch(entry.key, pattern) for pattern in self.allow)

    def entry(self, group: str, name: str, where: str) -> PluginEntry:
        entry = self.groups[group].get(name)
        if entry is None:
            raise UserError(f"unknown {group[:-1] if group.endswith('s') else group} '{name}'", where=where,
                            choices=self.names(group), got=name,
                            hint=f"installed plugins of mlk.{group} are listed by `mlk plugins list`")
        if not self.allowed(entry):
            raise UserError(f"plugin {entry.key} is not allowed by plugins.allow ({', '.join(self.allow or [])})",
                            where=where)
        return entry

    def get(self, group: str, name: str, where: str) -> Any:
        """The plugin class registered as ``name`` in ``group``; ``where`` is the spec key path."""
        return self.entry(group, name, where).load()

    # -- hooks ----------------------------------------------------------------------------------

    @property
    def hooks(self) -> Any:
        """The hook caller (``registry.hooks.mlk_run_started(...)``), with ``mlk.hooks`` plugins loaded."""
        if not self._hooks_loaded:
            self._hooks_loaded = True
            for entry in self.entries("hooks"):
                if not self.allowed(entry):
                    continue
                try:
                    self.pm.register(entry.load(), name=entry.key)
                except PluginError as e:  # a broken tracker must not stop the work it watches
                    if entry.distribution == DISTRIBUTION:
                        raise
                    sys.stderr.write(f"mlk: warning: {e}; its hooks are not called\n")
        return self.pm.hook

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a hook implementation at run time (tests, notebooks)."""
        self.pm.register(plugin, name=name)

    # -- specs ----------------------------------------------------------------------------------

    def spec_dirs(self) -> list[Path]:
        """Folders of spec files contributed through ``mlk.specs`` (each value a package)."""
        out: list[Path] = []
        for entry in self.entries("specs"):
            if not self.allowed(entry):
                continue
            try:
                spec = importlib.util.find_spec(entry.module)
            except (ImportError, ValueError):
                spec = None
            if spec is None or not spec.submodule_search_locations:
                self.problems.append(f"{entry.key} ({entry.distribution}): '{entry.module}' is not a package")
                continue
            out.extend(Path(p) for p in spec.submodule_search_locations)
        return out


@lru_cache(maxsize=1)
def registry() -> Registry:
    """This process's registry, built on first use (never at import time)."""
    return Registry()


def reset_registry() -> None:
    """Forget the cached registry (tests that install plugins at run time)."""
    registry.cache_clear()
