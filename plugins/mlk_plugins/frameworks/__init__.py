"""Framework plugins (``mlk.frameworks``): each owns the training loop of one trial."""
