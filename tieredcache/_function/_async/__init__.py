"""The decorator's wrappers, written once as async; ``scripts/unasync.py`` generates
``../_sync``."""
