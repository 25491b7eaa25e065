"""Model plugins (``mlk.models``): named architectures built for the framework that asks."""
