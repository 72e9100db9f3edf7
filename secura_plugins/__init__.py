"""secura-plugins."""
