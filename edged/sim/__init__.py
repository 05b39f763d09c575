"""Simulators for edged's tests and demos: Modbus meters and an NTP server.

* :mod:`edged.sim.meter` — :class:`MeterServer` serving :class:`SimulatedMeter`
  units over Modbus TCP, RTU (serial device or pty) and RTU over TCP, with
  per-unit fault injection; ``python -m edged.sim.meter``.
* :mod:`edged.sim.scenario` — timed fault/event scripts (YAML or CLI flags).
* :mod:`edged.sim.ntp` — :class:`NtpServer` with a settable offset;
  ``python -m edged.sim.ntp``.
* :mod:`edged.sim.modbus_frames` — the pure framing and encoding underneath.
"""

# Deliberately no re-exports: importing edged.sim.meter here would make
# `python -m edged.sim.meter` warn that the module ran after being imported.
