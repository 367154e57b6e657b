"""TieredCacheMiddleware: HTTP semantics, never-store rules, tenant isolation and the
poisoning / deception / CPDoS guards, each with the request that would attack it.

The app under test counts how often each endpoint ran, so "served from the cache"
is "the counter did not move". Most tests use an in-process MemoryLayer; the
Redis-only HIT runs against the real Redis of ``redis_url``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tieredcache import MemoryLayer, RedisLayer, TieredCache, current_tenant
from tieredcache.errors import ConfigurationError
from tieredcache.keys import Tag
from tieredcache.layers.cdn import VARNISH, response_header
from tieredcache.middleware import (
    CacheRoute,
    CdnConfig,
    HeaderTenant,
    TieredCacheMiddleware,
)
from tieredcache.testing import FakeClock

calls: Counter[str] = Counter()


def page(request: Request) -> Response:
    """Reflects everything an attacker could try to smuggle into a shared page."""
    calls["page"] += 1
    host = request.headers.get("x-forwarded-host", "-")
    original = request.headers.get("x-original-url", "-")
    override = request.headers.get("x-http-method-override", "-")
    lang = request.headers.get("accept-language", "-")
    body = (
        f"page {request.path_params['id']} #{calls['page']} tenant={current_tenant()} "
        f"q={request.url.query} host={host} orig={original} override={override} lang={lang}"
    )
    return PlainTextResponse(body, headers={"Vary": "Accept-Language"})


def status(request: Request) -> Response:
    calls["status"] += 1
    code = int(request.path_params["code"])
    return PlainTextResponse(f"status {code} #{calls['status']}", status_code=code)


def header_page(request: Request) -> Response:
    calls["header"] += 1
    name, value = request.path_params["kind"], f"#{calls['header']}"
    headers = {
        "no-store": {"Cache-Control": "no-store"},
        "private": {"Cache-Control": "private, max-age=60"},
        "cookie": {"Set-Cookie": "session=secret"},
        "vary-star": {"Vary": "*"},
        "surrogate": {"Surrogate-Key": "app-key"},
    }[name]
    return PlainTextResponse(f"{name} {value}", headers=headers)


def account(request: Request) -> Response:
    """Ignores the rest of the path, as the pages web cache deception abuses do."""
    calls["account"] += 1
    return PlainTextResponse(f"account of {request.headers.get('x-user', '?')}")


def asset(request: Request) -> Response:
    calls["asset"] += 1
    return Response("body{}", media_type="text/css")


def stream(request: Request) -> Response:
    calls["stream"] += 1

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(4):
            yield f"chunk{i}-".encode() * 100

    return StreamingResponse(chunks(), media_type="text/plain")


def events(request: Request) -> Response:
    calls["events"] += 1

    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        yield b"data: two\n\n"

    return StreamingResponse(chunks(), media_type="text/event-stream")


def partial(request: Request) -> Response:
    calls["partial"] += 1
    return Response("par", status_code=206, headers={"Content-Range": "bytes 0-2/10"})


async def write(request: Request) -> Response:
    calls["write"] += 1
    return PlainTextResponse("written")


def uncached(request: Request) -> Response:
    calls["uncached"] += 1
    return PlainTextResponse(f"tenant={current_tenant()}")


def me(request: Request) -> Response:
    calls["me"] += 1
    return PlainTextResponse(f"me {request.headers.get('authorization')} #{calls['me']}")


APP = Starlette(
    routes=[
        Route("/products/{id:int}", page, methods=["GET", "POST", "PUT", "DELETE"]),
        Route("/products/{id:int}/edit", write, methods=["POST"]),
        Route("/status/{code:int}", status),
        Route("/headers/{kind}", header_page),
        Route("/account/{rest:path}", account),
        Route("/assets/{name:path}", asset),
        Route("/stream", stream),
        Route("/events", events),
        Route("/partial", partial),
        Route("/uncached", uncached),
        Route("/me/tenant", me),
        Route("/me/user", me),
        Route("/me/shared", me),
        Route("/fresh/{id}", page),
    ]
)

ROUTES = [
    CacheRoute(
        "/products/{id:int}",
        ttl=60,
        tags=["product:{id}"],
        query=["lang", "page"],
        vary=["Accept-Language"],
        stale_while_revalidate=30,
        stale_if_error=300,
    ),
    CacheRoute("/status/{code:int}", ttl=60),
    CacheRoute("/headers/{kind}", ttl=60),
    CacheRoute("/account/{rest:path}", ttl=60),
    CacheRoute("/assets/{name:path}", ttl=60),
    CacheRoute("/stream", ttl=60, max_body=1000),
    CacheRoute("/events", ttl=60),
    CacheRoute("/partial", ttl=60),
    CacheRoute("/me/tenant", ttl=60, scope="tenant"),
    CacheRoute("/me/user", ttl=60, scope="user"),
    CacheRoute("/me/shared", ttl=60),
    CacheRoute("/fresh/{id}", ttl=60, vary=["Accept-Language"], revalidate=True,
               revalidate_interval=5),
]  # fmt: skip


class SpyCache:
    """Counts the cache calls the middleware makes (for "pays nothing")."""

    def __init__(self, inner: TieredCache) -> None:
        self.inner = inner
        self.namespace = inner.namespace
        self.calls = 0

    async def aget_or_load(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await self.inner.aget_or_load(*args, **kwargs)

    async def ainvalidate(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await self.inner.ainvalidate(*args, **kwargs)


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


@pytest.fixture
def cache(clock: FakeClock) -> Iterator[TieredCache]:
    cache = TieredCache("web", [MemoryLayer(maxsize=1000, timer=clock)], clock=clock)
    yield cache
    cache.close()


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop.test")


def middleware(cache: Any, **options: Any) -> TieredCacheMiddleware:
    options.setdefault("tenant_resolver", HeaderTenant("X-Tenant", trusted=True))
    return TieredCacheMiddleware(APP, cache=cache, routes=ROUTES, **options)


@pytest.fixture
async def client(cache: TieredCache) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(middleware(cache)) as client:
        yield client


A = {"X-Tenant": "acme"}
B = {"X-Tenant": "globex"}

# ----------------------------------------------------------------- basics


async def test_miss_then_hit_with_x_cache_age_and_strong_etag(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """MISS fills, HIT serves the same body without running the app; Age grows with
    the entry; the ETag is strong and quoted and the same on both answers."""
    first = await client.get("/products/1", headers=A)
    clock.advance(7)
    second = await client.get("/products/1", headers=A)
    assert first.status_code == second.status_code == 200
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert first.text == second.text and calls["page"] == 1
    assert (first.headers["age"], second.headers["age"]) == ("0", "7")
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and not etag.startswith("W/")
    assert second.headers["etag"] == etag
    assert second.headers["cache-control"] == (
        "public, max-age=60, stale-while-revalidate=30, stale-if-error=300"
    )
    assert second.headers["cdn-cache-control"].startswith("max-age=60")
    assert second.headers["surrogate-control"] == "max-age=60"
    assert second.headers["content-length"] == str(len(second.content))


@pytest.mark.redis
async def test_redis_only_hit(redis_url: str) -> None:
    """With Redis as the only layer, the second request is a HIT answered by Redis."""
    cache = TieredCache("web", [RedisLayer(url=redis_url, name="redis")])
    try:
        async with client_for(middleware(cache)) as client:
            first = await client.get("/products/5", headers=A)
            second = await client.get("/products/5", headers=A)
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
        assert first.content == second.content and calls["page"] == 1
        assert first.headers["etag"] == second.headers["etag"]
    finally:
        await cache.aclose()


async def test_etag_is_the_same_in_another_process(clock: FakeClock) -> None:
    """Two caches (two processes) filling the same page compute the same ETag."""
    tags = []
    for _ in range(2):
        calls.clear()
        cache = TieredCache("web", [MemoryLayer(timer=clock)], clock=clock)
        async with client_for(middleware(cache)) as client:
            tags.append((await client.get("/status/200", headers=A)).headers["etag"])
        cache.close()
    assert tags[0] == tags[1]


async def test_uncacheable_path_makes_no_cache_call_and_keeps_the_tenant(
    cache: TieredCache,
) -> None:
    """A path no route matches never reaches the cache, yet the app sees the tenant;
    the ContextVar is reset after the request."""
    spy = SpyCache(cache)
    async with client_for(middleware(spy)) as client:
        response = await client.get("/uncached", headers=A)
        await client.post("/uncached", headers=A)
    assert response.text == "tenant=acme" and "x-cache" not in response.headers
    assert spy.calls == 0
    assert current_tenant() is None


async def test_conditional_get_304_carries_its_headers(client: httpx.AsyncClient) -> None:
    """If-None-Match with the ETag (strong, weak W/ form, in a list, or *) gets a 304
    with ETag, Cache-Control, Vary, Date and Expires and no body; another tag a 200."""
    etag = (await client.get("/products/2", headers=A)).headers["etag"]
    for value in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        response = await client.get("/products/2", headers={**A, "If-None-Match": value})
        assert response.status_code == 304, value
        assert response.content == b""
        for name in ("etag", "cache-control", "vary", "date", "expires"):
            assert name in response.headers, name
        assert response.headers["etag"] == etag
    other = await client.get("/products/2", headers={**A, "If-None-Match": '"nope"'})
    assert other.status_code == 200 and other.content


async def test_vary_header_is_keyed_and_emitted(client: httpx.AsyncClient) -> None:
    """Accept-Language is in the key: en and fr get their own pages; Vary names it."""
    en = await client.get("/products/3", headers={**A, "Accept-Language": "en"})
    fr = await client.get("/products/3", headers={**A, "Accept-Language": "fr"})
    en_again = await client.get("/products/3", headers={**A, "Accept-Language": "en"})
    assert "lang=en" in en.text and "lang=fr" in fr.text
    assert en_again.text == en.text and en_again.headers["x-cache"] == "HIT"
    assert fr.headers["x-cache"] == "MISS"
    assert "Accept-Language" in en.headers["vary"] and "X-Tenant" in en.headers["vary"]


async def test_head_is_served_from_the_get_entry(client: httpx.AsyncClient) -> None:
    """A HEAD miss fills the GET entry; the GET that follows is a HIT; a HEAD hit has
    the GET's headers and Content-Length and no body."""
    head = await client.head("/products/4", headers=A)
    get = await client.get("/products/4", headers=A)
    head_hit = await client.head("/products/4", headers=A)
    assert head.content == b"" and head.status_code == 200
    assert get.headers["x-cache"] == "HIT" and get.content and calls["page"] == 1
    assert head_hit.headers["x-cache"] == "HIT" and head_hit.content == b""
    assert head_hit.headers["content-length"] == str(len(get.content))
    assert head_hit.headers["etag"] == get.headers["etag"]


