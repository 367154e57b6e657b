"""Cache layers: one module per backend family.

``base`` holds the protocols; ``memory`` the in-process LRU; ``redis`` the
Redis and Redis Cluster layer, whose I/O lives once in ``_async/`` and is
generated into ``_sync/`` by ``scripts/unasync.py``.
"""
