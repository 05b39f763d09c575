"""Instrument-transformer correction and loss compensation (pure; docs/compensation.md)."""
