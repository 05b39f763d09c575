"""Simulators for edged's tests and demos: Modbus meters and an NTP server.

* :mod:`simulators.meter` — :class:`MeterServer` serving :class:`SimulatedMeter`
  units over Modbus TCP, RTU (serial device or pty) and RTU over TCP, with
  per-unit fault injection; ``python -m simulators.meter``.
* :mod:`simulators.scenario` — timed fault/event scripts (YAML or CLI flags).
* :mod:`simulators.ntp` — :class:`NtpServer` with a settable offset;
  ``python -m simulators.ntp``.
* :mod:`simulators.modbus_frames` — the pure framing and encoding underneath.
"""

# Deliberately no re-exports: importing simulators.meter here would make
# `python -m simulators.meter` warn that the module ran after being imported.
