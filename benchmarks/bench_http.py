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

Targets (issue 11): HIT in-process >= 45% of the raw floor of the same run;
HIT Redis-only > uncached; the middleware costs non-cacheable <= 5%.

    .venv/bin/python benchmarks/bench_http.py [--quick] [--no-write] [--rounds N]

Needs ``wrk`` (``apt-get install wrk``), uvicorn in the project venv, and the local
PostgreSQL / Redis servers of ``scripts/services.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
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
]
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

    from examples.http_app import build_app, create_app
    from tieredcache import MemoryLayer, RedisLayer, TieredCache

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
    if kind == "raw":
        bodies = {b"/products/1": b'{"id": 1, "name": "Product 1", "price": 10}'}

        async def app(scope: Any, receive: Any, send: Any) -> None:
            body = bodies.get(scope["raw_path"], b"{}")
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode())]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
    elif kind in ("uncached", "cart_bare"):
        app = build_app(load_product)[0]
    else:
        layers: list[Any] = (
            [RedisLayer(url=redis_url)] if kind == "hit_redis" else [MemoryLayer(maxsize=200_000)]
        )
        app = create_app(TieredCache("bench", layers), load_product=load_product)
    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning",
                access_log=False, date_header=False, lifespan="off", ws="none")  # fmt: skip


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 s runs, 1 round: a smoke run")
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--connections", type=int, default=32)
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

    import psycopg

    from scripts import services

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
        for kind, _, _ in ROWS:
            server = SERVER_OF.get(kind, kind)
            if server in servers:
                continue
            ports[server] = free_port()
            servers[server] = subprocess.Popen(
                [sys.executable, __file__, "--serve", server, str(ports[server]), pg.dsn,
                 redis_url], env=env,
            )  # fmt: skip
        for port in ports.values():
            wait_http(f"http://127.0.0.1:{port}/products/1")
        lua = workdir / "miss.lua"
        lua.write_text(MISS_LUA)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['hit_memory']}/products/1") as r:
            etag = r.headers["ETag"]
        results: dict[str, list[tuple[float, float]]] = {kind: [] for kind, _, _ in ROWS}
        for round_no in range(rounds):
            order = ROWS[round_no % len(ROWS) :] + ROWS[: round_no % len(ROWS)]
            for kind, label, path in order:
                port = ports[SERVER_OF.get(kind, kind)]
                headers = {"If-None-Match": etag} if kind == "not_modified" else {}
                measured = wrk(f"http://127.0.0.1:{port}{path}", seconds, args.connections,
                               lua if kind == "miss" else None, headers)  # fmt: skip
                results[kind].append(measured)
                print(f"round {round_no + 1}: {label:28} {measured[0]:9.0f} req/s  "
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

    median = {k: (statistics.median(r for r, _ in v), statistics.median(p for _, p in v))
              for k, v in results.items()}  # fmt: skip
    floor = median["raw"][0]
    rows = [[label, f"{median[k][0]:,.0f}", f"{median[k][1]:.2f}", f"{median[k][0] / floor:.0%}"]
            for k, label, _ in ROWS]  # fmt: skip
    from peers import machine, markdown_table, update_results

    table = markdown_table(["row", "req/s (median)", "p99 ms (median)", "of raw floor"], rows)
    checks = [
        ("HIT in-process >= 45% of the raw floor", median["hit_memory"][0] >= 0.45 * floor),
        ("HIT Redis-only > uncached", median["hit_redis"][0] > median["uncached"][0]),
        ("middleware costs non-cacheable <= 5%",
         median["cart_mw"][0] >= 0.95 * median["cart_bare"][0]),
    ]  # fmt: skip
    verdicts = "\n".join(f"- {name}: {'met' if ok else 'NOT met'}" for name, ok in checks)
    body = (
        "## HTTP middleware (`bench_http.py`)\n\n"
        f"{json.dumps(machine())}\n\n"
        f"uvicorn, one worker; wrk -t1 -c{args.connections}, {seconds:g} s a run, "
        f"{rounds} interleaved rounds, median shown.\n\n{table}\n\n{verdicts}\n"
    )
    print("\n" + body)
    if not args.no_write:
        update_results("http", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
