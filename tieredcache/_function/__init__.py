"""The decorator and the wrappers of cached functions (between the facade and the engine).

- ``types.py``: what ``cache.cached(...)`` returns and the public types of its wrappers.
- ``impl.py``: one cached function's keys, requests and explicit operations.
- ``_alias.py``: the hit path's lookup key of a call.
- ``_async/wrapper.py``: the wrapper itself; ``_sync/`` is generated from it.
"""
