"""VarnishPurger and CdnPurgeLayer against real varnishd nodes (vmod xkey) started by
``scripts/varnish_service.py`` in front of a tiny local backend.

The backend answers ``GET /<path>?tags=a,b&key=body`` with ``<path>#<n>``, where n
counts the backend's fetches of that path, and tags the response with the xkey
header built by :func:`response_header` (the same encoding the purger sends). So
a body that keeps its number was a cache hit; a new number means Varnish fetched.

If varnishd cannot start, these tests fail with its log tail (never skip).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from scripts.varnish_service import VarnishError, VarnishService, free_port
from tieredcache import MemoryLayer, TieredCache
from tieredcache.errors import BackendError
from tieredcache.keys import CacheKey, Tag
from tieredcache.layers.cdn import (
    VARNISH,
    CdnPurgeLayer,
    RetryPolicy,
    VarnishPurger,
    purge_keys,
    response_header,
)
from tieredcache.testing import wait_until


class Backend:
    """The origin: counts fetches per path and tags responses for Varnish."""

    def __init__(self) -> None:
        self.fetches: Counter[str] = Counter()
        self._lock = threading.Lock()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                tags = [Tag("shop", "Acme", n) for n in query.get("tags", [""])[0].split(",") if n]
                keys = [CacheKey("shop", "Acme", k) for k in query.get("key", [])]
                with backend._lock:
                    backend.fetches[url.path] += 1
                    body = f"{url.path}#{backend.fetches[url.path]}".encode()
                self.send_response(200)
                if tags or keys:
                    # Surrogate-Key, as a Fastly-style origin sends it; the VCL copies it.
                    _, value = response_header(VARNISH, tags, keys=keys)
                    self.send_header("Surrogate-Key", value)
                self.send_header("Cache-Control", "max-age=300")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    origin = Backend()
    yield origin
    origin.stop()


@pytest.fixture(scope="module")
def nodes(backend: Backend) -> Iterator[list[VarnishService]]:
    """Two varnishd nodes in front of the same backend."""
    started: list[VarnishService] = []
    try:
        for _ in range(2):
            started.append(VarnishService("127.0.0.1", backend.port, grace=60).start())
        yield started
    finally:
        for node in started:
            node.stop()


def get(node: VarnishService, path: str) -> tuple[str, str]:
    """(X-Cache, body) of a GET through ``node``."""
    with urllib.request.urlopen(node.url + path, timeout=5) as response:
        return response.headers["X-Cache"], response.read().decode()


def unique(prefix: str) -> str:
    """A tag name / path part no other test uses (the nodes are shared by the module)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_purge_by_tag_evicts_only_tagged_objects(nodes: list[VarnishService]) -> None:
    """MISS, then HIT; a purge of tag A evicts /a (next MISS with new content) and the
    node reports 1 object purged; /b, tagged B, stays a HIT."""
    node = nodes[0]
    a, b = unique("a"), unique("b")
    assert get(node, f"/{a}?tags={a}") == ("MISS", f"/{a}#1")
    assert get(node, f"/{a}?tags={a}") == ("HIT", f"/{a}#1")
    assert get(node, f"/{b}?tags={b}")[0] == "MISS"

    purger = VarnishPurger([node.url])
    result = purger.purge(purge_keys(VARNISH, [Tag("shop", "Acme", a)]))
    purger.close()

    assert [(ack.target, ack.status, ack.purged) for ack in result.acks] == [(node.url, 200, 1)]
    assert get(node, f"/{a}?tags={a}") == ("MISS", f"/{a}#2")
    assert get(node, f"/{b}?tags={b}") == ("HIT", f"/{b}#1")


def test_soft_purge_serves_stale_then_refreshes(nodes: list[VarnishService]) -> None:
    """After a soft purge the next request is still a HIT with the stale body (grace),
    and a later one has the refreshed body, fetched in the background."""
    node = nodes[0]
    s = unique("s")
    path = f"/{s}?tags={s}"
    assert get(node, path) == ("MISS", f"/{s}#1")
    purger = VarnishPurger([node.url])
    result = purger.purge(purge_keys(VARNISH, [Tag("shop", "Acme", s)]), soft=True)
    purger.close()
    assert result.purged == 1
    assert get(node, path) == ("HIT", f"/{s}#1")  # stale, while Varnish refetches
    deadline = time.monotonic() + 5
    while get(node, path)[1] != f"/{s}#2":
        assert time.monotonic() < deadline, "the background fetch never landed"
        time.sleep(0.05)
    assert get(node, path) == ("HIT", f"/{s}#2")


def test_two_nodes_are_purged_with_per_node_counts(nodes: list[VarnishService]) -> None:
    """Tag T on two objects at node 0 and one at node 1: one purge, acks 2 and 1."""
    t = unique("t")
    for path in (f"/{t}-1", f"/{t}-2"):
        get(nodes[0], f"{path}?tags={t}")
    get(nodes[1], f"/{t}-1?tags={t}")

    purger = VarnishPurger([n.url for n in nodes])
    result = purger.purge(purge_keys(VARNISH, [Tag("shop", "Acme", t)]))
    purger.close()

    assert {ack.target: ack.purged for ack in result.acks} == {nodes[0].url: 2, nodes[1].url: 1}
    assert result.purged == 3
    assert get(nodes[0], f"/{t}-2?tags={t}")[0] == "MISS"
    assert get(nodes[1], f"/{t}-1?tags={t}")[0] == "MISS"


