"""The response side of the middleware: which captured responses may be stored, the
entry a fill stores, and the answers built from an entry (200, 304, HEAD) or from a
response that was not stored.

An entry is ``(status, headers, body, etag, cdn_headers, app_vary)``: everything a
HIT needs, computed once at fill time, so a HIT only adds ``Age``, ``Date``,
``Expires`` and ``X-Cache``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from ..keys import Tag
from ..layers.cdn.surrogate import SurrogateScheme, response_header
from . import _http
from ._capture import Capture
from ._http import RawHeaders, header
from .routes import CacheRoute

__all__ = ["CdnConfig"]

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Entry = tuple[int, RawHeaders, bytes, bytes, RawHeaders, str]

_NO_STORE_CDN = [(b"cdn-cache-control", b"no-store"), (b"surrogate-control", b"no-store")]
_MISS = (b"x-cache", b"MISS")
_OURS = frozenset({b"x-cache"})
_CDN_ONLY = frozenset({b"x-cache", b"surrogate-key", b"xkey", b"cache-tag", b"edge-cache-tag"})
_STATE = {"hit": b"HIT", "stale": b"STALE", "miss": b"MISS"}


@dataclass(frozen=True, slots=True)
class CdnConfig:
    """The CDN in front of the app.

    ``scheme`` names the vendor's surrogate-key header and encoding (``VARNISH``,
    ``FASTLY``, ``CLOUDFLARE``, ``AKAMAI`` from :mod:`tieredcache.layers.cdn`).
    ``keys_tenant``: the CDN's cache key includes the tenant (a host per tenant,
    or a header it keys on), so pages of a tenant resolved from credentials may
    still be shared there; otherwise such pages are ``private`` towards the CDN.

    >>> from tieredcache.layers.cdn import VARNISH
    >>> CdnConfig(VARNISH).keys_tenant
    False
    """

    scheme: SurrogateScheme
    keys_tenant: bool = False


class Responder:
    """Builds entries and answers for one middleware (its CDN, clock and tenant header)."""

    def __init__(
        self,
        namespace: str,
        cdn: CdnConfig | None,
        date: bool,
        timer: Callable[[], float],
        tenant_vary: str | None,
    ) -> None:
        self.namespace = namespace
        self.cdn = cdn
        self.date = date
        self.timer = timer
        self.tenant_vary = tenant_vary
        self._route_headers: dict[tuple[int, bool], tuple[RawHeaders, bytes]] = {}
        # Surrogate keys the app set reach the browser only when a CDN strips them.
        self._strip = _CDN_ONLY if cdn is None else _OURS

    def entry(
        self, route: CacheRoute, tenant: str, key: str, tags: list[str], capture: Capture
    ) -> Entry:
        """The entry a stored response becomes; the ETag is bound to tenant and key."""
        stored = [(k, v) for k, v in capture.headers if k not in _http.NOT_STORED]
        etag = _http.make_etag(self.namespace, tenant, key, capture.status, capture.body)
        cdn: RawHeaders = []
        if self.cdn is not None:
            name, value = response_header(
                self.cdn.scheme,
                [Tag(self.namespace, tenant, t) for t in tags],
                tables=[(self.namespace, route.table_name)] if route.table_name else (),
            )
            cdn.append((name.lower().encode(), value.encode()))
        vary = _http.vary_names(header(capture.headers, b"vary"))
        return (capture.status, stored, capture.body, etag, cdn, ",".join(vary))

    def _cache_headers(self, route: CacheRoute, private: bool) -> tuple[RawHeaders, bytes]:
        """(Cache-Control, CDN-Cache-Control, Surrogate-Control; the Vary base) of a route."""
        cached = self._route_headers.get((id(route), private))
        if cached is not None:
            return cached
        browser_ttl = route.ttl if route.browser_ttl is None else route.browser_ttl
        cdn_ttl = route.ttl if route.cdn_ttl is None else route.cdn_ttl
        extra = ""
        if route.stale_while_revalidate:
            extra += f", stale-while-revalidate={int(route.stale_while_revalidate)}"
        if route.stale_if_error:
            extra += f", stale-if-error={int(route.stale_if_error)}"
        if private:
            headers = [
                (b"cache-control", f"private, max-age={int(browser_ttl)}{extra}".encode()),
                (b"cdn-cache-control", b"private"),
                (b"surrogate-control", b"no-store"),
            ]
        else:
            headers = [
                (b"cache-control", f"public, max-age={int(browser_ttl)}{extra}".encode()),
                (b"cdn-cache-control", f"max-age={int(cdn_ttl)}{extra}".encode()),
                (b"surrogate-control", f"max-age={int(cdn_ttl)}".encode()),
            ]
        names = list(route.vary)
        if self.tenant_vary is not None and self.tenant_vary.lower() not in {
            n.lower() for n in names
        }:
            names.append(self.tenant_vary)
        result = (headers, ", ".join(names).encode())
        self._route_headers[(id(route), private)] = result
        return result

    async def send_entry(
        self,
        entry: Entry,
        outcome: Any,
        route: CacheRoute,
        request_headers: RawHeaders,
        private: bool,
        send: Send,
        head: bool,
    ) -> None:
        """Answer from an entry: 304 when ``If-None-Match`` matches, else the page."""
        status, stored, body, etag, cdn, app_vary = entry
        base, vary = self._cache_headers(route, private)
        age = int(outcome.age)
        browser_ttl = route.ttl if route.browser_ttl is None else route.browser_ttl
        now = self.timer()
        common: RawHeaders = [(b"etag", etag), *base]
        if app_vary:
            known = {n.strip().lower() for n in vary.decode().split(",") if n.strip()}
            extra = [n for n in app_vary.split(",") if n not in known]
            if extra:
                vary = b", ".join([vary, *(n.encode() for n in extra)]) if vary else (
                    ", ".join(extra).encode()
                )  # fmt: skip
        if vary:
            common.append((b"vary", vary))
        if self.date:
            common.append((b"date", _http.http_date(now)))
        common.append((b"expires", _http.http_date(now + max(0, browser_ttl - age))))
        common.append((b"age", str(age).encode()))
        common.append((b"x-cache", _STATE.get(outcome.state, b"MISS")))
        if not private:
            common.extend(cdn)
        inm = header(request_headers, b"if-none-match")
        if inm is not None and 200 <= status < 300 and _http.etag_matches(inm, etag):
            await send({"type": "http.response.start", "status": 304, "headers": common})
            await send({"type": "http.response.body", "body": b""})
            return
        headers = [*stored, *common, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})

    async def send_captured(self, capture: Capture, send: Send, head: bool) -> None:
        """A filled response that was not stored, as the app sent it (marked unstored)."""
        out = self.unstored(send)
        await out(capture.messages[0])
        await out({"type": "http.response.body", "body": b"" if head else capture.body})

    def unstored(self, send: Send) -> Send:
        """Mark a response the cache did not store: MISS, and no-store towards the CDN;
        surrogate keys the app set are dropped when no CDN is configured to strip them."""
        strip = self._strip

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k not in strip]
                names = {k for k, _ in headers}
                headers.extend(h for h in _NO_STORE_CDN if h[0] not in names)
                headers.append(_MISS)
                message = {**message, "headers": headers}
            await send(message)

        return marked


def asks_no_cache(headers: RawHeaders) -> bool:
    """The request says ``Cache-Control: no-cache`` (or the HTTP/1.0 ``Pragma``)."""
    if "no-cache" in _http.directives(header(headers, b"cache-control")):
        return True
    pragma = header(headers, b"pragma")
    return pragma is not None and b"no-cache" in pragma.lower()


def refusal(route: CacheRoute, request_headers: RawHeaders, path: str,
            capture: Capture) -> str | None:  # fmt: skip
    """Why a complete, non-5xx response must not be stored in a shared entry, or None."""
    status = capture.status
    if status not in _http.STORABLE_STATUSES:
        return f"status {status}"  # 206, 4xx a request header can provoke (CPDoS)...
    if status in (404, 410) and not _http.clean_request(request_headers):
        return f"{status} to a request with oversized or odd headers (CPDoS)"
    headers = capture.headers
    found = {k for k, _ in headers}
    if b"set-cookie" in found:
        return "Set-Cookie"
    cache_control = _http.directives(header(headers, b"cache-control"))
    if cache_control & {"private", "no-store", "no-cache"}:
        return "Cache-Control " + ", ".join(sorted(cache_control & {"private", "no-store"}))
    vary = _http.vary_names(header(headers, b"vary"))
    keyed = {name.decode() for name in route.vary_raw}
    if "*" in vary or any(name not in keyed for name in vary):
        return f"Vary names headers the route does not key ({', '.join(vary)})"
    if len(capture.body) > route.max_body:
        return f"body over {route.max_body} bytes"
    suffix = _http.static_suffix(path)
    if suffix is not None and not _http.content_type_matches(
        suffix, header(headers, b"content-type")
    ):
        return f"path ends in {suffix} but the content type differs (web cache deception)"
    return None
