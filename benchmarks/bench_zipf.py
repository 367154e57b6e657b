"""Zipf workload with 1,000 concurrent asyncio callers and a slow loader, Redis shared.

The workload of cacheme's published comparison (its ``benchmarks/trace.py``):
200,000 requests whose keys follow a bounded Zipf law (P(k) ~ (10 + k)^-1.001,
k <= 200,000, fixed seed: ~55,600 distinct keys), consumed by 1,000 concurrent
asyncio workers; on a miss the loader sleeps 0.1 s (``asyncio.sleep``) and counts
its calls. Redis is flushed before each contender. Contenders: tieredcache
(MemoryLayer + RedisLayer with its default fast path; the same with
``fast_path=False``, all I/O through redis-py; RedisLayer only), cashews (redis,
with and without ``lock=True``), aiocache (``RedisCache`` + ``cached_stampede``)
and cacheme (its Redis storage; and local TinyLFU + Redis), each in its own venv.

Each contender runs ``--rounds`` times (default 3, alternating the order) straight
to Redis and is reported by its median run: wall time, loader calls, server-side
commands and read events (``INFO``), and the commands and socket writes its
client sent (redis-py's connections, and tieredcache's fast path). ``--proxy``
adds a pass of each through a counting TCP proxy to cross-check the client
counts from outside.

    .venv/bin/python benchmarks/bench_zipf.py              # full run (~4-5 min)
    .venv/bin/python benchmarks/bench_zipf.py --quick      # 20,000 requests
    .venv/bin/python benchmarks/bench_zipf.py --only tieredcache,cashews --proxy
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import logging
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import peers

HERE = Path(__file__).resolve().parent
TTL = 600
TENANT = "acme"
POOL = 100  # the peers' pool size in cacheme's published comparison


def zipf_keys(n: int, s: float, v: float, imax: int, seed: int) -> list[int]:
    """``n`` draws of k in [0, imax] with P(k) ~ (v + k)^-s (inverse CDF, seeded)."""
    cumulative = list(itertools.accumulate((v + k) ** -s for k in range(imax + 1)))
    total = cumulative[-1]
    rng = random.Random(seed)
    return [bisect.bisect_left(cumulative, rng.random() * total) for _ in range(n)]


def value(uid: int) -> dict[str, Any]:
    """cacheme's small benchmark payload."""
    return {"uid": uid, "name": "test123", "tags": ["a", "b", "c"], "rating": 3}


# --------------------------------------------------------------------------- children


class Loader:
    def __init__(self, sleep: float) -> None:
        self.calls = 0
        self.sleep = sleep

    async def __call__(self, uid: int) -> dict[str, Any]:
        self.calls += 1
        await asyncio.sleep(self.sleep)
        return value(uid)


