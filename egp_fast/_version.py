"""The package version (stage 0: imported by the command line and the public API)."""

__version__ = "0.1.0"
