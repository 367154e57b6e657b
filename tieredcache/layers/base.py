"""The protocols every layer implements.

A *storage* layer can be read and filled (memory, Redis). An *invalidation*
layer can only be told to drop keys and tags (a CDN): it has no ``get``. The
cache talks to both through the same ``delete``/``delete_tags`` calls, so an
invalidation reaches every layer.

Fills carry a *lease*: an opaque token a storage layer hands out with a miss
(``get_with_lease``). ``set(..., lease=token)`` is refused when the key or one
of the given tags was invalidated after the token was taken, so a slow loader
can never write back a value an invalidation already replaced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from ..entry import Entry
from ..keys import CacheKey, Tag

__all__ = ["InvalidationLayer", "StorageLayer"]


@runtime_checkable
class InvalidationLayer(Protocol):
    """A layer that can only forget: keys and tags are dropped, nothing is read."""

    name: str

    def delete(self, keys: Sequence[CacheKey]) -> None: ...

    def delete_tags(self, tags: Sequence[Tag]) -> None: ...

    async def adelete(self, keys: Sequence[CacheKey]) -> None: ...

    async def adelete_tags(self, tags: Sequence[Tag]) -> None: ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class StorageLayer(InvalidationLayer, Protocol):
    """A layer that stores entries.

    ``stores_objects`` is True when entries are kept as Python objects (the
    in-process layer) and False when they are bytes made by the cache's codec
    (shared layers); ``get`` returns an :class:`Entry` or bytes accordingly.
    """

    stores_objects: bool

    def get(self, key: CacheKey) -> Any | None: ...

    def get_many(self, keys: Sequence[CacheKey]) -> list[Any | None]: ...

    def get_with_lease(self, key: CacheKey, tags: Sequence[Tag]) -> tuple[Any | None, Any]: ...

    def lease(self, key: CacheKey, tags: Sequence[Tag]) -> Any: ...

    def set(
        self,
        key: CacheKey,
        value: Any,
        entry: Entry,
        tags: Sequence[Tag] = (),
        lease: Any = None,
        bump: bool = False,
    ) -> bool: ...

    async def aget(self, key: CacheKey) -> Any | None: ...

    async def aget_many(self, keys: Sequence[CacheKey]) -> list[Any | None]: ...

    async def aget_with_lease(
        self, key: CacheKey, tags: Sequence[Tag]
    ) -> tuple[Any | None, Any]: ...

    async def alease(self, key: CacheKey, tags: Sequence[Tag]) -> Any: ...

    async def aset(
        self,
        key: CacheKey,
        value: Any,
        entry: Entry,
        tags: Sequence[Tag] = (),
        lease: Any = None,
        bump: bool = False,
    ) -> bool: ...
