"""Framework benchmarks: epoch time through mlk against each framework's own idiomatic loop."""
