"""Runnable examples: ``python -m examples.demo`` (via ``bash scripts/demo.sh``),
``examples.quickstart`` and ``examples.write_back``."""
