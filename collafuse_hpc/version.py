"""The package version (a module of its own so that modules stamping files import it downwards)."""

__version__ = "0.1.0"
