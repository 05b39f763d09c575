"""The interval engine: counter reads in, interval records and events out (pure)."""
