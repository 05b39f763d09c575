"""Configuration: the settings models (schema) and the YAML loader (load)."""
