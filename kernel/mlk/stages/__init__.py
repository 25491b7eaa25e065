"""The kernel's own run graph nodes: prepare data, search, select the best trial."""
