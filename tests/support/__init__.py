"""Shared test helpers: the daemon launcher, config builder, MQTT collector,
simulated meters, notify socket and schema checks. Test modules import from
here, never from one another."""