async def test_query_is_sorted_into_the_key_and_unkeyed_params_stripped(
    client: httpx.AsyncClient,
) -> None:
    """?page=2&lang=en and ?lang=en&page=2 share an entry; an unkeyed ?utm=<script>
    never reaches the app (it would otherwise be reflected into a shared page)."""
    one = await client.get("/products/6?page=2&lang=en", headers=A)
    two = await client.get("/products/6?lang=en&page=2&utm=%3Cscript%3E", headers=A)
    assert two.headers["x-cache"] == "HIT" and calls["page"] == 1
    assert "q=lang=en&page=2 " in one.text and "script" not in two.text


# ----------------------------------------------------------------- never stored


@pytest.mark.parametrize("kind", ["no-store", "private", "cookie", "vary-star"])
async def test_responses_that_forbid_sharing_are_never_stored(
    client: httpx.AsyncClient, kind: str
) -> None:
    """no-store, private, Set-Cookie and Vary: * responses run the app every time, are
    passed through as the app sent them, and tell the CDN no-store."""
    first = await client.get(f"/headers/{kind}", headers=A)
    second = await client.get(f"/headers/{kind}", headers=A)
    assert calls["header"] == 2 and first.text != second.text
    assert second.headers["x-cache"] == "MISS"
    assert second.headers["cdn-cache-control"] == "no-store"
    if kind == "cookie":
        assert second.headers["set-cookie"] == "session=secret"


