"""HTTP throughput of TieredCacheMiddleware: req/s and p99 for ``GET /products/{id}``
backed by PostgreSQL, under uvicorn (one worker) with ``wrk`` on loopback.

Rows (each a uvicorn process of its own, all started once, then measured in
interleaved rounds: the machine's noise is ~20%, so every round runs every row in
a rotated order and the median round is reported):

- ``raw ASGI dict``: a bare ASGI callable answering from a dict (the floor).
- ``uncached``: the Starlette route querying PostgreSQL on every request.
- ``HIT in-process``: the middleware over ``[MemoryLayer]``, warm.
- ``HIT Redis-only``: the middleware over ``[RedisLayer]``, warm.
- ``MISS``: every request a new keyed query (``?lang=<n>``): lookup, fill, store.
- ``304``: ``If-None-Match`` with the page's ETag, in-process HIT.
- ``non-cacheable, bare`` / ``non-cacheable, middleware``: ``GET /cart/{id}`` (a
  path no cache route names) without and with the middleware.
- ``cashews @cache (Redis)``: the peer, cashews' ``@cache`` on a FastAPI route with
  the same query, warm in Redis; it runs from its own venv
  (``benchmarks/.venvs/http_cashews``, made by ``peers.py`` with fastapi, uvicorn
  and psycopg beside cashews). If that venv cannot be made the row is left out and
  the report says why.
- ``fastapi-cache2 @cache (Redis)``: the peer fastapi-cache2 (PyPI ``fastapi-cache2``),
  its ``@cache(expire=...)`` on a FastAPI route with the same query, the
  ``RedisBackend`` over ``redis.asyncio`` set up by ``FastAPICache.init(...)`` in the
  app's lifespan (so this server runs with ``lifespan="on"``), warm in Redis; its own
  venv ``benchmarks/.venvs/http_fastapi_cache``, made the same way and left out (with
  the reason in the report) if it cannot be made or does not import.

Then, once the throughput rows are done, ``tag purge -> fresh at Varnish``: the
shop under uvicorn (in a thread of this process, dict-backed) behind a real
``varnishd`` (vmod xkey), with the Varnish purger as a layer of its cache. Per purge:
the page is warm at Varnish, the product changes, ``await cache.ainvalidate(tags=
["product:<id>"])`` runs on the server's loop, and a keep-alive client polls
Varnish until it serves the new content; p50 / p99 / max over ``--purges`` purges
(after one untimed purge that opens the purger's connection).
The time covers the origin entry's drop, the purge queue, the PURGE round trip and
the refetch from the origin.

Targets (issue 11): HIT in-process >= 45% of the raw floor of the same run;
HIT Redis-only > uncached; the middleware costs non-cacheable <= 5%.

    .venv/bin/python benchmarks/bench_http.py [--quick] [--no-write] [--rounds N]

Needs ``wrk`` (``apt-get install wrk``), uvicorn in the project venv, the local
PostgreSQL / Redis servers of ``scripts/services.py`` and ``varnishd`` with vmod
xkey (``scripts/varnish_service.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

ROWS = [
    ("raw", "raw ASGI dict", "/products/1"),
    ("uncached", "uncached (PostgreSQL)", "/products/1"),
    ("hit_memory", "HIT in-process", "/products/1"),
    ("hit_redis", "HIT Redis-only", "/products/1"),
    ("miss", "MISS", "/products/1"),
    ("not_modified", "304", "/products/1"),
    ("cart_bare", "non-cacheable, bare", "/cart/1"),
    ("cart_mw", "non-cacheable, middleware", "/cart/1"),
    ("cashews", "cashews @cache (Redis), FastAPI", "/products/1"),
    ("fastapi_cache", "fastapi-cache2 @cache (Redis), FastAPI", "/products/1"),
]
PEER_ROWS = {"cashews": "http_cashews", "fastapi_cache": "http_fastapi_cache"}  # row -> venv
PEER_VENVS = {  # venv -> pip requirements
    "http_cashews": ["cashews[redis]", "hiredis", "fastapi", "uvicorn", "psycopg[binary]"],
    "http_fastapi_cache": [
        "fastapi-cache2[redis]", "hiredis", "fastapi", "uvicorn", "psycopg[binary]",
        "jinja2",  # fastapi_cache.coder imports starlette.templating, which needs it
    ],
}  # fmt: skip
PEER_DISTRIBUTIONS = {  # venv -> the distributions whose versions the report names
    "http_cashews": ["cashews", "fastapi", "uvicorn", "psycopg", "redis"],
    "http_fastapi_cache": ["fastapi-cache2", "fastapi", "pydantic", "uvicorn", "psycopg",
                           "redis"],
}  # fmt: skip
PEER_IMPORTS = {  # venv -> modules its server imports: a venv that cannot is left out
    "http_cashews": ["cashews", "fastapi", "uvicorn", "psycopg"],
    "http_fastapi_cache": ["fastapi_cache", "fastapi_cache.backends.redis",
                           "fastapi_cache.decorator", "redis.asyncio", "uvicorn", "psycopg"],
}  # fmt: skip
SERVER_OF = {"not_modified": "hit_memory", "miss": "miss"}  # rows sharing a server
MISS_LUA = """counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, "/products/1?lang=" .. counter)
end
"""

# ------------------------------------------------------------------ child: one server


def serve(kind: str, port: int, dsn: str, redis_url: str) -> None:
    import psycopg
    import uvicorn

    pool: asyncio.Queue[Any] = asyncio.Queue()

    async def load_product(product_id: int) -> dict[str, Any] | None:
        if pool.empty() and pool.qsize() == 0 and not getattr(load_product, "ready", False):
            load_product.ready = True  # type: ignore[attr-defined]
            for _ in range(4):
                pool.put_nowait(await psycopg.AsyncConnection.connect(dsn, autocommit=True))
        conn = await pool.get()
        try:
            cur = await conn.execute(
                "SELECT id, name, price FROM products WHERE id = %s", (product_id,)
            )
            row = await cur.fetchone()
        finally:
            pool.put_nowait(conn)
        return None if row is None else {"id": row[0], "name": row[1], "price": row[2]}

    app: Any
    lifespan = "off"
    if kind == "raw":
        bodies = {b"/products/1": b'{"id": 1, "name": "Product 1", "price": 10}'}

        async def app(scope: Any, receive: Any, send: Any) -> None:
            body = bodies.get(scope["raw_path"], b"{}")
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode())]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
    elif kind == "cashews":  # in the peer venv: no tieredcache here
        from cashews import cache as cashews
        from fastapi import FastAPI, HTTPException

        cashews.setup(redis_url)
        app = FastAPI()

        @app.get("/products/{product_id}")
        @cashews(ttl="5m", key="products:{product_id}")
        async def product(product_id: int) -> dict[str, Any]:
            found = await load_product(product_id)
            if found is None:
                raise HTTPException(404)
            return found
    elif kind == "fastapi_cache":  # in the peer venv: no tieredcache here
        from collections.abc import AsyncIterator
        from contextlib import asynccontextmanager

        from fastapi import FastAPI, HTTPException
        from fastapi_cache import FastAPICache
        from fastapi_cache.backends.redis import RedisBackend
        from fastapi_cache.decorator import cache as fastapi_cache
        from redis import asyncio as aioredis

        @asynccontextmanager
        async def startup(_: Any) -> AsyncIterator[None]:
            redis = aioredis.from_url(redis_url)  # bytes: fastapi-cache2's coders decode
            FastAPICache.init(RedisBackend(redis), prefix="fastapi-cache")
            yield
            await getattr(redis, "aclose", redis.close)()

        app = FastAPI(lifespan=startup)
        lifespan = "on"

        @app.get("/products/{product_id}")
        @fastapi_cache(expire=300)
        async def product(product_id: int) -> dict[str, Any]:
            found = await load_product(product_id)
            if found is None:
                raise HTTPException(404)
            return found
    elif kind in ("uncached", "cart_bare"):
        from examples.http_app import build_app

        app = build_app(load_product)[0]
    else:
        from examples.http_app import create_app
        from tieredcache import MemoryLayer, RedisLayer, TieredCache

        layers: list[Any] = (
            [RedisLayer(url=redis_url)] if kind == "hit_redis" else [MemoryLayer(maxsize=200_000)]
        )
        app = create_app(TieredCache("bench", layers), load_product=load_product)
    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning",
                access_log=False, date_header=False, lifespan=lifespan, ws="none")  # fmt: skip


# ------------------------------------------------------------------ parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                response.read()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def wrk(url: str, seconds: float, connections: int, lua: Path | None,
        headers: dict[str, str]) -> tuple[float, float]:  # fmt: skip
    """(requests per second, p99 latency in ms) of one wrk run."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    if lua is not None:
        cmd += ["-s", str(lua)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert p99 is not None, out
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    if re.search(r"Non-2xx or 3xx responses", out):
        raise RuntimeError(f"wrk saw error responses for {url}:\n{out}")
    return rps, float(p99.group(1)) * scale


def purge_to_fresh(purges: int) -> list[float]:
    """Milliseconds from ``await cache.ainvalidate(tags=[...])`` to the new content
    served by Varnish, for ``purges`` purges (see the module docstring)."""
    import uvicorn

    from examples import http_app
    from scripts.varnish_service import VarnishService
    from scripts.varnish_service import free_port as varnish_port
    from tieredcache import MemoryLayer, TieredCache
    from tieredcache.layers.cdn import VARNISH, CdnPurgeLayer, VarnishPurger
    from tieredcache.middleware import CdnConfig

    port = varnish_port()
    varnish = VarnishService("127.0.0.1", port, grace=0).start()
    cache = TieredCache("bench", [MemoryLayer(), CdnPurgeLayer(VarnishPurger([varnish.url]))])
    app = http_app.create_app(cache, cdn=CdnConfig(VARNISH))
    loop: list[asyncio.AbstractEventLoop] = []

    class Server(uvicorn.Server):
        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            loop.append(asyncio.get_running_loop())
            await super().serve(sockets)

    server = Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                   access_log=False, date_header=False, lifespan="off",
                                   ws="none", http="h11", loop="asyncio"))  # fmt: skip
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    host = varnish.url.split("//", 1)[1]
    client = http.client.HTTPConnection(host, timeout=5)

    def name_at_varnish(path: str) -> str:
        client.request("GET", path)
        response = client.getresponse()
        name: str = json.loads(response.read())["name"]
        return name

    def on_server_loop(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop[0]).result(10)

    times: list[float] = []
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start the shop for the purge row")
            time.sleep(0.02)
        # One untimed purge first: it starts the purge layer's drain task and opens
        # its connection to Varnish, a once-per-process cost.
        for i in range(-1, purges):
            product = 1 + i % 50
            path = f"/products/{product}"
            name_at_varnish(path)
            name_at_varnish(path)  # warm at Varnish (and at the origin)
            new_name = f"purge {i}"
            http_app.PRODUCTS[product] = {**http_app.PRODUCTS[product], "name": new_name}
            started = time.perf_counter()
            on_server_loop(cache.ainvalidate(tags=[f"product:{product}"], tenant="public"))
            while name_at_varnish(path) != new_name:
                if time.perf_counter() - started > 10:
                    raise RuntimeError(f"Varnish still served the old {path} after 10 s")
                time.sleep(0.0002)  # leave the GIL to the server thread between polls
            if i >= 0:
                times.append((time.perf_counter() - started) * 1000)
    finally:
        client.close()
        if server.started:
            on_server_loop(cache.aclose())
        server.should_exit = True
        thread.join(10)
        cache.close()
        varnish.stop()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 s runs, 1 round: a smoke run")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--purges", type=int, default=None, help="tag purges timed at Varnish")
    parser.add_argument("--serve", nargs=4, metavar=("KIND", "PORT", "DSN", "REDIS"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.serve:
        kind, port, dsn, redis_url = args.serve
        serve(kind, int(port), dsn, redis_url)
        return 0
    if shutil.which("wrk") is None:
        sys.exit("bench_http needs wrk: apt-get install -y wrk")
    rounds = args.rounds or (1 if args.quick else 5)
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    purges = args.purges or (10 if args.quick else 200)

    import peers
    import psycopg

    from scripts import services

    # Peer rows run from venvs of their own, made through peers.py's mechanism.
    rows, pythons, left_out = list(ROWS), dict[str, str](), list[str]()
    for kind, venv in PEER_ROWS.items():
        peers.PEERS.setdefault(venv, PEER_VENVS[venv])
        peers.DISTRIBUTIONS.setdefault(venv, PEER_DISTRIBUTIONS[venv])
        try:
            python = str(peers.python_for(venv))
            check = "import sys, importlib\nfor m in sys.argv[1:]: importlib.import_module(m)"
            done = subprocess.run([python, "-c", check, *PEER_IMPORTS[venv]],
                                  capture_output=True, text=True, check=False)  # fmt: skip
            if done.returncode != 0:
                error = (done.stderr.strip().splitlines() or ["no error text"])[-1]
                raise peers.PeerError(f"{venv} does not import its server's modules: {error}")
            pythons[kind] = python
        except peers.PeerError as exc:
            rows = [row for row in rows if row[0] != kind]
            left_out.append(f"- {kind} left out: {str(exc).splitlines()[0]}")

    pg = services.PostgresServer().start()
    redis = services.redis_server().start()
    servers: dict[str, subprocess.Popen[bytes]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="bench-http-"))
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS products")
            conn.execute("CREATE TABLE products (id int PRIMARY KEY, name text, price int)")
            conn.execute("INSERT INTO products SELECT i, 'Product ' || i, 10 * i "
                         "FROM generate_series(1, 1000) i")  # fmt: skip
        redis_url = f"redis://{redis.host}:{redis.port}/0"
        ports: dict[str, int] = {}
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        for kind, _, _ in rows:
            server = SERVER_OF.get(kind, kind)
            if server in servers:
                continue
            ports[server] = free_port()
            python = pythons.get(kind, sys.executable)
            servers[server] = subprocess.Popen(
                [python, __file__, "--serve", server, str(ports[server]), pg.dsn,
                 redis_url], env=env,
            )  # fmt: skip
        for port in ports.values():
            wait_http(f"http://127.0.0.1:{port}/products/1")
        lua = workdir / "miss.lua"
        lua.write_text(MISS_LUA)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['hit_memory']}/products/1") as r:
            etag = r.headers["ETag"]
        results: dict[str, list[tuple[float, float]]] = {kind: [] for kind, _, _ in rows}
        for round_no in range(rounds):
            order = rows[round_no % len(rows) :] + rows[: round_no % len(rows)]
            for kind, label, path in order:
                port = ports[SERVER_OF.get(kind, kind)]
                headers = {"If-None-Match": etag} if kind == "not_modified" else {}
                measured = wrk(f"http://127.0.0.1:{port}{path}", seconds, args.connections,
                               lua if kind == "miss" else None, headers)  # fmt: skip
                results[kind].append(measured)
                print(f"round {round_no + 1}: {label:32} {measured[0]:9.0f} req/s  "
                      f"p99 {measured[1]:7.2f} ms", flush=True)  # fmt: skip
    finally:
        for process in servers.values():
            process.terminate()
        for process in servers.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        redis.stop()
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    purge_ms = sorted(purge_to_fresh(purges))
    p99_ms = purge_ms[min(len(purge_ms) - 1, round(0.99 * (len(purge_ms) - 1)))]
    print(f"tag purge -> fresh at Varnish: p50 {statistics.median(purge_ms):.2f} ms  "
          f"p99 {p99_ms:.2f} ms  max {purge_ms[-1]:.2f} ms ({purges} purges)")  # fmt: skip

    median = {k: (statistics.median(r for r, _ in v), statistics.median(p for _, p in v))
              for k, v in results.items()}  # fmt: skip
    floor = median["raw"][0]
    lines = [[label, f"{median[k][0]:,.0f}", f"{median[k][1]:.2f}", f"{median[k][0] / floor:.0%}"]
             for k, label, _ in rows]  # fmt: skip
    table = peers.markdown_table(
        ["row", "req/s (median)", "p99 ms (median)", "of raw floor"], lines
    )
    peer_versions = {venv: peers.versions(venv) for kind, venv in PEER_ROWS.items()
                     if kind in pythons}  # fmt: skip
    checks = [
        ("HIT in-process >= 45% of the raw floor", median["hit_memory"][0] >= 0.45 * floor),
        ("HIT Redis-only > uncached", median["hit_redis"][0] > median["uncached"][0]),
        ("middleware costs non-cacheable <= 5%",
         median["cart_mw"][0] >= 0.95 * median["cart_bare"][0]),
    ]  # fmt: skip
    verdicts = "\n".join(
        [*(f"- {name}: {'met' if ok else 'NOT met'}" for name, ok in checks), *left_out]
    )
    body = (
        "## HTTP middleware (`bench_http.py`)\n\n"
        f"{json.dumps(peers.machine())}\n\npeers: {json.dumps(peer_versions)}\n\n"
        f"uvicorn, one worker; wrk -t1 -c{args.connections}, {seconds:g} s a run, "
        f"{rounds} interleaved rounds, median shown.\n\n{table}\n\n{verdicts}\n\n"
        f"Tag purge to fresh content at Varnish (`await cache.ainvalidate(tags=[...])` "
        f"with the Varnish purger as a cache layer, {purges} purges): "
        f"p50 {statistics.median(purge_ms):.2f} ms, p99 {p99_ms:.2f} ms, "
        f"max {purge_ms[-1]:.2f} ms.\n"
    )
    print("\n" + body)
    if not args.no_write:
        peers.update_results("http", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
