"""edged: edge data acquisition for billing-grade electricity interval data."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edged")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