def test_dead_node_is_reported_and_the_others_are_purged(nodes: list[VarnishService]) -> None:
    """One node down: the live node is still purged, then BackendError names the dead one."""
    d = unique("d")
    get(nodes[0], f"/{d}?tags={d}")
    dead = f"http://127.0.0.1:{free_port()}"
    purger = VarnishPurger([dead, nodes[0].url], retry=RetryPolicy(max_attempts=2, base_delay=0.01))
    with pytest.raises(
        BackendError, match=r"1 of 2 requests failed: http://127\.0\.0\.1:\d+: Conn"
    ):
        purger.purge(purge_keys(VARNISH, [Tag("shop", "Acme", d)]))
    purger.close()
    assert get(nodes[0], f"/{d}?tags={d}")[0] == "MISS"


def test_purge_from_outside_the_acl_is_refused(nodes: list[VarnishService]) -> None:
    """The VCL only lets 127.0.0.1 purge: the same request from 127.0.0.2 gets 403."""
    port = int(nodes[0].url.rsplit(":", 1)[1])
    with socket.create_connection(
        ("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)
    ) as sock:
        sock.sendall(b"PURGE / HTTP/1.1\r\nHost: x\r\nxkey-purge: k\r\nConnection: close\r\n\r\n")
        status_line = sock.makefile("rb").readline()
    assert status_line.split()[1] == b"403"


def test_layer_purges_tags_and_cache_keys_on_every_node(nodes: list[VarnishService]) -> None:
    """CdnPurgeLayer.delete_tags and delete reach both nodes with the response encoding."""
    t, k = unique("lt"), unique("lk")
    tagged, keyed = f"/{t}?tags={t}", f"/{k}?key={k}"
    for node in nodes:
        get(node, tagged)
        get(node, keyed)
    layer = CdnPurgeLayer(VarnishPurger([n.url for n in nodes]), name="edge")
    layer.delete_tags([Tag("shop", "Acme", t)])
    layer.delete([CacheKey("shop", "Acme", k)])
    outcomes = layer.flush(timeout=10)
    layer.close()
    assert {o.status for o in outcomes} == {"purged"}
    assert sum(o.result.purged or 0 for o in outcomes if o.result) == 4
    for node in nodes:
        assert get(node, tagged)[0] == "MISS"
        assert get(node, keyed)[0] == "MISS"


def test_layer_async_purge(nodes: list[VarnishService]) -> None:
    """adelete_tags + aflush purge through the async driver."""
    t = unique("at")
    get(nodes[1], f"/{t}?tags={t}")

    async def go() -> list[Any]:
        layer = CdnPurgeLayer(VarnishPurger([nodes[1].url]))
        await layer.adelete_tags([Tag("shop", "Acme", t)])
        outcomes = await layer.aflush()
        await layer.aclose()
        return outcomes

    (outcome,) = asyncio.run(go())
    assert outcome.status == "purged" and outcome.result is not None
    assert outcome.result.purged == 1
    assert get(nodes[1], f"/{t}?tags={t}")[0] == "MISS"


def test_a_dead_node_reaches_the_invalidation_result_once_settled(
    nodes: list[VarnishService],
) -> None:
    """Through a cache: the call returns with the CDN pending; the settled result
    names the layer 'refused' (one node down), and the live node was purged."""
    d = unique("rd")
    get(nodes[0], f"/{d}?tags={d}")
    dead = f"http://127.0.0.1:{free_port()}"
    purger = VarnishPurger([dead, nodes[0].url], retry=RetryPolicy(max_attempts=2, base_delay=0.01))
    cache = TieredCache("shop", [MemoryLayer(), CdnPurgeLayer(purger, name="edge")])
    try:
        result = cache.invalidate(tags=[d], tenant="Acme")
        assert result.ok and result.pending == ["edge"]
        settled = result.wait_purges(timeout=10)
    finally:
        cache.close()
    assert settled.failed == ["edge"] and settled.pending == []
    assert [f.reason for f in settled.failures] == ["refused"]
    assert get(nodes[0], f"/{d}?tags={d}")[0] == "MISS"


def test_the_second_purge_evicts_a_copy_refetched_after_the_first(
    nodes: list[VarnishService],
) -> None:
    """A page refetched between the two purges (a replica that still served the old
    value) is evicted by the second purge, second_purge_after later."""
    s = unique("sp")
    path = f"/{s}?tags={s}"
    get(nodes[0], path)
    seconds: list[Any] = []
    layer = CdnPurgeLayer(
        VarnishPurger([nodes[0].url]),
        second_purge_after=0.3,
        on_outcome=lambda o: seconds.append(o) if o.second else None,
    )
    try:
        assert layer.delete_tags([Tag("shop", "Acme", s)]).wait(10)
        assert get(nodes[0], path)[0] == "MISS"  # refetched: cached again
        assert get(nodes[0], path)[0] == "HIT"
        wait_until(lambda: seconds, message="the second purge went out")
    finally:
        layer.close()
    assert seconds[0].status == "purged" and seconds[0].result.purged == 1
    assert get(nodes[0], path)[0] == "MISS"


def test_start_failure_carries_the_varnish_log_tail() -> None:
    """A VCL that cannot compile (unresolvable backend) raises VarnishError with the
    compiler's message in the log tail, and leaves no process behind."""
    service = VarnishService("host.invalid", 1)
    with pytest.raises(VarnishError, match="could not be resolved") as info:
        service.start()
    assert "VCC-compiler" in info.value.log_tail
    assert service.workdir is None
