"""Development tools that are not installed with edged (doc generation)."""