def _count_redis_commands() -> dict[str, int]:
    """Count what redis-py's asyncio connections send (every contender uses redis-py).

    ``commands``: commands packed (a pipeline's commands each count; commands run inside
    a Lua script do not, the script call does); ``bursts``: ``send_packed_command`` calls,
    i.e. socket writes of one command or one pipeline. A wrapper costs ~0.2 µs per command,
    the same for every contender. ``--proxy`` cross-checks these counts from the outside.
    """
    from redis.asyncio.connection import Connection

    counts: dict[str, Any] = {"commands": 0, "bursts": 0, "by_name": {}}
    by_name: dict[str, int] = counts["by_name"]
    depth = [0]

    def name_of(args: Any) -> str:
        first = args[0] if args else b"?"
        text = first.decode() if isinstance(first, bytes) else str(first)
        return text.split()[0].upper()

    pack_command = Connection.pack_command
    pack_commands = Connection.pack_commands
    send_packed_command = Connection.send_packed_command

    def counting_pack_command(self: Any, *args: Any) -> Any:
        if depth[0] == 0:
            counts["commands"] += 1
            name = name_of(args)
            by_name[name] = by_name.get(name, 0) + 1
        return pack_command(self, *args)

    def counting_pack_commands(self: Any, commands: Any) -> Any:
        commands = list(commands)
        counts["commands"] += len(commands)
        for args in commands:
            name = name_of(args)
            by_name[name] = by_name.get(name, 0) + 1
        depth[0] += 1
        try:
            return pack_commands(self, commands)
        finally:
            depth[0] -= 1

    async def counting_send_packed_command(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["bursts"] += 1
        return await send_packed_command(self, *args, **kwargs)

    Connection.pack_command = counting_pack_command  # type: ignore[method-assign]
    Connection.pack_commands = counting_pack_commands  # type: ignore[method-assign]
    Connection.send_packed_command = counting_send_packed_command  # type: ignore[method-assign]
    _count_fast_path(counts, name_of)
    return counts


def _count_fast_path(counts: dict[str, Any], name_of: Callable[[Any], str]) -> None:
    """tieredcache's fast path writes on sockets of its own: count its commands and
    its socket writes the same way (a no-op in the peers' venvs)."""
    try:
        from tieredcache.layers.redis.wire.multiplex import MultiplexedConnection
    except ImportError:
        return
    by_name: dict[str, int] = counts["by_name"]
    execute = MultiplexedConnection.execute
    write = MultiplexedConnection._write

    def counting_execute(self: Any, *args: Any) -> Any:
        counts["commands"] += 1
        name = name_of(args)
        by_name[name] = by_name.get(name, 0) + 1
        return execute(self, *args)

    def counting_write(self: Any, *args: Any) -> Any:
        counts["bursts"] += 1
        return write(self, *args)

    MultiplexedConnection.execute = counting_execute  # type: ignore[method-assign]
    MultiplexedConnection._write = counting_write  # type: ignore[method-assign]


async def _drive(
    call: Callable[[int], Awaitable[Any]], keys: list[int], workers: int
) -> dict[str, Any]:
    counts = _count_redis_commands()
    it = iter(keys)
    wrong = 0
    errors = 0
    first_error = ""

    async def worker() -> None:
        nonlocal wrong, errors, first_error
        for uid in it:
            try:
                result = await call(uid)
            except Exception as exc:
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"[:200]
                continue
            if not isinstance(result, dict) or result.get("uid") != uid:
                wrong += 1

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    wall = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "wall": wall,
        "cpu": cpu,
        "wrong": wrong,
        "errors": errors,
        "first_error": first_error,
        "rss_mb": cpu1.ru_maxrss / 1024,
        "client": counts,
    }


def _load_keys(path: str) -> list[int]:
    return list(json.loads(Path(path).read_text()))


def _versions(*names: str) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