async def test_authorization_bypasses_a_shared_route(client: httpx.AsyncClient) -> None:
    """On a shared route a request with Authorization is neither served from nor stored
    in the cache: one user's page never becomes everybody's."""
    await client.get("/me/shared", headers=A)  # anonymous fill
    mine = await client.get("/me/shared", headers={**A, "Authorization": "Bearer u1"})
    again = await client.get("/me/shared", headers={**A, "Authorization": "Bearer u1"})
    anonymous = await client.get("/me/shared", headers=A)
    assert "Bearer u1" in mine.text and mine.headers["x-cache"] == "MISS"
    assert again.headers["x-cache"] == "MISS"
    assert "Bearer" not in anonymous.text and anonymous.headers["x-cache"] == "HIT"


async def test_tenant_and_user_scoped_routes_store_authorized_pages(
    client: httpx.AsyncClient,
) -> None:
    """scope="tenant" shares a page among the tenant's users; scope="user" keys it on
    the credentials (u2 never gets u1's page); both are private towards the CDN."""
    t1 = await client.get("/me/tenant", headers={**A, "Authorization": "Bearer u1"})
    t2 = await client.get("/me/tenant", headers={**A, "Authorization": "Bearer u2"})
    assert t2.headers["x-cache"] == "HIT" and t2.text == t1.text
    u1 = await client.get("/me/user", headers={**A, "Authorization": "Bearer u1"})
    u2 = await client.get("/me/user", headers={**A, "Authorization": "Bearer u2"})
    u1_again = await client.get("/me/user", headers={**A, "Authorization": "Bearer u1"})
    assert "u1" in u1.text and "u2" in u2.text and u2.headers["x-cache"] == "MISS"
    assert u1_again.headers["x-cache"] == "HIT" and u1_again.text == u1.text
    assert u1_again.headers["cache-control"].startswith("private")
    assert u1_again.headers["cdn-cache-control"] == "private"


