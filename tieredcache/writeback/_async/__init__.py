"""I/O of the library's own features, written once as async; ``scripts/unasync.py``
generates the sync twin in ``tieredcache/_sync``. Import the public names from
``tieredcache`` (or ``tieredcache.writeback``), not from here."""
