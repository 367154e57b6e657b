"""The engine's I/O, written once as async; ``scripts/unasync.py`` generates ``../_sync``."""

from .read import lookup, read, refresh
from .write import invalidate, put, write

__all__ = ["invalidate", "lookup", "put", "read", "refresh", "write"]