class _LogCounter(logging.Handler):
    """Counts the library's warnings (a failing layer is logged, not raised, by design)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        kind = message.rsplit(": ", 2)[-2] if message.count(": ") >= 2 else message
        kind = kind.split("failed during ")[-1]
        key = f"{message.split(' failed')[0]}: {kind[-60:]}"
        self.counts[key] = self.counts.get(key, 0) + 1


def child_tieredcache(
    url: str,
    keys: str,
    workers: int,
    sleep: float,
    l1: bool = True,
    pool: int = 0,
    profile: int = 0,
    fast_path: bool = True,
) -> dict[str, Any]:
    from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope

    log_counter = _LogCounter()
    logging.getLogger("tieredcache").addHandler(log_counter)
    logging.getLogger("tieredcache").propagate = False

    if pool:
        # The peers' pool: BlockingConnectionPool(pool), waiting for a free connection,
        # passed through the public client hooks with the RedisLayer's own timeouts.
        import redis
        import redis.asyncio
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        settings: dict[str, Any] = {
            "socket_timeout": 0.25,
            "socket_connect_timeout": 0.25,
            "retry": Retry(NoBackoff(), 0),
        }
        redis_layer = RedisLayer(
            client=redis.Redis.from_url(url, **settings),
            async_client_factory=lambda: redis.asyncio.Redis(
                connection_pool=redis.asyncio.BlockingConnectionPool.from_url(
                    url, max_connections=pool, timeout=None, **settings
                )
            ),
            fast_path=fast_path,
        )
    else:
        redis_layer = RedisLayer(url=url, fast_path=fast_path)
    layers: list[Any] = [redis_layer]
    if l1:
        layers.insert(0, MemoryLayer(maxsize=100_000))
    cache = TieredCache(namespace="zipf", layers=layers)
    load = Loader(sleep)

    @cache.cached(ttl=TTL)
    async def get_item(uid: int) -> dict:  # type: ignore[type-arg]
        return await load(uid)

    async def main() -> dict[str, Any]:
        key_list = _load_keys(keys)
        with tenant_scope(TENANT):
            if profile:
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
                result = await _drive(get_item, key_list[:profile], workers)
                prof.disable()
                result["profile"] = _profile_rows(prof, profile)
            else:
                result = await _drive(get_item, key_list, workers)
        result["layer_warnings"] = log_counter.counts
        stats = cache.stats()
        result["library_stats"] = {
            "loader.calls": stats.loader.calls,
            "loader.lock_waits": stats.loader.lock_waits,
            "loader.lease_rejections": stats.loader.lease_rejections,
            **{
                f"{name}.{f}": getattr(layer, f)
                for name, layer in stats.layers.items()
                for f in ("hits", "misses", "sets", "errors")
            },
            "breakers": dict(stats.breakers),
        }
        await cache.aclose()
        return result

    result = asyncio.run(main())
    return {**result, "loads": load.calls, "versions": _versions("tieredcache", "redis")}


def _profile_rows(prof: Any, requests: int) -> dict[str, Any]:
    import pstats

    stats = pstats.Stats(prof)
    areas: dict[str, float] = {}
    rows = []
    total = 0.0
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        total += tottime
        if "/tieredcache/" in file:
            area = "tieredcache/" + file.split("/tieredcache/")[-1]
        elif "/redis/" in file:
            area = "redis-py"
        elif "/asyncio/" in file:
            area = "asyncio"
        elif file.startswith("~"):
            area = "C functions"
        else:
            area = f"other Python ({Path(file).parent.name}/{Path(file).name})"
        areas[area] = areas.get(area, 0.0) + tottime
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else ""
        rows.append([f"{func} {where}".strip(), ncalls / requests, tottime, cumtime])
    by_own = sorted(rows, key=lambda r: -r[2])[:18]
    ours = [r for r in rows if "tieredcache/" in r[0]]
    by_cum = sorted(ours, key=lambda r: -r[3])[:10]
    return {
        "requests": requests,
        "total": total,
        "areas": sorted(areas.items(), key=lambda kv: -kv[1])[:12],
        "own": by_own,
        "cum": by_cum,
    }


def child_tieredcache_profile(
    url: str,
    keys: str,
    workers: int,
    sleep: float,
    requests: int = 50_000,
    pool: int = 0,
    fast_path: bool = True,
) -> dict[str, Any]:
    return child_tieredcache(
        url, keys, workers, sleep, pool=pool, profile=requests, fast_path=fast_path
    )


def child_tieredcache_l2(url: str, keys: str, workers: int, sleep: float) -> dict[str, Any]:
    return child_tieredcache(url, keys, workers, sleep, l1=False)


def child_tieredcache_redispy(url: str, keys: str, workers: int, sleep: float) -> dict[str, Any]:
    return child_tieredcache(url, keys, workers, sleep, pool=POOL, fast_path=False)


def child_cashews(
    url: str, keys: str, workers: int, sleep: float, lock: bool = False
) -> dict[str, Any]:
    from cashews import cache

    cache.setup(url, max_connections=POOL, wait_for_connection_timeout=300)
    load = Loader(sleep)

    @cache(ttl=TTL, lock=lock)
    async def get_item(uid: int) -> dict[str, Any]:
        return await load(uid)

    async def main() -> dict[str, Any]:
        result = await _drive(get_item, _load_keys(keys), workers)
        await cache.close()
        return result

    result = asyncio.run(main())
    return {**result, "loads": load.calls, "versions": _versions("cashews", "redis")}


def child_cashews_lock(url: str, keys: str, workers: int, sleep: float) -> dict[str, Any]:
    return child_cashews(url, keys, workers, sleep, lock=True)


def child_aiocache(url: str, keys: str, workers: int, sleep: float) -> dict[str, Any]:
    from urllib.parse import urlparse

    from aiocache import Cache, cached_stampede
    from redis.asyncio import BlockingConnectionPool

    u = urlparse(url)
    load = Loader(sleep)

    @cached_stampede(
        lease=30,
        ttl=TTL,
        cache=Cache.REDIS,
        endpoint=u.hostname,
        port=u.port,
        pool_max_size=POOL,
        connection_pool_class=BlockingConnectionPool,
        connection_pool_kwargs={"timeout": None},
    )
    async def get_item(uid: int) -> dict[str, Any]:
        return await load(uid)

    async def main() -> dict[str, Any]:
        result = await _drive(get_item, _load_keys(keys), workers)
        await get_item.cache.close()  # type: ignore[attr-defined]
        return result

    result = asyncio.run(main())
    return {**result, "loads": load.calls, "versions": _versions("aiocache", "redis")}


def child_cacheme(
    url: str, keys: str, workers: int, sleep: float, local: bool = False
) -> dict[str, Any]:
    from dataclasses import dataclass
    from datetime import timedelta

    import cacheme
    from cacheme.serializer import MsgPackSerializer

    load = Loader(sleep)
    cache_list = [cacheme.Cache(storage="redis", ttl=timedelta(seconds=TTL))]
    if local:
        cache_list.insert(0, cacheme.Cache(storage="local", ttl=timedelta(seconds=TTL)))

    @dataclass
    class ItemNode(cacheme.Node):  # type: ignore[misc]
        uid: int

        def key(self) -> str:
            return f"uid:{self.uid}"

        async def load(self) -> dict[str, Any]:
            return await load(self.uid)

        class Meta(cacheme.Node.Meta):  # type: ignore[misc]
            version = "v1"
            caches = cache_list  # set in the class body: the metaclass wires metrics then
            serializer = MsgPackSerializer()

    async def get_item(uid: int) -> Any:
        return await cacheme.get(ItemNode(uid=uid))

    async def main() -> dict[str, Any]:
        await cacheme.register_storage("redis", cacheme.Storage(url=url, pool_size=POOL))
        if local:
            await cacheme.register_storage(
                "local", cacheme.Storage(url="local://tlfu", size=100_000)
            )
        return await _drive(get_item, _load_keys(keys), workers)

    result = asyncio.run(main())
    return {**result, "loads": load.calls, "versions": _versions("cacheme", "redis", "theine")}


def child_cacheme_local(url: str, keys: str, workers: int, sleep: float) -> dict[str, Any]:
    return child_cacheme(url, keys, workers, sleep, local=True)


CHILDREN = {
    "tieredcache": child_tieredcache,
    "tieredcache_l2": child_tieredcache_l2,
    "tieredcache_profile": child_tieredcache_profile,
    "tieredcache_redispy": child_tieredcache_redispy,
    "cashews": child_cashews,
    "cashews_lock": child_cashews_lock,
    "aiocache": child_aiocache,
    "cacheme": child_cacheme,
    "cacheme_local": child_cacheme_local,
}

# (name, label, venv, config note)
CONTENDERS = [
    (
        "tieredcache",
        "**tieredcache** L1+L2",
        "project",
        "MemoryLayer(100k) + RedisLayer, defaults (lock on, fast path on)",
    ),
    (
        "tieredcache_redispy",
        "tieredcache L1+L2, redis-py I/O",
        "project",
        f"as above with fast_path=False: every command through redis-py, "
        f"BlockingConnectionPool({POOL}) via async_client_factory",
    ),
    ("tieredcache_l2", "tieredcache L2 only", "project", "RedisLayer only, defaults"),
    ("cashews", "cashews", "cashews", f"redis, max_connections={POOL}"),
    ("cashews_lock", "cashews lock=True", "cashews", f"redis, lock=True, max_connections={POOL}"),
    (
        "aiocache",
        "aiocache cached_stampede",
        "aiocache",
        f"RedisCache, lease=30, BlockingConnectionPool({POOL})",
    ),
    ("cacheme", "cacheme", "cacheme", f"Redis storage, pool {POOL}, msgpack"),
    ("cacheme_local", "cacheme local+redis", "cacheme", "local TinyLFU(100k) + Redis storage"),
]


# --------------------------------------------------------------------------- Redis and proxy


def _resp(host: str, port: int, *args: str) -> bytes:
    """Send one command with a raw socket (so it is no contender's client) and read the reply."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args
    )
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(payload)
        data = b""
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
            if data[:1] in (b"+", b"-", b":") and data.endswith(b"\r\n"):
                break
            if data[:1] == b"$":
                head, _, rest = data.partition(b"\r\n")
                if len(rest) >= int(head[1:]) + 2:
                    break
    return data


