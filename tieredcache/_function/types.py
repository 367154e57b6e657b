"""The ``@cache.cached`` decorator and the types it returns.

``cache.cached(...)`` gives a :class:`CacheDecorator`; applied to a function it
builds a :class:`~tieredcache._function.impl.CachedImpl` and returns its wrapper
(see ``_async/wrapper.py``), typed as :class:`CachedFunction` or
:class:`AsyncCachedFunction`; on a method, a :class:`CachedMethod` descriptor.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, overload

from .._engine.result import InvalidationResult
from .._engine.stack import LayerStack
from ..keys import CacheKey
from ._async.wrapper import wrap as async_wrap
from ._sync.wrapper import wrap as sync_wrap
from .impl import CachedImpl, cached_impl

if TYPE_CHECKING:
    from ..policy import Policy

__all__ = ["AsyncCachedFunction", "CacheDecorator", "CachedFunction", "CachedImpl", "cached_impl"]

P = ParamSpec("P")
Q = ParamSpec("Q")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class CachedFunction(Protocol[P, R_co]):
    """A cached sync function: call it like the original.

    >>> get_product(42)                 # doctest: +SKIP
    >>> get_product.invalidate(42)      # drop the entry everywhere  # doctest: +SKIP
    >>> get_product.refresh(42)         # reload and store now       # doctest: +SKIP
    """

    name: str
    policy: Policy

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def key(self, *args: P.args, **kwargs: P.kwargs) -> CacheKey: ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> InvalidationResult: ...

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def put(self, value: Any, /, *args: P.args, **kwargs: P.kwargs) -> None: ...

    def writer(
        self, key_args: Callable[..., tuple[Any, ...]] | None = None
    ) -> Callable[[Callable[Q, Any]], Callable[Q, Any]]: ...


class AsyncCachedFunction(Protocol[P, R_co]):
    """A cached async function: await it like the original; ``invalidate`` and
    ``refresh`` are awaitable too."""

    name: str
    policy: Policy

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R_co]: ...

    def key(self, *args: P.args, **kwargs: P.kwargs) -> CacheKey: ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[InvalidationResult]: ...

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R_co]: ...

    def put(self, value: Any, /, *args: P.args, **kwargs: P.kwargs) -> Awaitable[None]: ...

    def writer(
        self, key_args: Callable[..., tuple[Any, ...]] | None = None
    ) -> Callable[[Callable[Q, Awaitable[Any]]], Callable[Q, Awaitable[Any]]]: ...


class CacheDecorator:
    """What ``cache.cached(...)`` returns: apply it to a sync or async function."""

    def __init__(self, stack: LayerStack, policy: Policy, **options: Any) -> None:
        self.stack = stack
        self.policy = policy
        self.options = options

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, func: Callable[P, Coroutine[Any, Any, R]]
    ) -> AsyncCachedFunction[P, R]: ...

    @overload
    def __call__(self, func: Callable[P, R]) -> CachedFunction[P, R]: ...

    def __call__(self, func: Callable[P, Any]) -> Any:
        impl = CachedImpl(self.stack, self.policy, func, **self.options)
        asynchronous = inspect.iscoroutinefunction(func)
        wrapper = async_wrap(impl) if asynchronous else sync_wrap(impl)
        params = list(inspect.signature(func).parameters)
        if params and params[0] in ("self", "cls"):
            return CachedMethod(wrapper)
        return wrapper


class CachedMethod:
    """A cached method: ``obj.method(...)``, ``obj.method.invalidate(...)`` and the
    other helpers all receive ``obj``. ``self`` is left out of keys (as cachetools'
    ``methodkey`` does): give the method a parameter that says what differs."""

    def __init__(self, wrapper: Any) -> None:
        functools.update_wrapper(self, wrapper)
        self.wrapper = wrapper

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self.wrapper
        return BoundCachedMethod(self.wrapper, instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper(*args, **kwargs)


class BoundCachedMethod:
    """``obj.method`` for a cached method: the wrapper and its helpers with ``obj`` bound."""

    __slots__ = ("__self__", "wrapper")

    def __init__(self, wrapper: Any, instance: Any) -> None:
        self.wrapper = wrapper
        self.__self__ = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper(self.__self__, *args, **kwargs)

    def key(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper.key(self.__self__, *args, **kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper.invalidate(self.__self__, *args, **kwargs)

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper.refresh(self.__self__, *args, **kwargs)

    def put(self, value: Any, /, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper.put(value, self.__self__, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapper, name)
