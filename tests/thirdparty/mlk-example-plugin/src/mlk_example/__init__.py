"""A third-party mlk plugin package, written against mlk's public contract only."""
