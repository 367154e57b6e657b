"""Per-route HTTP caching rules: :class:`CacheRoute` and the :class:`CacheRoutes` table.

A route is matched against the request path *before* the app runs, with
Starlette's own path compiler (``{id}``, ``{id:int}``, ``{rest:path}``), so the
path the cache keys on is the path the router dispatches on. A path no route
matches costs one regex scan and no cache call.

Example::

    routes = CacheRoutes()

    @routes.cache("/products/{id:int}", ttl=60, tags=["product:{id}"], query=["lang"])
    async def product(request): ...

    app.add_middleware(TieredCacheMiddleware, cache=cache, routes=routes)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, quote, urlencode

from starlette.routing import compile_path

from ..errors import ConfigurationError
from ..keys import validate_tag_name
from ..tags import TagTemplate
from ._http import UNKEYED_INPUTS, accept_encoding_bucket, request_cookies

__all__ = ["CacheRoute", "CacheRoutes", "RouteMatch"]

_F = TypeVar("_F", bound=Callable[..., Any])
_SEGMENT_RE = re.compile(r"/([A-Za-z0-9._-]+)")
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


@dataclass(frozen=True, eq=False)
class CacheRoute:
    """How responses of one path template are cached.

    - ``path``: a Starlette path template (``/products/{id:int}``).
    - ``ttl``: seconds an entry is fresh; ``browser_ttl`` / ``cdn_ttl`` default to it.
    - ``tags``: tag templates rendered from the path parameters (the same
      :class:`~tieredcache.tags.TagTemplate` as ``cached(tags=...)`` and the CDC rules).
    - ``query``: the keyed query parameters; all others are stripped from the
      request before the app sees it (so they cannot change the page).
    - ``vary``: request headers the page depends on; each is keyed and sent in
      ``Vary``. Naming a poisoning-prone header (``X-Forwarded-Host``...) here
      keys it instead of stripping it.
    - ``cookies``: cookies the page depends on that identify no one (``lang``,
      ``currency``); each is keyed. Any *other* cookie may be a session, so a
      request carrying one is treated as one with ``Authorization`` (see ``scope``).
    - ``scope``: who may share an entry when the request has credentials
      (``Authorization``, or a cookie not named in ``cookies``): ``"shared"``
      (never stored: the request bypasses the cache), ``"tenant"`` (every user of
      the tenant) or ``"user"`` (keyed on the credentials too).
    - ``revalidate``: honour a request's ``Cache-Control: no-cache`` (coalesced,
      and at most once per ``revalidate_interval`` seconds per entry); off by
      default, since otherwise any client can bypass the cache at will.
    - ``stale_while_revalidate`` / ``stale_if_error``: seconds past ``ttl`` a stale
      page is served while one refresh runs / while the app fails (5xx).
    - ``table``: the tenant-less surrogate key; defaults to the first path segment.
    - ``max_body``: larger (or streamed) responses pass through unstored.
    """

    path: str
    ttl: float
    tags: Sequence[str | TagTemplate] = ()
    query: Sequence[str] = ()
    vary: Sequence[str] = ()
    cookies: Sequence[str] = ()
    scope: Literal["shared", "tenant", "user"] = "shared"
    revalidate: bool = False
    revalidate_interval: float = 1.0
    browser_ttl: float | None = None
    cdn_ttl: float | None = None
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    table: str | None = None
    max_body: int = 1 << 20
    regex: re.Pattern[str] = field(init=False, repr=False)
    convertors: Mapping[str, Any] = field(init=False, repr=False)
    templates: tuple[TagTemplate, ...] = field(init=False, repr=False)
    keyed_query: frozenset[str] = field(init=False, repr=False)
    vary_raw: tuple[bytes, ...] = field(init=False, repr=False)
    cookies_raw: frozenset[bytes] = field(init=False, repr=False)
    kept_inputs: frozenset[bytes] = field(init=False, repr=False)
    table_name: str | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ConfigurationError(f"CacheRoute path {self.path!r} must start with '/'")
        if self.ttl <= 0:
            raise ConfigurationError(f"CacheRoute {self.path!r}: ttl must be positive")
        if self.scope not in ("shared", "tenant", "user"):
            raise ConfigurationError(
                f"CacheRoute {self.path!r}: scope must be 'shared', 'tenant' or 'user'"
            )
        regex, _, convertors = compile_path(self.path)
        templates = tuple(t if isinstance(t, TagTemplate) else TagTemplate(t) for t in self.tags)
        for template in templates:
            template.check_fields(convertors, where=f"route {self.path!r}")
        vary = tuple(h.lower().encode("latin-1") for h in self.vary)
        table = self.table
        if table is None:
            first = _SEGMENT_RE.match(self.path)
            table = first.group(1) if first else None
        if table is not None:
            validate_tag_name(table)
        set_ = object.__setattr__  # frozen dataclass: derived fields set once here
        set_(self, "regex", regex)
        set_(self, "convertors", convertors)
        set_(self, "templates", templates)
        set_(self, "keyed_query", frozenset(self.query))
        set_(self, "vary_raw", vary)
        set_(self, "cookies_raw", frozenset(c.encode("latin-1") for c in self.cookies))
        set_(self, "kept_inputs", frozenset(vary) & UNKEYED_INPUTS)
        set_(self, "table_name", table)

    @property
    def name(self) -> str:
        """The function name the cache files this route's metrics under."""
        return f"http {self.path}"

    @property
    def policy(self) -> dict[str, float]:
        """The cache Policy fields this route fills with (``negative_ttl=0``: a
        response that must not be stored comes back as None and stays unstored)."""
        stale = max(self.stale_while_revalidate, self.stale_if_error)
        return {
            "stale_while_revalidate": self.stale_while_revalidate,
            "stale_ttl": stale,
            "negative_ttl": 0.0,
        }

    def normalise_query(self, query_string: bytes) -> bytes:
        """Only the keyed parameters, sorted by name (values of one name keep their order)."""
        if not query_string:
            return b""
        pairs = [
            (k, v)
            for k, v in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
            if k in self.keyed_query
        ]
        pairs.sort(key=lambda kv: kv[0])
        return urlencode(pairs).encode("latin-1")

    def key_body(self, path: str, query: bytes, headers: Sequence[tuple[bytes, bytes]],
                 user: bytes | None) -> str:  # fmt: skip
        """The cache key body: path as routed, keyed query, varied headers, keyed
        cookies, user digest.

        The path is percent-encoded (``%``, ``|`` and ``?`` included), so the parts
        cannot run into each other; a long key is digested.
        """
        body = "http:" + quote(path, safe=_PATH_SAFE)
        if query:
            body += "?" + query.decode("latin-1")
        if self.vary_raw or self.cookies_raw or user is not None:
            digest = hashlib.blake2b(digest_size=12)
            for name in self.vary_raw:
                values = [v for k, v in headers if k == name]
                if name == b"accept-encoding":
                    values = [accept_encoding_bucket(b",".join(values)).encode()]
                digest.update(name + b"\0" + b"\0".join(values) + b"\1")
            if self.cookies_raw:
                jar = sorted((k, v) for k, v in request_cookies(headers) if k in self.cookies_raw)
                digest.update(b"cookie\0" + b"\0".join(k + b"=" + v for k, v in jar) + b"\1")
            if user is not None:
                digest.update(b"user\0" + user)
            body += "|" + digest.hexdigest()
        if len(body) > 400:
            body = "http:#" + hashlib.blake2b(body.encode(), digest_size=20).hexdigest()
        return body

    def tag_names(self, params: Mapping[str, Any], path: str) -> list[str]:
        """The route's rendered tags plus the URL tag (what an unsafe method drops)."""
        names = [t.render(params) for t in self.templates]
        names.append(url_tag(path))
        return names