def _info(host: str, port: int) -> dict[str, Any]:
    text = _resp(host, port, "INFO", "all").decode(errors="replace")
    out: dict[str, Any] = {}
    for line in text.splitlines()[1:]:
        key, sep, val = line.partition(":")
        if not sep:
            continue
        if key.startswith("cmdstat_"):
            fields = dict(part.split("=") for part in val.split(","))
            out[key] = int(fields["calls"])
        elif key.startswith("db"):
            fields = dict(part.split("=") for part in val.split(","))
            out[f"keys_{key}"] = int(fields["keys"])
        else:
            out[key] = val
    return out


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    commands: dict[str, int] = {}
    for key, calls in after.items():
        if key.startswith("cmdstat_") and key not in ("cmdstat_info", "cmdstat_flushall"):
            diff = calls - before.get(key, 0)
            if diff:
                commands[key[8:]] = diff
    return {
        "commands": commands,
        "commands_total": sum(commands.values()),
        # One read event per INFO of ours; the "before" INFO is not in the delta.
        "reads": int(after["total_reads_processed"]) - int(before["total_reads_processed"]) - 1,
        "connections": int(after["total_connections_received"])
        - int(before["total_connections_received"])
        - 1,
        "keys": sum(v for k, v in after.items() if k.startswith("keys_")),
    }


