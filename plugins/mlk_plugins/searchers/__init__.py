"""Builtin searchers: single, grid, random."""
