"""Exponential retry delay, shared by Modbus reconnects and MQTT reconnects."""

from __future__ import annotations


class Backoff:
    """Exponential reconnect delay: 0.5 s doubling to `max_s`."""

    def __init__(self, first_s: float = 0.5, max_s: float = 30.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.current_s = 0.0

    def failed(self) -> float:
        self.current_s = min(self.max_s, self.current_s * 2 if self.current_s else self.first_s)
        return self.current_s

    def succeeded(self) -> None:
        self.current_s = 0.0
