"""I/O code written once; ``scripts/unasync.py`` generates the ``_sync`` twin from it."""
