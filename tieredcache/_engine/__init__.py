"""The engine: reads and writes over a layer stack, written once.

- ``stack.py``: the layers with their roles resolved once (:class:`LayerStack`),
  and the guard around each layer.
- ``request.py``: one call's request, and the rules applied to entries.
- ``_async/``: reads and writes as plain async code over N layers;
  ``_sync/`` is generated from it by ``scripts/unasync.py`` (checked in CI).
- ``_backend_async.py`` / ``_backend_sync.py``: the few pieces that differ
  between the two (single-flight, timed loads, fill waits, background work).

Nothing here knows the cache facade; the facade builds the stack and calls in.
"""
