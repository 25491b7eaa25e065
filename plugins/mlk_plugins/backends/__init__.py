"""Builtin backends: local worker processes."""