async def test_streaming_response_passes_through_unstored(client: httpx.AsyncClient) -> None:
    """A chunked response over the route's max_body is relayed whole and not stored."""
    first = await client.get("/stream", headers=A)
    second = await client.get("/stream", headers=A)
    expected = b"".join(f"chunk{i}-".encode() * 100 for i in range(4))
    assert first.content == second.content == expected
    assert calls["stream"] == 2 and second.headers["x-cache"] == "MISS"


async def test_server_sent_events_are_never_stored(client: httpx.AsyncClient) -> None:
    """text/event-stream is relayed as a stream and never stored."""
    first = await client.get("/events", headers=A)
    second = await client.get("/events", headers=A)
    assert first.content == second.content == b"data: one\n\ndata: two\n\n"
    assert calls["events"] == 2


async def test_206_and_5xx_are_never_stored(client: httpx.AsyncClient) -> None:
    """206 and 500/503 answers reach the client as sent, and the app runs again."""
    for path, counter in (("/partial", "partial"), ("/status/500", "status"),
                          ("/status/503", "status")):  # fmt: skip
        before = calls[counter]
        first = await client.get(path, headers=A)
        second = await client.get(path, headers=A)
        assert calls[counter] == before + 2, path
        assert first.status_code == second.status_code == int(first.status_code)
        assert second.headers["x-cache"] == "MISS"


@pytest.mark.parametrize("code", [400, 403, 405, 413, 429, 431])
async def test_cpdos_error_pages_are_never_stored(client: httpx.AsyncClient, code: int) -> None:
    """4xx a request header can provoke is not stored: an attacker's oversized or odd
    header must not make the error page everyone's."""
    await client.get(f"/status/{code}", headers=A)
    clean = await client.get(f"/status/{code}", headers=A)
    assert calls["status"] == 2 and clean.headers["x-cache"] == "MISS"


async def test_404_is_stored_only_from_a_clean_request(client: httpx.AsyncClient) -> None:
    """A 404 from an oversized header (HHO) is not stored; from a clean request it is."""
    attack = await client.get("/status/404", headers={**A, "X-Junk": "a" * 9000})
    clean = await client.get("/status/404", headers=A)
    again = await client.get("/status/404", headers=A)
    assert attack.status_code == clean.status_code == 404
    assert clean.headers["x-cache"] == "MISS" and again.headers["x-cache"] == "HIT"


