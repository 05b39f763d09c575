"""The pure core: interval engine, time base, demand, payloads. No I/O; time is an argument."""
