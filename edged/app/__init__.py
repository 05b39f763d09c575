"""The daemon: composition root, pollers, housekeeping, replay."""
