"""Benchmarks of the mlk kernel against its peers (issue 2); run ``python -m benchmarks.kernel.run``."""
