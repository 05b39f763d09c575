"""The edged command line: run, check-config, status, intervals, replay, demo."""
