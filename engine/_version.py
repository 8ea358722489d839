"""The engine's version: the package's metadata and the instrumentation scope of its spans."""

__version__ = "0.1.0"