async def test_stale_if_error_serves_the_old_page_on_5xx(
    cache: TieredCache, clock: FakeClock
) -> None:
    """Past its TTL, an entry whose refill answers 5xx is served stale (stale-if-error)."""
    failing = {"on": False}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if failing["on"]:
            await PlainTextResponse("down", status_code=503)(scope, receive, send)
        else:
            await PlainTextResponse("good")(scope, receive, send)

    routes = [CacheRoute("/products/{id:int}", ttl=10, stale_if_error=100)]
    async with client_for(TieredCacheMiddleware(app, cache=cache, routes=routes)) as client:
        assert (await client.get("/products/1")).text == "good"
        failing["on"] = True
        clock.advance(20)
        stale = await client.get("/products/1")
    assert stale.status_code == 200 and stale.text == "good"
    assert stale.headers["x-cache"] == "STALE"


# ----------------------------------------------------------------- tenants


async def test_tenants_never_share_pages_etags_or_304(client: httpx.AsyncClient) -> None:
    """Tenant B requesting A's URL gets its own page (MISS), a different ETag for the
    same content, and a 200 (not a 304) when it presents A's ETag."""
    a = await client.get("/status/200", headers=A)
    b = await client.get("/status/200", headers=B)
    assert b.headers["x-cache"] == "MISS" and calls["status"] == 2
    assert a.headers["etag"] != b.headers["etag"]
    probe = await client.get("/status/200", headers={**B, "If-None-Match": a.headers["etag"]})
    assert probe.status_code == 200
    page_a = await client.get("/products/9", headers=A)
    page_b = await client.get("/products/9", headers=B)
    assert "tenant=acme" in page_a.text and "tenant=globex" in page_b.text


def test_a_raw_header_is_a_tenant_only_when_declared_trusted() -> None:
    """HeaderTenant refuses to be built without trusted=True."""
    with pytest.raises(ConfigurationError, match="trusted=True"):
        HeaderTenant("X-Tenant", trusted=False)


async def test_invalid_tenant_header_is_not_cached(client: httpx.AsyncClient) -> None:
    """A tenant id that could forge a key (``a:b``) is refused: the request runs uncached."""
    first = await client.get("/products/1", headers={"X-Tenant": "a:b*"})
    second = await client.get("/products/1", headers={"X-Tenant": "a:b*"})
    assert first.status_code == 200 and "x-cache" not in second.headers
    assert calls["page"] == 2


async def test_credential_tenant_is_private_towards_the_cdn(cache: TieredCache) -> None:
    """A tenant resolved from credentials: the CDN is told private unless it keys on
    the tenant (CdnConfig(keys_tenant=True))."""

    def from_token(scope: Any) -> str:
        return "acme"

    for keys_tenant, expected in ((False, "private"), (True, "max-age=60")):
        app = TieredCacheMiddleware(APP, cache=cache, routes=ROUTES, tenant_resolver=from_token,
                                    cdn=CdnConfig(VARNISH, keys_tenant=keys_tenant))  # fmt: skip
        async with client_for(app) as client:
            response = await client.get("/status/200")
        assert response.headers["cdn-cache-control"] == expected
        assert ("xkey" in response.headers) is keys_tenant


# ----------------------------------------------------------------- guards


@pytest.mark.parametrize(
    ("header", "reflected"),
    [
        ("X-Forwarded-Host", "host="),
        ("X-Original-URL", "orig="),
        ("X-HTTP-Method-Override", "override="),
    ],
)
async def test_poisoning_headers_are_stripped(
    client: httpx.AsyncClient, header: str, reflected: str
) -> None:
    """The attacker's header never reaches the app, so the page it fills (and everyone
    then gets) does not carry it."""
    attack = await client.get("/products/7", headers={**A, header: "evil.example"})
    victim = await client.get("/products/7", headers=A)
    assert "evil" not in attack.text and f"{reflected}-" in attack.text
    assert victim.headers["x-cache"] == "HIT" and "evil" not in victim.text


