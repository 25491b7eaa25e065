"""Importing user-named objects (``_target_``, trial classes) with errors that say where."""

from __future__ import annotations

import importlib
from typing import Any

from mlk.errors import UserError


def import_object(path: str, where: str) -> Any:
    """``package.module:attr`` or ``package.module.attr`` -> the object."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise UserError(f"'{path}' is not an importable name", where=where,
                        hint="write it as 'package.module:name' (or 'package.module.name')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"cannot import module '{module_name}' of '{path}': {e}", where=where) from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            public = [n for n in dir(module) if not n.startswith("_")]
            raise UserError(f"module '{module_name}' has no attribute '{attr}'", where=where,
                            choices=public, got=attr) from None
    return obj
