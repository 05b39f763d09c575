"""The I/O shell: Modbus, the SQLite store, MQTT, NTP, systemd notification."""