async def test_a_declared_forwarded_header_is_keyed_instead(cache: TieredCache) -> None:
    """A route that names X-Forwarded-Host in vary keys it: the attacker's value
    fills its own entry and the victim's entry stays clean."""
    routes = [CacheRoute("/products/{id:int}", ttl=60, vary=["X-Forwarded-Host",
                                                              "Accept-Language"])]  # fmt: skip
    app = TieredCacheMiddleware(APP, cache=cache, routes=routes)
    async with client_for(app) as client:
        attack = await client.get("/products/1", headers={"X-Forwarded-Host": "evil.example"})
        victim = await client.get("/products/1")
    assert "host=evil.example" in attack.text
    assert victim.headers["x-cache"] == "MISS" and "evil" not in victim.text


async def test_web_cache_deception_is_refused(client: httpx.AsyncClient) -> None:
    """/account/profile.css answered with the HTML account page is not stored; a real
    stylesheet under a .css path is."""
    victim = await client.get("/account/profile.css", headers={**A, "X-User": "victim"})
    attacker = await client.get("/account/profile.css", headers=A)
    assert "victim" in victim.text and "victim" not in attacker.text
    assert attacker.headers["x-cache"] == "MISS"
    await client.get("/assets/site.css", headers=A)
    css = await client.get("/assets/site.css", headers=A)
    assert css.headers["x-cache"] == "HIT" and calls["asset"] == 1


async def test_unsafe_method_invalidates_the_url(client: httpx.AsyncClient) -> None:
    """GET (MISS), GET (HIT), a successful POST on the URL, then GET is a MISS with
    fresh content; other query variants of the URL are dropped too."""
    first = await client.get("/products/8", headers=A)
    await client.get("/products/8?lang=de", headers=A)
    assert (await client.get("/products/8", headers=A)).headers["x-cache"] == "HIT"
    assert (await client.post("/products/8", headers=A)).status_code == 200
    after = await client.get("/products/8", headers=A)
    variant = await client.get("/products/8?lang=de", headers=A)
    assert after.headers["x-cache"] == "MISS" and after.text != first.text
    assert variant.headers["x-cache"] == "MISS"


async def test_no_cache_revalidates_only_where_the_route_opts_in(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """Cache-Control: no-cache is ignored on an ordinary route (no bypass DoS); on an
    opted-in route it reloads once the entry is revalidate_interval old."""
    await client.get("/products/1", headers=A)
    ignored = await client.get("/products/1", headers={**A, "Cache-Control": "no-cache"})
    assert ignored.headers["x-cache"] == "HIT" and calls["page"] == 1
    await client.get("/fresh/1", headers=A)
    too_soon = await client.get("/fresh/1", headers={**A, "Cache-Control": "no-cache"})
    assert too_soon.headers["x-cache"] == "HIT" and calls["page"] == 2
    clock.advance(6)
    reloaded = await client.get("/fresh/1", headers={**A, "Cache-Control": "no-cache"})
    assert reloaded.headers["x-cache"] == "MISS" and calls["page"] == 3


# ----------------------------------------------------------------- surrogate keys


async def test_surrogate_keys_from_tags_with_a_table_key(cache: TieredCache) -> None:
    """With a Varnish CDN the response carries xkey: the route's tag and the URL tag,
    tenant-prefixed, the tenant key and the tenant-less table key."""
    app = middleware(cache, cdn=CdnConfig(VARNISH))
    async with client_for(app) as client:
        response = await client.get("/products/11", headers=A)
    keys = response.headers["xkey"].split()
    assert "web:acme:product:11" in keys and "web:acme:*" in keys
    assert "web:*:products" in keys
    _, expected = response_header(VARNISH, [Tag("web", "acme", "product:11")])
    assert expected.split()[0] in keys


async def test_surrogate_keys_stripped_without_a_cdn(client: httpx.AsyncClient) -> None:
    """No CDN configured: no surrogate header reaches the browser, not even the app's."""
    ok = await client.get("/products/12", headers=A)
    app_set = await client.get("/headers/surrogate", headers=A)
    assert "xkey" not in ok.headers and "surrogate-key" not in ok.headers
    assert "surrogate-key" not in app_set.headers
