"""The HTTP middleware behind a real Varnish (vmod xkey): the example shop
(``examples/http_app.py``) under uvicorn, one ``varnishd`` in front of it, and the
Varnish purger listed as a layer of the shop's cache.

A tag invalidated through the cache purges Varnish (the xkey the middleware put on
the response), so the next request through Varnish is a MISS with the new
content; a soft purge (a second varnishd, 30 s of grace) serves the stale page
once, then the refreshed one.
If varnishd or uvicorn cannot start, the tests fail with the reason (never skip).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn

from examples import http_app
from scripts.varnish_service import VarnishService, free_port
from tieredcache import MemoryLayer, TieredCache
from tieredcache.layers.cdn import VARNISH, CdnPurgeLayer, VarnishPurger
from tieredcache.middleware import CdnConfig
from tieredcache.testing import wait_until

pytestmark = pytest.mark.slow


@dataclass
class Shop:
    varnish: VarnishService
    cache: TieredCache
    purges: CdnPurgeLayer
    origin: str


class _Server(uvicorn.Server):
    """Remembers its event loop, so the fixture can close async clients on it."""

    loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)


class UvicornThread:
    """uvicorn serving ``app`` on 127.0.0.1:``port`` from a thread of this process."""

    def __init__(self, app: object, port: int) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", date_header=False,
            lifespan="off", http="h11", ws="none", loop="asyncio",
        )  # fmt: skip
        self.server = _Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                pytest.fail("uvicorn did not start serving the example app within 10 s")
            time.sleep(0.02)

    def run(self, coroutine: Coroutine[Any, Any, object]) -> None:
        """Run ``coroutine`` on the server's loop and wait for it."""
        assert self.server.loop is not None
        asyncio.run_coroutine_threadsafe(coroutine, self.server.loop).result(10)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextlib.contextmanager
def running_shop(*, grace: int, soft: bool) -> Iterator[Shop]:
    """varnishd (``grace`` seconds of stale) in front of the shop under uvicorn; the
    shop's cache purges Varnish through a CdnPurgeLayer (soft purges if ``soft``)."""
    port = free_port()
    varnish = VarnishService("127.0.0.1", port, grace=grace).start()
    purges = CdnPurgeLayer(VarnishPurger([varnish.url]), name="varnish", soft=soft)
    cache = TieredCache("shop", [MemoryLayer(), purges])
    server = UvicornThread(http_app.create_app(cache, cdn=CdnConfig(VARNISH)), port)
    try:
        server.start()
        yield Shop(varnish, cache, purges, f"http://127.0.0.1:{port}")
    finally:
        if server.server.started:
            # The async purge client lives on uvicorn's loop: close it there.
            server.run(cache.aclose())
        server.stop()
        cache.close()
        varnish.stop()


@pytest.fixture(scope="module")
def shop() -> Iterator[Shop]:
    with running_shop(grace=0, soft=False) as shop:
        yield shop


@pytest.fixture(scope="module")
def soft_shop() -> Iterator[Shop]:
    with running_shop(grace=30, soft=True) as shop:
        yield shop


def get(url: str) -> tuple[str, dict[str, object], dict[str, str]]:
    """(Varnish's X-Cache, the JSON body, the headers) of a GET."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.headers["X-Cache"], json.loads(response.read()), dict(response.headers)


def test_miss_hit_then_tag_purge_gives_a_miss_with_new_content(shop: Shop) -> None:
    """MISS, HIT at Varnish; the product changes and its tag is invalidated through
    the cache, whose CdnPurgeLayer purges Varnish: the next request is a MISS with
    the new name (and the origin's own entry was dropped too)."""
    url = f"{shop.varnish.url}/products/1"
    state, body, headers = get(url)
    assert state == "MISS" and body["name"] == "Product 1"
    assert "shop:public:product:1" in str(headers["xkey"]).split()
    state, body, _ = get(url)
    assert state == "HIT" and body["name"] == "Product 1"

    http_app.PRODUCTS[1] = {**http_app.PRODUCTS[1], "name": "Renamed"}
    shop.cache.invalidate(tags=["product:1"], tenant="public")
    outcomes = shop.purges.flush(timeout=10)
    assert [o.status for o in outcomes] == ["purged"]
    assert outcomes[0].result is not None and outcomes[0].result.purged == 1

    state, body, _ = get(url)
    assert state == "MISS" and body["name"] == "Renamed"
    assert get(url)[0] == "HIT"


def test_unsafe_method_through_varnish_purges_the_url(shop: Shop) -> None:
    """A PUT through Varnish reaches the app (Varnish passes it); the middleware drops
    the URL's entry and, through the purge layer, the URL's xkey at Varnish."""
    url = f"{shop.varnish.url}/products/2"
    get(url)
    assert get(url)[0] == "HIT"
    request = urllib.request.Request(url, data=b'{"price": 999}', method="PUT")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
    wait_until(lambda: get(url)[1]["price"] == 999, timeout=5, message="Varnish was purged")


def test_soft_purge_serves_stale_then_the_refreshed_page(soft_shop: Shop) -> None:
    """A soft purge marks the page stale at Varnish instead of evicting it: the next
    request is answered at once with the old page (within grace) while Varnish
    refetches in the background, and the request after that gets the new content."""
    url = f"{soft_shop.varnish.url}/products/3"
    get(url)
    assert get(url)[0] == "HIT"

    http_app.PRODUCTS[3] = {**http_app.PRODUCTS[3], "name": "Soft renamed"}
    soft_shop.cache.invalidate(tags=["product:3"], tenant="public")
    outcomes = soft_shop.purges.flush(timeout=10)
    assert [o.status for o in outcomes] == ["purged"]

    state, body, _ = get(url)
    assert state == "HIT" and body["name"] == "Product 3"  # stale, from grace
    wait_until(lambda: get(url)[1]["name"] == "Soft renamed", timeout=5,
               message="Varnish refreshed the soft-purged page")  # fmt: skip