def url_tag(path: str) -> str:
    """The tag every entry of one URL path carries (all its query and Vary variants)."""
    quoted = quote(path, safe=_PATH_SAFE).encode()
    return "url/" + hashlib.blake2b(quoted, digest_size=12).hexdigest()


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: CacheRoute
    params: dict[str, Any]


class CacheRoutes:
    """An ordered table of :class:`CacheRoute`; the first match wins.

    >>> routes = CacheRoutes()
    >>> @routes.cache("/products/{id:int}", ttl=60, tags=["product:{id}"])
    ... async def product(request): ...
    >>> routes.match("/products/7").params
    {'id': 7}
    >>> routes.match("/checkout") is None
    True
    """

    def __init__(self, routes: Iterable[CacheRoute] = ()) -> None:
        self.routes: list[CacheRoute] = list(routes)

    def add(self, route: CacheRoute) -> CacheRoute:
        self.routes.append(route)
        return route

    def cache(self, path: str, *, ttl: float, **options: Any) -> Callable[[_F], _F]:
        """Decorator: declare the endpoint's caching next to it; returns it unchanged."""
        route = self.add(CacheRoute(path, ttl, **options))

        def register(endpoint: _F) -> _F:
            endpoint.__tieredcache_route__ = route  # type: ignore[attr-defined]
            return endpoint

        return register

    def match(self, path: str) -> RouteMatch | None:
        for route in self.routes:
            found = route.regex.match(path)
            if found is not None:
                params = {
                    name: route.convertors[name].convert(value)
                    for name, value in found.groupdict().items()
                }
                return RouteMatch(route, params)
        return None
