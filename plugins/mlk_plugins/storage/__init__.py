"""Builtin storage: local folders."""
