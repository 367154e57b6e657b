"""L2 (Redis) hit with no in-process layer, against raw redis-py GET + msgpack decode.

tieredcache is configured with ``layers=[RedisLayer(url=...)]`` only, so every
call reads Redis. The baseline is what a hand-written cache-aside read costs:
``Decoder(dict).decode(client.get(key))`` with a redis-py client built with the
same connection settings as the RedisLayer (timeouts, no retries, pool size)
against the same Redis, reading the same msgpack payload bytes. Sync with
``redis.Redis``, async with ``redis.asyncio.Redis`` (one event loop). The two
sides alternate (ABAB...) in one process so drift cancels; the ratio is the
median of the per-pair ratios. tieredcache runs with its default fast path (its
GET on a socket of its own, hiredis-parsed) and, for comparison, with
``fast_path=False`` (through redis-py, like the baseline).

    .venv/bin/python benchmarks/bench_l2_hit.py           # full run (~2 min)
    .venv/bin/python benchmarks/bench_l2_hit.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _harness as h
import _redis
import peers

HERE = Path(__file__).resolve().parent
TTL = 600
TENANT = "acme"
RAW_KEY = "bench:raw:1"


def payload(x: int) -> dict[str, Any]:
    """A 10-field record, the shape of a typical cached row."""
    return {
        "id": x,
        "sku": f"SKU-{x:08d}",
        "name": "Stainless steel water bottle, 750 ml",
        "price": 24.99,
        "currency": "EUR",
        "in_stock": True,
        "quantity": 1375,
        "tags": ["outdoor", "kitchen", "gift"],
        "rating": 4.6,
        "updated_at": "2026-11-02T10:15:00Z",
    }


def _client_kwargs(asynchronous: bool = False) -> dict[str, Any]:
    """The RedisLayer's own client settings (see tieredcache/layers/redis.py): the same
    blocking pool (256 connections, 1 s wait), timeouts and no retries."""
    from redis.backoff import NoBackoff

    if asynchronous:
        from redis.asyncio.retry import Retry
    else:
        from redis.retry import Retry  # type: ignore[assignment]

    return {
        "socket_timeout": 0.25,
        "socket_connect_timeout": 0.25,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": 256,
    }


def _pairs(a: Callable[[], Any], b: Callable[[], Any], pairs: int, target: float) -> dict[str, Any]:
    """Time ``a`` and ``b`` alternately; ns per call of each, per pair."""
    ta, tb = timeit.Timer(a), timeit.Timer(b)
    na, ea = ta.autorange()
    nb, eb = tb.autorange()
    na = max(1, int(na * target / ea))
    nb = max(1, int(nb * target / eb))
    sa, sb = [], []
    for _ in range(pairs):
        sa.append(ta.timeit(na) / na * 1e9)
        sb.append(tb.timeit(nb) / nb * 1e9)
    return {"ours": sa, "raw": sb}


async def _apairs(a: Any, b: Any, pairs: int, target: float) -> dict[str, Any]:
    sa: list[float] = []
    sb: list[float] = []
    for _ in range(pairs):
        sa += await h.time_async(a, [1], repeat=1, target=target)
        sb += await h.time_async(b, [1], repeat=1, target=target)
    return {"ours": sa, "raw": sb}


def _make(url: str, async_: bool, fast_path: bool = True) -> tuple[Any, Any, list[int]]:
    from tieredcache import RedisLayer, TieredCache

    cache = TieredCache(namespace="bench", layers=[RedisLayer(url=url, fast_path=fast_path)])
    loads: list[int] = []
    if async_:

        async def aget_product(x: int) -> dict:  # type: ignore[type-arg]
            loads.append(x)
            return payload(x)

        return cache, cache.cached(ttl=TTL)(aget_product), loads

    def get_product(x: int) -> dict:  # type: ignore[type-arg]
        loads.append(x)
        return payload(x)

    return cache, cache.cached(ttl=TTL)(get_product), loads


def child_sync(url: str, pairs: int, target: float, fast_path: bool = True) -> dict[str, Any]:
    import msgspec
    import redis

    from tieredcache import tenant_scope

    cache, f, loads = _make(url, False, fast_path)
    raw = redis.Redis.from_pool(
        redis.BlockingConnectionPool.from_url(url, timeout=1.0, **_client_kwargs())
    )
    raw.set(RAW_KEY, msgspec.msgpack.encode(payload(1)))
    decode = msgspec.msgpack.Decoder(dict).decode

    def raw_get() -> Any:
        return decode(raw.get(RAW_KEY))

    with tenant_scope(TENANT):
        f(1)
        assert f(1) == payload(1) == raw_get()
        result = _pairs(lambda: f(1), raw_get, pairs, target)
        if fast_path:
            result["profile"] = _profile(lambda: f(1), 5_000)
            result["split"] = _split_sync(cache, f, raw, decode)
    stats = cache.stats()
    result["loads"] = len(loads)
    result["redis_hits"] = stats.layers["redis"].hits
    result["payload_bytes"] = len(msgspec.msgpack.encode(payload(1)))
    cache.close()
    raw.close()
    return result


def child_async(url: str, pairs: int, target: float, fast_path: bool = True) -> dict[str, Any]:
    import msgspec
    import redis.asyncio

    from tieredcache import tenant_scope

    cache, f, loads = _make(url, True, fast_path)
    decode = msgspec.msgpack.Decoder(dict).decode

    async def main() -> dict[str, Any]:
        raw = redis.asyncio.Redis.from_pool(
            redis.asyncio.BlockingConnectionPool.from_url(url, timeout=1.0, **_client_kwargs(True))
        )
        await raw.set(RAW_KEY, msgspec.msgpack.encode(payload(1)))

        async def raw_get(_: int) -> Any:
            return decode(await raw.get(RAW_KEY))

        with tenant_scope(TENANT):
            await f(1)
            assert await f(1) == payload(1) == await raw_get(1)
            result = await _apairs(f, raw_get, pairs, target)
            if fast_path:
                result["profile"] = await _aprofile(f, 5_000)
                result["split"] = await _split_async(cache, f, raw_get)
        await raw.aclose()
        await cache.aclose()
        return result

    result = asyncio.run(main())
    result["loads"] = len(loads)
    return result


def _rows(stats: Any, n: int) -> list[list[Any]]:
    by_area: dict[str, float] = {}
    rows = []
    for (file, line, func), (_cc, ncalls, tottime, _ct, _callers) in stats.stats.items():
        area = _area(file)
        by_area[area] = by_area.get(area, 0.0) + tottime
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else func
        rows.append([f"{func} ({where})", ncalls / n, tottime / n * 1e9])
    rows.sort(key=lambda r: -r[2])
    areas = [
        [f"[area] {k}", None, v / n * 1e9]
        for k, v in sorted(by_area.items(), key=lambda kv: -kv[1])
    ]
    return areas + rows[:15]


def _area(file: str) -> str:
    if "/tieredcache/" in file:
        return "tieredcache"
    if "/redis/" in file:
        return "redis-py"
    if "bench_l2_hit" in file:
        return "benchmark"
    if file.startswith("~"):
        return "C builtins (socket I/O, locks, msgspec, time, ...)"
    return "stdlib (Python)"


def _profile(call: Callable[[], Any], n: int) -> list[list[Any]]:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        call()
    prof.disable()
    return _rows(pstats.Stats(prof), n)


async def _aprofile(f: Any, n: int) -> list[list[Any]]:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        await f(1)
    prof.disable()
    return _rows(pstats.Stats(prof), n)


def _split_sync(cache: Any, f: Any, raw: Any, decode: Any) -> dict[str, float] | str:
    """Perf-counter split of a sync L2 hit, and its steps timed alone (best effort)."""
    import inspect
    import threading

    try:
        layer = cache.layers[0]
        original = layer.get
        spent = [0.0]

        def timed(key: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(key)
            finally:
                spent[0] += time.perf_counter() - start

        n = 20_000
        layer.get = timed
        try:
            start = time.perf_counter()
            for _ in range(n):
                f(1)
            total = time.perf_counter() - start
        finally:
            del layer.get
        key = f.key(1)
        stored = raw.get(f"{layer.keyspace.slot_of(key)}:v:{key.body}")
        env = {
            "raw": raw,
            "decode": decode,
            "RAW_KEY": RAW_KEY,
            "codec": cache.codec,
            "full": key.full,
            "stored": stored,
            "f": f,
            "sig": inspect.signature(f),
            "Event": threading.Event,
            "payload": stored[32:] if stored else b"",
            "layer": layer,
            "key": key,
        }
        steps = {
            "raw: client.get(key)": "raw.get(RAW_KEY)",
            "raw: client.mget([key, key2])": "raw.mget([RAW_KEY, RAW_KEY + ':gk'])",
            "raw: msgspec decode of the payload": "decode(payload)",
            "tieredcache: RedisLayer.get, tight loop": "layer.get(key)",
            "tieredcache: EntryCodec.decode": "codec.decode(full, stored, decode)",
            "tieredcache: f.key(1) (tenant + key build, public API)": "f.key(1)",
            "  inspect.Signature.bind(1) alone": "sig.bind(1)",
            "threading.Event() (a single-flight call's event)": "Event()",
        }
        out: dict[str, Any] = {
            "whole call (timed loop)": total / n * 1e9,
            "  inside RedisLayer.get (redis-py + network + store)": spent[0] / n * 1e9,
            "  outside it (tieredcache: key, request, guard, decode, back-fill)": (
                (total - spent[0]) / n * 1e9
            ),
        }
        for name, stmt in steps.items():
            try:
                out[name] = min(h.time_sync(stmt, env, repeat=3, target=0.1))
            except Exception as exc:  # a step whose API moved: say so, keep the rest
                out[name] = f"n/a ({type(exc).__name__}: {exc})"[:80]
        return out
    except Exception as exc:
        return f"split unavailable: {type(exc).__name__}: {exc}"


async def _split_async(cache: Any, f: Any, raw_get: Any) -> dict[str, float] | str:
    try:
        layer = cache.layers[0]
        original = layer.aget
        spent = [0.0]

        async def timed(key: Any) -> Any:
            start = time.perf_counter()
            try:
                return await original(key)
            finally:
                spent[0] += time.perf_counter() - start

        loop = asyncio.get_running_loop()
        n = 10_000
        layer.aget = timed
        try:
            start = time.perf_counter()
            for _ in range(n):
                await f(1)
            total = time.perf_counter() - start
        finally:
            del layer.aget
        return {
            "whole call (timed loop)": total / n * 1e9,
            "  inside RedisLayer.aget (redis-py + network + store)": spent[0] / n * 1e9,
            "  outside it (tieredcache: key, request, flow, single-flight task, guard, decode)": (
                (total - spent[0]) / n * 1e9
            ),
            "event-loop iterations per call, tieredcache": await _loop_turns(loop, lambda: f(1)),
            "event-loop iterations per call, raw GET + decode": await _loop_turns(
                loop, lambda: raw_get(1)
            ),
        }
    except Exception as exc:
        return f"split unavailable: {type(exc).__name__}: {exc}"


async def _loop_turns(loop: Any, call: Any, n: int = 2_000) -> float:
    """How many times the loop polls its selector per call (each is a trip through the loop)."""
    selector = loop._selector
    original = selector.select
    turns = [0]

    def counting(timeout: Any = None) -> Any:
        turns[0] += 1
        return original(timeout)

    selector.select = counting
    try:
        for _ in range(n):
            await call()
    finally:
        del selector.select
    return turns[0] / n


def child_sync_redispy(url: str, pairs: int, target: float) -> dict[str, Any]:
    return child_sync(url, pairs, target, fast_path=False)


def child_async_redispy(url: str, pairs: int, target: float) -> dict[str, Any]:
    return child_async(url, pairs, target, fast_path=False)


CHILDREN = {
    "sync": child_sync,
    "async": child_async,
    "sync_redispy": child_sync_redispy,
    "async_redispy": child_async_redispy,
}


# --------------------------------------------------------------------------- orchestration

# Where Redis and the benchmark process run. On this kind of VM a wake-up across cores
# costs ~40 µs more than on the same core, so an unpinned run flips between two RTTs and
# the ratio with it; pinning makes both numbers stable, and reporting both is honest.
PLACEMENTS = [
    ("same core", "redis and client pinned to CPU 0", {0}, {0}),
    ("cross-core", "redis on CPU 1, client on CPU 0", {1}, {0}),
]
MODES = [("sync", "sync (redis.Redis)"), ("async", "async (redis.asyncio, one loop)")]
# The same with RedisLayer(fast_path=False): every command through redis-py, like the
# baseline. Shown for what the fast path buys; the target is for the default.
INFO_MODES = [
    ("sync_redispy", "sync, fast_path=False (not the target)"),
    ("async_redispy", "async, fast_path=False (not the target)"),
]


def _ratios(result: dict[str, Any]) -> list[float]:
    return [a / b for a, b in zip(result["ours"], result["raw"], strict=True)]


def _row(placement: str, label: str, result: dict[str, Any]) -> list[str]:
    if "error" in result:
        return [placement, label, "failed", "", "", result["error"][:200], ""]
    ours = h.summary(result["ours"])
    raw = h.summary(result["raw"])
    ratios = _ratios(result)
    ratio = statistics.median(ratios)
    return [
        placement,
        label,
        f"{h.fmt_ns(ours['median'])} ({h.fmt_ns(ours['best'])})",
        f"{h.fmt_ns(raw['median'])} ({h.fmt_ns(raw['best'])})",
        h.fmt_ns(ours["median"] - raw["median"]),
        f"{ratio:.3f} ({min(ratios):.3f}-{max(ratios):.3f})",
        "-" if "fast_path=False" in label else "met" if ratio <= 1.15 else "**missed**",
    ]


def _profile_text(title: str, rows: list[list[Any]]) -> str:
    table = [
        [name, "" if calls is None else f"{calls:.2f}", f"{ns:,.0f}"] for name, calls, ns in rows
    ]
    return f"{title}\n\n" + peers.markdown_table(
        ["function", "calls per hit", "own ns per hit"], table
    )


def _split_text(mode: str, split: Any) -> str:
    if not isinstance(split, dict):
        return str(split)
    rows = [
        [name, v if isinstance(v, str) else f"{v:.2f}" if "iterations" in name else f"{v:,.0f}"]
        for name, v in split.items()
    ]
    return (
        f"Perf-counter split of the {mode} hit (the RedisLayer call timed from outside with a "
        f"wrapper set on the instance), and single steps timed alone (best of 3, ns):\n\n"
        + peers.markdown_table(["part", "ns per call"], rows)
    )


def main() -> int:
    if peers.child_main(CHILDREN):
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=15, help="A/B pairs per mode")
    parser.add_argument("--target", type=float, default=0.3, help="seconds per timed block")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    peers.add_source_argument(parser)
    args = parser.parse_args()
    print(peers.use_snapshot(args.source), file=sys.stderr)
    peers.keep_results(not args.no_write)
    if args.quick:
        args.pairs, args.target = 4, 0.1

    results: dict[tuple[str, str], dict[str, Any]] = {}
    server_cost: list[str] = []
    cpus = os.sched_getaffinity(0)
    pin = len(os.sched_getaffinity(0) & {0, 1}) == 2
    placements = PLACEMENTS if pin else [("unpinned", "fewer than 2 CPUs", set(), set())]
    with _redis.server() as server:
        url = server.url
        before = _redis.info(server.host, server.port)
        redis_v = before["redis_version"]
        redis_pid = int(before["process_id"])
        try:
            for name, _desc, redis_cpus, client_cpus in placements:
                if pin:
                    os.sched_setaffinity(redis_pid, redis_cpus)
                    os.sched_setaffinity(0, client_cpus)  # inherited by the child
                for mode, _label in MODES + INFO_MODES:
                    print(f"{name}, {mode} ...", file=sys.stderr, flush=True)
                    t0 = time.monotonic()
                    params = {"url": url, "pairs": args.pairs, "target": args.target}
                    try:
                        results[name, mode] = peers.measure("project", __file__, mode, params)
                    except peers.PeerError as exc:
                        results[name, mode] = {"error": str(exc)}
                    print(f"  {time.monotonic() - t0:.0f} s", file=sys.stderr)
        finally:
            os.sched_setaffinity(0, cpus)
        done = _redis.delta(before, _redis.info(server.host, server.port))
    for cmd in ("get", "mget"):
        if cmd in done["commands"]:
            calls, usec = done["commands"][cmd], done["usec"][cmd]
            server_cost.append(f"{cmd.upper()} {usec / max(calls, 1):.2f} µs/call")

    m = peers.machine()
    v = peers.versions("project", ["tieredcache", "redis", "hiredis", "msgspec"])
    any_ok = next((r for r in results.values() if "error" not in r), {})
    header = (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}; {m['python']}; {m['date']}; "
        f"{m['tree']}. "
        f"Redis {redis_v} on 127.0.0.1 (local process, no persistence). "
        + ", ".join(f"{k} {x}" for k, x in v.items())
        + ".\n"
        f"Workload: one decorated call `f(1)` returning a 10-field dict "
        f"({any_ok.get('payload_bytes', '?')} bytes as msgpack), already in Redis; tieredcache "
        f"with `layers=[RedisLayer(url=...)]` only (every call reads Redis), tenant in scope, "
        f"metrics on. Baseline: redis-py `GET` of the same payload bytes + "
        f"`msgspec.msgpack.Decoder(dict).decode`, client built with the RedisLayer's settings "
        f"(socket/connect timeout 0.25 s, no retries, a BlockingConnectionPool of 256 with "
        f"a 1 s wait), same Redis. {args.pairs} A/B "
        f"pairs of ~{args.target} s each, alternating in one process; cells are median (best) "
        f"per call; the ratio is the median (min-max) of per-pair ratios. Placement: "
        + "; ".join(f"`{n}` = {d}" for n, d, _r, _c in placements)
        + f". Server-side time per command, whole run: {'; '.join(server_cost)} "
        f"(a tieredcache hit is one plain GET). tieredcache's default fast path sends that "
        f"GET on a socket of its own (sync: one per thread; async: one multiplexed "
        f"connection per loop), packed and parsed by hiredis, not through redis-py's "
        f"client; the `fast_path=False` rows send it through redis-py like the baseline."
    )
    rows = [
        _row(name, label, results.get((name, mode), {"error": "not run"}))
        for name, _d, _r, _c in placements
        for mode, label in MODES + INFO_MODES
    ]
    table = peers.markdown_table(
        [
            "placement",
            "mode",
            "tieredcache L2 hit: median (best)",
            "raw GET + decode: median (best)",
            "overhead per call",
            "ratio (target <= 1.15)",
            "status",
        ],
        rows,
    )
    notes = []
    main_placement = placements[0][0]
    for mode, _label in MODES:
        result = results.get((main_placement, mode), {})
        if "split" in result:
            notes.append(_split_text(mode, result["split"]))
        if result.get("profile"):
            notes.append(
                _profile_text(
                    f"cProfile of 5,000 {mode} tieredcache L2 hits ({main_placement}; [area] rows "
                    f"sum own time by where the code lives; cProfile inflates Python-heavy code, "
                    f"so compare shares, not absolute ns):",
                    result["profile"],
                )
            )
    png = HERE / "l2_hit.png"
    groups = [f"{mode}, {name}" for name, _d, _r, _c in placements for mode, _l in MODES]
    ours, raws = [], []
    for name, _d, _r, _c in placements:
        for mode, _l in MODES:
            result = results.get((name, mode), {})
            ok = "error" not in result and result
            ours.append(statistics.median(result["ours"]) / 1000 if ok else None)
            raws.append(statistics.median(result["raw"]) / 1000 if ok else None)
    spec = {
        "title": "L2 (Redis) hit, no L1: µs per call, median of A/B pairs (lower is better)",
        "panels": [
            {
                "groups": groups,
                "ylabel": "µs per call",
                "fmt": "{:.1f}",
                "highlight": "tieredcache (RedisLayer only)",
                "series": {
                    "tieredcache (RedisLayer only)": ours,
                    "raw redis-py GET + msgspec decode": raws,
                },
            }
        ],
    }
    plot_error = peers.plot(spec, png)
    body = "\n".join(
        [
            "## L2 hit, L1 disabled (`bench_l2_hit.py`)\n",
            header + "\n",
            table + "\n",
            "![L2 hit](l2_hit.png)\n" if plot_error is None else f"(no plot: {plot_error})\n",
            "### Where the time goes (tieredcache L2 hit)\n",
            "\n\n".join(notes) + "\n",
            "Re-run: `.venv/bin/python benchmarks/bench_l2_hit.py`\n",
        ]
    )
    print(body)
    if not args.no_write:
        peers.update_results("l2_hit", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
