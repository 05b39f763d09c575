"""Reference time: the NTP-disciplined time base and the time flags of records (pure)."""
