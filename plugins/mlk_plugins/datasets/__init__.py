"""Dataset plugins (``mlk.datasets``): small reference datasets split train/val/test."""