class Proxy:
    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = _free_port()
        self.stats = Path(tempfile.mkdtemp(prefix="zipf-proxy-")) / "stats.json"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Proxy:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "_resp_proxy.py"),
                str(self.port),
                self.upstream[0],
                str(self.upstream[1]),
                str(self.stats),
            ]
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        return self

    def counts(self) -> dict[str, int]:
        return dict(json.loads(self.stats.read_text()))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- report


def _fmt_int(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else str(x)


def _top_commands(commands: dict[str, int], n: int = 5) -> str:
    top = sorted(commands.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{k.upper()} {v:,}" for k, v in top)


def main() -> int:
    if peers.child_main(CHILDREN):
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--sleep", type=float, default=0.1, help="loader sleep, seconds")
    parser.add_argument("--s", type=float, default=1.001, help="Zipf exponent")
    parser.add_argument("--v", type=float, default=10.0, help="Zipf offset")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", default="", help="comma-separated contender names")
    parser.add_argument(
        "--proxy", action="store_true", help="add a pass through the counting TCP proxy"
    )
    parser.add_argument("--quick", action="store_true", help="20,000 requests")
    parser.add_argument(
        "--profile-requests",
        type=int,
        default=30_000,
        help="cProfile tieredcache on this many first requests (0: no profile)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of each contender (median reported)"
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    peers.add_source_argument(parser)
    args = parser.parse_args()
    print(peers.use_snapshot(args.source), file=sys.stderr)
    args.no_proxy = not args.proxy
    if args.quick:
        args.requests = 20_000
    contenders = [c for c in CONTENDERS if not args.only or c[0] in args.only.split(",")]

    keys = zipf_keys(args.requests, args.s, args.v, args.requests, args.seed)
    distinct = len(set(keys))
    keys_file = Path(tempfile.mkdtemp(prefix="zipf-")) / "keys.json"
    keys_file.write_text(json.dumps(keys))
    print(f"{args.requests:,} requests, {distinct:,} distinct keys", file=sys.stderr)

    sys.path.insert(0, str(peers.ROOT))
    from scripts.services import RedisServer

    results: dict[str, dict[str, Any]] = {}
    cpus = os.sched_getaffinity(0)
    pinned = len(cpus & {0, 1}) == 2
    t_start = time.monotonic()
    with RedisServer() as server:
        host, port = server.host, server.port
        redis_v = peers.redis_version(host, port)
        redis_pid = int(_info(host, port)["process_id"])
        try:
            if pinned:  # Redis (and the proxy) on CPU 1, the contender on CPU 0
                os.sched_setaffinity(redis_pid, {1})
            runs: dict[str, list[dict[str, Any]]] = {}
            for round_ in range(args.rounds):
                # Alternate the order, so that no contender always runs first or last.
                order = contenders if round_ % 2 == 0 else contenders[::-1]
                for name, label, venv, _note in order:
                    entry = results.setdefault(name, {"label": label, "venv": venv})
                    if "error" in entry:
                        continue
                    params = {
                        "url": f"redis://{host}:{port}/0",
                        "keys": str(keys_file),
                        "workers": args.workers,
                        "sleep": args.sleep,
                    }
                    _resp(host, port, "FLUSHALL")
                    before = _info(host, port)
                    print(f"{name} ({venv}) round {round_ + 1} ...", file=sys.stderr, flush=True)
                    if pinned:
                        os.sched_setaffinity(0, {0})
                    try:
                        run = peers.measure(venv, __file__, name, params, timeout=900)
                    except peers.PeerError as exc:
                        entry["error"] = str(exc).splitlines()[0][:300]
                        print(f"  failed: {entry['error']}", file=sys.stderr)
                        continue
                    finally:
                        os.sched_setaffinity(0, cpus)
                    run["server"] = _delta(before, _info(host, port))
                    runs.setdefault(name, []).append(run)
                    print(
                        f"  {run['wall']:.1f} s, loads {run['loads']:,}, "
                        f"commands {run['server']['commands_total']:,}",
                        file=sys.stderr,
                    )
                    if args.no_proxy or round_ > 0:
                        continue
                    _resp(host, port, "FLUSHALL")
                    with Proxy(host, port) as proxy:
                        if pinned and proxy.proc is not None:
                            os.sched_setaffinity(proxy.proc.pid, {1})
                        params["url"] = f"redis://127.0.0.1:{proxy.port}/0"
                        if pinned:
                            os.sched_setaffinity(0, {0})
                        try:
                            proxied = peers.measure(venv, __file__, name, params, timeout=900)
                            time.sleep(0.6)  # let the proxy write its final counts
                            entry["proxy"] = proxy.counts()
                            entry["proxy"]["wall"] = proxied["wall"]
                            entry["proxy"]["loads"] = proxied["loads"]
                        except peers.PeerError as exc:
                            entry["proxy"] = {"error": str(exc).splitlines()[0][:200]}
                        finally:
                            os.sched_setaffinity(0, cpus)
            # Each contender is reported by its median run (by wall time), with the
            # spread of all its runs.
            for name, done in runs.items():
                done.sort(key=lambda run: float(run["wall"]))
                results[name].update(done[len(done) // 2])
                results[name]["walls"] = [float(run["wall"]) for run in done]
        finally:
            os.sched_setaffinity(0, cpus)
        for name, pool, fast in (("tieredcache", 0, True), ("tieredcache_redispy", POOL, False)):
            if not args.profile_requests or "error" in results.get(name, {"error": 1}):
                continue
            print(f"{name} under cProfile ...", file=sys.stderr, flush=True)
            _resp(host, port, "FLUSHALL")
            params = {
                "url": f"redis://{host}:{port}/0",
                "keys": str(keys_file),
                "workers": args.workers,
                "sleep": args.sleep,
                "requests": min(args.profile_requests, args.requests),
                "pool": pool,
                "fast_path": fast,
            }
            try:
                if pinned:
                    os.sched_setaffinity(0, {0})
                prof = peers.measure("project", __file__, "tieredcache_profile", params)
                results[name]["profile"] = prof["profile"]
                results[name]["profile_wall"] = prof["wall"]
            except peers.PeerError as exc:
                print(f"  profile failed: {exc}", file=sys.stderr)
            finally:
                os.sched_setaffinity(0, cpus)
    print(f"total {time.monotonic() - t_start:.0f} s", file=sys.stderr)

    body = _report(args, contenders, results, distinct, redis_v, pinned)
    print(body)
    if not args.no_write:
        peers.update_results("zipf", body)
    return 0


def _report(
    args: argparse.Namespace,
    contenders: list[tuple[str, str, str, str]],
    results: dict[str, dict[str, Any]],
    distinct: int,
    redis_v: str,
    pinned: bool,
) -> str:
    m = peers.machine()
    header = (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}; {m['python']}; {m['date']}; "
        f"{m['tree']}. "
        f"Redis {redis_v} on 127.0.0.1 (local process, no persistence)"
        + ("; Redis and the proxy pinned to CPU 1, the contender to CPU 0" if pinned else "")
        + ".\n"
        f"Workload (cacheme's published comparison): {args.requests:,} requests, keys drawn "
        f"from a bounded Zipf law P(k) ~ ({args.v:g} + k)^-{args.s:g}, k <= {args.requests:,}, "
        f"seed {args.seed} -> **{distinct:,} distinct keys**; {args.workers:,} concurrent "
        f"asyncio workers in one event loop; the loader sleeps {args.sleep:g} s "
        f"(`asyncio.sleep`) and counts its calls; value = a 4-field dict; TTL {TTL} s; "
        f"Redis flushed before each run. Peers' pools as in that comparison ({POOL} "
        f"connections). Wall time = first request to last answer, in the child; each "
        f"contender ran {args.rounds} times in alternating order and is reported by its "
        f"median run (all runs' range in brackets).\n\n"
        f"Columns: `server cmds` = Redis `INFO commandstats` calls delta (every command "
        f"Redis executed, **including the ones run inside Lua scripts**); `read events` = "
        f"`total_reads_processed` delta (client -> server bursts as Redis read them, i.e. "
        f"round trips; pipelined commands read together count once); `client cmds` and "
        f"`client bursts` = counted in the client, in redis-py's asyncio `Connection` "
        f"(every contender uses redis-py) and, for tieredcache's fast path, in its "
        f"multiplexed connection: commands sent (a Lua script call is one command; "
        f"each command of a pipeline counts) and socket writes (`send_packed_command` "
        f"calls; the fast path's writes of one or many commands)."
        + (
            ""
            if args.no_proxy
            else " A second run of each contender through a counting TCP proxy "
            "(`_resp_proxy.py`) cross-checks the client counts from outside the process "
            "(table below)."
        )
    )
    rows = []
    for name, _label, _venv, note in contenders:
        e = results.get(name, {})
        label = e.get("label", name)
        if "error" in e:
            rows.append([label, note, "failed: " + e["error"], *[""] * 11])
            continue
        srv = e["server"]
        problems = []
        if e.get("errors"):
            problems.append(f"{e['errors']:,} exceptions ({e['first_error']})")
        if e.get("wrong"):
            problems.append(f"{e['wrong']:,} wrong values")
        for what, count in (e.get("layer_warnings") or {}).items():
            problems.append(f"{count:,} logged, not raised: {what}")
        rows.append(
            [
                label,
                note,
                _wall(e),
                f"{e['cpu']:.1f} s",
                _fmt_int(e["loads"]),
                f"{e['loads'] / distinct:.2f}",
                _fmt_int(srv["commands_total"]),
                _fmt_int(srv["reads"]),
                _fmt_int(e["client"]["commands"]),
                f"{e['client']['commands'] / distinct:.2f}",
                _fmt_int(e["client"]["bursts"]),
                _top_commands(e["client"].get("by_name", {})),
                _top_commands(srv["commands"]),
                "; ".join(problems) or "ok",
            ]
        )
    table = peers.markdown_table(
        [
            "contender",
            "config",
            "wall",
            "client CPU",
            "loader calls",
            "calls / distinct",
            "server cmds",
            "read events",
            "client cmds",
            "client cmds / distinct",
            "client bursts",
            "top client commands",
            "top server commands (incl. inside Lua)",
            "errors",
        ],
        rows,
    )
    ok = {n: e for n, e in results.items() if "error" not in e}
    proxy_rows = [
        [
            e["label"],
            _fmt_int(e["proxy"].get("commands", "-")),
            _fmt_int(e["proxy"].get("bursts", "-")),
            _fmt_int(e["proxy"].get("connections", "-")),
            _fmt_int(e["proxy"].get("loads", "-")),
            e["proxy"].get("error", "ok"),
        ]
        for e in ok.values()
        if "proxy" in e
    ]
    lines = ["## Zipf, 1,000 concurrent callers (`bench_zipf.py`)\n", header + "\n", table + "\n"]
    others = {n: e for n, e in ok.items() if not n.startswith("tieredcache")}
    mine = [n for n in ("tieredcache", "tieredcache_redispy") if n in ok]
    if mine:
        ratio_rows = []
        for n in mine:
            t = ok[n]
            for e in others.values():
                ratio_rows.append(
                    [
                        t["label"],
                        e["label"],
                        _ratio(e["wall"], t["wall"]),
                        _ratio(e["loads"], t["loads"]),
                        _ratio(e["server"]["commands_total"], t["server"]["commands_total"]),
                        _ratio(e["server"]["reads"], t["server"]["reads"]),
                        _ratio(e["client"]["commands"], t["client"]["commands"]),
                    ]
                )
        lines.append("Ratios, peer ÷ tieredcache (above 1: tieredcache does less or is faster):\n")
        lines.append(
            peers.markdown_table(
                [
                    "tieredcache run",
                    "peer",
                    "wall",
                    "loader calls",
                    "server cmds",
                    "read events",
                    "client cmds",
                ],
                ratio_rows,
            )
            + "\n"
        )
        lines.append(_targets({n: ok[n] for n in mine}, others, distinct) + "\n")
    counter_rows = [
        [e["label"], ", ".join(f"`{k}` {v}" for k, v in e["library_stats"].items())]
        for n, e in ok.items()
        if n.startswith("tieredcache") and e.get("library_stats")
    ]
    if counter_rows:
        lines.append(
            "tieredcache's own counters (`cache.stats()`) after each run; `redis.sets` below "
            "the loader calls means fills that never reached Redis:\n"
        )
        lines.append(peers.markdown_table(["run", "counters"], counter_rows) + "\n")
    if proxy_rows:
        lines.append(
            "Cross-check through the counting TCP proxy (a second run of the same workload; "
            "its wall time is not comparable and not reported):\n"
        )
        lines.append(
            peers.markdown_table(
                ["contender", "commands", "write bursts", "connections", "loader calls", "status"],
                proxy_rows,
            )
            + "\n"
        )
    lines.append(_plot_and_link(contenders, ok))
    for n in ("tieredcache", "tieredcache_redispy"):
        if ok.get(n, {}).get("profile"):
            lines.append(_profile_text(ok[n]))
    lines.append("Re-run: `.venv/bin/python benchmarks/bench_zipf.py`\n")
    return "\n".join(lines)


def _profile_text(ours: dict[str, Any]) -> str:
    prof = ours["profile"]
    n = prof["requests"]
    total = prof["total"]
    out = [
        f"### Where the time goes: {ours['label'].replace('**', '')}\n",
        f"cProfile of the first {n:,} requests of the same workload (a separate run; under "
        f"the profiler it took {ours.get('profile_wall', 0):.1f} s). Own time summed by "
        f"where the code lives, as a share of all profiled time and per request:\n",
        peers.markdown_table(
            ["area", "share", "µs per request"],
            [[a, f"{t / total:.0%}", f"{t / n * 1e6:.1f}"] for a, t in prof["areas"]],
        ),
        "\nFunctions with the most own time:\n",
        peers.markdown_table(
            ["function", "calls per request", "own µs per request", "cumulative µs per request"],
            [
                [f, f"{c:.2f}", f"{t / n * 1e6:.2f}", f"{ct / n * 1e6:.2f}"]
                for f, c, t, ct in prof["own"]
            ],
        ),
        "\ntieredcache functions by cumulative time (includes what they call; for a "
        "coroutine cProfile counts each resumption as a call):\n",
        peers.markdown_table(
            ["function", "calls per request", "cumulative µs per request"],
            [[f, f"{c:.2f}", f"{ct / n * 1e6:.2f}"] for f, c, _t, ct in prof["cum"]],
        ),
    ]
    return "\n".join(out) + "\n"


def _wall(entry: dict[str, Any]) -> str:
    walls = entry.get("walls") or [entry["wall"]]
    if len(walls) == 1:
        return f"{entry['wall']:.1f} s"
    return f"{entry['wall']:.1f} s ({min(walls):.1f}-{max(walls):.1f})"


def _ratio(a: float, b: float) -> str:
    return f"{a / max(b, 1):.2f}x"


def _targets(
    mine: dict[str, dict[str, Any]], others: dict[str, dict[str, Any]], distinct: int
) -> str:
    # The targets are loader calls, round trips and wall time; the command
    # counts are reported beside them (a Lua script is one command on the wire but
    # several inside Redis), marked "fewer"/"more" rather than met/missed.
    metrics: list[tuple[str, str, Callable[[dict[str, Any]], float], bool]] = [
        ("fewest round trips (read events)", "", lambda e: e["server"]["reads"], True),
        ("lowest wall time", " s", lambda e: e["wall"], True),
        ("(not a target) client commands", "", lambda e: e["client"]["commands"], False),
        ("(not a target) server commands", "", lambda e: e["server"]["commands_total"], False),
    ]
    rows = []
    for ours in mine.values():
        label = ours["label"]
        ok = ours["loads"] == distinct
        rows.append(
            [
                label,
                "loader calls == distinct keys",
                f"{ours['loads']:,} vs {distinct:,}",
                "met" if ok else "**missed**",
            ]
        )
        for what, unit, metric, target in metrics:
            if not others:
                continue
            best = min(others.values(), key=metric)
            value, theirs = metric(ours), metric(best)
            if target:
                status = "met" if value <= theirs else "**missed**"
            else:
                status = "fewer" if value <= theirs else "more"
            rows.append(
                [
                    label,
                    what,
                    f"{value:,.1f}{unit} vs best peer {theirs:,.1f}{unit} ({best['label']})",
                    status,
                ]
            )
    table = peers.markdown_table(["tieredcache run", "target", "measured", "status"], rows)
    return "Targets:\n\n" + table


def _plot_and_link(contenders: list[tuple[str, str, str, str]], ok: dict[str, Any]) -> str:
    names = [n for n, *_ in contenders if n in ok]
    if not names:
        return ""
    labels = [ok[n]["label"].replace("**", "") for n in names]

    def series(metric: Callable[[dict[str, Any]], float]) -> dict[str, list[float]]:
        return {label: [metric(ok[n])] for n, label in zip(names, labels, strict=True)}

    spec = {
        "title": "Zipf workload: 200k requests, 1,000 concurrent callers (lower is better)",
        "panels": [
            {
                "title": "wall time",
                "ylabel": "seconds",
                "groups": ["wall"],
                "fmt": "{:.1f}",
                "series": series(lambda e: e["wall"]),
                "highlight": "tieredcache L1+L2",
            },
            {
                "title": "loader calls",
                "ylabel": "calls",
                "groups": ["loads"],
                "series": series(lambda e: e["loads"]),
                "highlight": "tieredcache L1+L2",
            },
            {
                "title": "Redis commands executed (log)",
                "ylabel": "commands",
                "groups": ["server cmds"],
                "log": True,
                "series": series(lambda e: max(1, e["server"]["commands_total"])),
                "highlight": "tieredcache L1+L2",
            },
        ],
    }
    error = peers.plot(spec, HERE / "zipf.png")
    return "![Zipf](zipf.png)\n" if error is None else f"(no plot: {error})\n"


if __name__ == "__main__":
    sys.exit(main())
