"""TieredCacheMiddleware and what a request carries: ``Cache-Control: no-cache`` under
load, session cookies, ``Accept-Encoding`` behind ``GZipMiddleware`` and an async
tenant resolver. Each attack is the request an attacker would send.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tieredcache import MemoryLayer, TieredCache, current_tenant
from tieredcache.middleware import CacheRoute, TieredCacheMiddleware
from tieredcache.testing import FakeClock

calls: Counter[str] = Counter()


async def slow(request: Request) -> Response:
    """Slow enough that 20 concurrent requests all arrive while it runs."""
    calls["slow"] += 1
    await asyncio.sleep(0.05)
    return PlainTextResponse(f"slow #{calls['slow']}")


def whoami(request: Request) -> Response:
    """Reflects the session cookie, as a signed-in page does."""
    calls["whoami"] += 1
    session = request.cookies.get("session", "anonymous")
    lang = request.cookies.get("lang", "-")
    return PlainTextResponse(f"hello {session} lang={lang} #{calls['whoami']}")


def big(request: Request) -> Response:
    """Large enough for GZipMiddleware to compress (its minimum_size is 500)."""
    calls["big"] += 1
    return PlainTextResponse("catalogue " * 200)


def tenant_page(request: Request) -> Response:
    calls["tenant"] += 1
    return PlainTextResponse(f"tenant={current_tenant()}")


APP = Starlette(
    routes=[
        Route("/fresh/{id}", slow),
        Route("/plain/{id}", slow),
        Route("/shared", whoami),
        Route("/mine", whoami),
        Route("/lang", whoami),
        Route("/big", big),
        Route("/tenant", tenant_page),
    ]
)

ROUTES = [
    CacheRoute("/fresh/{id}", ttl=60, revalidate=True, revalidate_interval=5),
    CacheRoute("/plain/{id}", ttl=60),
    CacheRoute("/shared", ttl=60),
    CacheRoute("/mine", ttl=60, scope="user"),
    CacheRoute("/lang", ttl=60, cookies=["lang"]),
    CacheRoute("/big", ttl=60, vary=["Accept-Encoding"]),
    CacheRoute("/tenant", ttl=60),
]


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


@pytest.fixture
async def client(cache: TieredCache) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(TieredCacheMiddleware(APP, cache=cache, routes=ROUTES)) as client:
        yield client


NO_CACHE = {"Cache-Control": "no-cache"}

# ----------------------------------------------------------------- no-cache


async def test_concurrent_no_cache_on_an_opted_in_route_reloads_once(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """20 concurrent ``no-cache`` requests on a route with revalidate=True cost one
    app call between them (coalesced), and all get the reloaded page."""
    await client.get("/fresh/1")
    clock.advance(6)  # past revalidate_interval
    answers = await asyncio.gather(*(client.get("/fresh/1", headers=NO_CACHE) for _ in range(20)))
    assert calls["slow"] == 2
    assert {a.text for a in answers} == {"slow #2"}
    assert all(a.status_code == 200 for a in answers)


async def test_concurrent_no_cache_elsewhere_never_reaches_the_app(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """On a route that does not opt in, ``no-cache`` (or ``Pragma: no-cache``) is
    ignored: 20 concurrent requests are all HITs and the app never runs again."""
    await client.get("/plain/1")
    clock.advance(6)
    headers = [NO_CACHE, {"Pragma": "no-cache"}] * 10
    answers = await asyncio.gather(*(client.get("/plain/1", headers=h) for h in headers))
    assert calls["slow"] == 1
    assert {a.headers["x-cache"] for a in answers} == {"HIT"}


# ----------------------------------------------------------------- cookies


async def test_a_session_cookie_page_is_never_shared(client: httpx.AsyncClient) -> None:
    """Attack: A signs in and loads a shared route; B (another session) and an
    anonymous client load it next. Neither ever sees A's page: requests with a
    session cookie bypass a shared route, and the anonymous page is filled clean."""
    a = await client.get("/shared", headers={"Cookie": "session=alice"})
    b = await client.get("/shared", headers={"Cookie": "session=bob"})
    anonymous = await client.get("/shared")
    anonymous_again = await client.get("/shared")
    a_again = await client.get("/shared", headers={"Cookie": "session=alice"})
    assert "alice" in a.text and a.headers["x-cache"] == "MISS"
    assert a.headers["cdn-cache-control"] == "no-store"
    assert "bob" in b.text and "alice" not in b.text and b.headers["x-cache"] == "MISS"
    assert "anonymous" in anonymous.text and anonymous.headers["x-cache"] == "MISS"
    assert anonymous_again.headers["x-cache"] == "HIT" and "alice" not in anonymous_again.text
    assert "alice" in a_again.text and a_again.headers["x-cache"] == "MISS"


async def test_a_user_scoped_route_keys_the_session_cookie(client: httpx.AsyncClient) -> None:
    """scope="user": each session gets its own entry (B never gets A's page), private
    towards browsers' shared caches and the CDN."""
    a = await client.get("/mine", headers={"Cookie": "session=alice"})
    b = await client.get("/mine", headers={"Cookie": "session=bob"})
    a_again = await client.get("/mine", headers={"Cookie": "session=alice"})
    assert "alice" in a.text and "bob" in b.text and b.headers["x-cache"] == "MISS"
    assert a_again.headers["x-cache"] == "HIT" and a_again.text == a.text
    assert a_again.headers["cache-control"].startswith("private")
    assert a_again.headers["cdn-cache-control"] == "private"


async def test_declared_cookies_are_keyed_and_others_still_bypass(
    client: httpx.AsyncClient,
) -> None:
    """cookies=["lang"]: lang is keyed (de and en are two entries, each a HIT the
    second time); a session cookie beside it still makes the request bypass."""
    de = await client.get("/lang", headers={"Cookie": "lang=de"})
    de_again = await client.get("/lang", headers={"Cookie": "lang=de"})
    en = await client.get("/lang", headers={"Cookie": "lang=en"})
    signed_in = await client.get("/lang", headers={"Cookie": "lang=de; session=alice"})
    de_last = await client.get("/lang", headers={"Cookie": "lang=de"})
    assert "lang=de" in de.text and de_again.headers["x-cache"] == "HIT"
    assert "lang=en" in en.text and en.headers["x-cache"] == "MISS"
    assert "alice" in signed_in.text and signed_in.headers["x-cache"] == "MISS"
    assert de_last.text == de.text and "alice" not in de_last.text


# ----------------------------------------------------------------- gzip


async def test_gzip_inside_the_cache_gets_an_etag_per_encoding(cache: TieredCache) -> None:
    """GZipMiddleware wrapped by the cache (as the middleware docstring says): the
    gzip and identity responses are two entries with distinct ETags, each HIT serves
    its own encoding, and an ETag of one encoding never validates the other."""
    app = TieredCacheMiddleware(GZipMiddleware(APP), cache=cache, routes=ROUTES)
    gzip, identity = {"Accept-Encoding": "gzip"}, {"Accept-Encoding": "identity"}
    async with client_for(app) as client:
        first = [await client.get("/big", headers=h) for h in (gzip, identity)]
        again = [await client.get("/big", headers=h) for h in (identity, gzip)]
        cross = await client.get(
            "/big", headers={**identity, "If-None-Match": first[0].headers["etag"]}
        )
    zipped, plain = first
    assert zipped.headers["content-encoding"] == "gzip"
    assert "content-encoding" not in plain.headers
    assert zipped.headers["etag"] != plain.headers["etag"]
    assert "accept-encoding" in zipped.headers["vary"].lower()
    assert calls["big"] == 2
    assert [a.headers["x-cache"] for a in again] == ["HIT", "HIT"]
    assert "content-encoding" not in again[0].headers
    assert again[0].headers["etag"] == plain.headers["etag"]
    assert again[1].headers["content-encoding"] == "gzip"
    assert again[1].headers["etag"] == zipped.headers["etag"]
    assert all(r.text == "catalogue " * 200 for r in (*first, *again))
    assert cross.status_code == 200 and "content-encoding" not in cross.headers


# ----------------------------------------------------------------- tenants


async def test_an_async_tenant_resolver_scopes_pages(cache: TieredCache) -> None:
    """A coroutine resolver (a session store lookup, say) is awaited: its tenant is
    current for the app and each tenant gets its own entry."""

    async def from_session(scope: Any) -> str | None:
        await asyncio.sleep(0)
        for name, value in scope["headers"]:
            if name == b"x-session":
                return {b"s1": "acme", b"s2": "globex"}.get(value)
        return None

    app = TieredCacheMiddleware(APP, cache=cache, routes=ROUTES, tenant_resolver=from_session)
    async with client_for(app) as client:
        acme = await client.get("/tenant", headers={"X-Session": "s1"})
        globex = await client.get("/tenant", headers={"X-Session": "s2"})
        acme_again = await client.get("/tenant", headers={"X-Session": "s1"})
    assert acme.text == "tenant=acme" and globex.text == "tenant=globex"
    assert globex.headers["x-cache"] == "MISS"
    assert acme_again.headers["x-cache"] == "HIT" and acme_again.text == "tenant=acme"
    assert acme.headers["cdn-cache-control"] == "private"  # from credentials
