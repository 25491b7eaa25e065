"""What every plugin class declares.

A plugin is a class registered under a unique NAME in one entry-point group ``mlk.<group>``.
Importing its module must be cheap: the framework it wraps is imported inside its methods, on
first use. ``requires`` lists those heavy imports so ``mlk plugins list`` can say whether the
plugin is usable without importing them, and ``extra`` is the pip extra that installs them.
"""

from __future__ import annotations

import importlib.util
from typing import ClassVar

from pydantic import BaseModel

from mlk.errors import UserError

#: The distribution that ships the builtin plugins, used in install hints.
DISTRIBUTION = "mlk-kernel"


class Plugin:
    """Base of every plugin class.

    Attributes:
        name: the NAME it is registered under (must equal its entry-point name).
        Config: the pydantic model of its spec section (``extra="forbid"``).
        requires: import names it needs beyond the kernel, checked without importing them.
        extra: the pip extra of its distribution that installs ``requires``.
        preload: modules a backend may import once in a parent process that forks trial workers
            (the framework itself, a dataset's loader), so each worker does not pay the import; only
            modules that are safe to import before a fork (that start no threads at import).
        distribution: filled in by the kernel when loaded: the distribution that declared it.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]] = BaseModel
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None
    preload: ClassVar[tuple[str, ...]] = ()
    distribution: ClassVar[str | None] = None

    @classmethod
    def missing_requirements(cls) -> list[str]:
        """The entries of ``requires`` that cannot be found, without importing any of them."""
        missing = []
        for mod in cls.requires:
            try:
                found = importlib.util.find_spec(mod) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing.append(mod)
        return missing

    @classmethod
    def install_hint(cls) -> str:
        dist = cls.distribution or DISTRIBUTION
        if cls.extra:
            return f'pip install "{dist}[{cls.extra}]"'
        return f"pip install {' '.join(cls.requires)}"

    @classmethod
    def ensure_available(cls) -> None:
        """Raise a :class:`UserError` with an install hint when a requirement is missing."""
        missing = cls.missing_requirements()
        if missing:
            raise UserError(
                f"plugin '{cls.name}' needs {', '.join(missing)}, which is not installed",
                hint=f"install it with: {cls.install_hint()}",
            )
