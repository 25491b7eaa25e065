"""Compiler plugins (``mlk.compilers``): turn a model artifact of one format into another."""
