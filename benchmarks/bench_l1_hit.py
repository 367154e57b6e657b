"""L1 (in-process) hit: a decorated call whose value is already cached in memory.

Sync: tieredcache (MemoryLayer, tenant in scope, metrics on) against
functools.lru_cache, cachetools.cached(TTLCache), theine's Memoize and
dogpile.cache's memory backend. Async: tieredcache against cashews (mem://)
and aiocache (SimpleMemoryCache), one event loop, awaiting in a loop.

Each contender runs in its own child process (peers in their own venvs), in
two rounds (forward, then reverse order) to cancel drift; the table reports the
median and best ns/call over all repeats of both rounds.

    .venv/bin/python benchmarks/bench_l1_hit.py            # full run (~2-3 min)
    .venv/bin/python benchmarks/bench_l1_hit.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import _harness as h
import peers

HERE = Path(__file__).resolve().parent
TTL = 600
MAXSIZE = 100_000
NKEYS = 1000
TENANT = "acme"


def payload(x: int) -> dict[str, Any]:
    return {"id": x, "name": "widget", "price": 9.99, "tags": ["a", "b"]}


def _versions(*names: str) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


# --------------------------------------------------------------------------- sync children


def _run_sync(f: Any, loads: list[int], repeat: int, target: float) -> dict[str, Any]:
    keys = list(range(NKEYS))
    for k in keys:
        f(k)
    f(1)
    before = len(loads)
    same = h.time_sync("f(1)", {"f": f}, repeat=repeat, target=target)
    cycle = h.time_sync(
        "for k in keys: f(k)", {"f": f, "keys": keys}, per=NKEYS, repeat=repeat, target=target
    )
    if f(7) != payload(7):
        raise AssertionError(f"wrong value {f(7)!r}")
    return {"same": same, "cycle": cycle, "loads_during_timing": len(loads) - before}


def child_plain(repeat: int, target: float) -> dict[str, Any]:
    loads: list[int] = []

    def f(x: int) -> dict[str, Any]:
        return payload(x)

    result = _run_sync(f, loads, repeat, target)
    result["loads_during_timing"] = None
    return result


def child_lru_cache(repeat: int, target: float) -> dict[str, Any]:
    import functools

    loads: list[int] = []

    @functools.lru_cache(maxsize=MAXSIZE)
    def f(x: int) -> dict[str, Any]:
        loads.append(x)
        return payload(x)

    return _run_sync(f, loads, repeat, target)


def child_cachetools(repeat: int, target: float) -> dict[str, Any]:
    import cachetools

    loads: list[int] = []

    @cachetools.cached(cachetools.TTLCache(maxsize=MAXSIZE, ttl=TTL))
    def f(x: int) -> dict[str, Any]:
        loads.append(x)
        return payload(x)

    return {**_run_sync(f, loads, repeat, target), "versions": _versions("cachetools")}


def _tieredcache(async_: bool) -> tuple[Any, Any, list[int]]:
    from tieredcache import MemoryLayer, TieredCache

    cache = TieredCache(namespace="bench", layers=[MemoryLayer(maxsize=MAXSIZE)])
    loads: list[int] = []
    if async_:

        async def af(x: int) -> dict[str, Any]:
            loads.append(x)
            return payload(x)

        return cache, cache.cached(ttl=TTL)(af), loads

    def f(x: int) -> dict[str, Any]:
        loads.append(x)
        return payload(x)

    return cache, cache.cached(ttl=TTL)(f), loads


def child_tieredcache(repeat: int, target: float) -> dict[str, Any]:
    from tieredcache import tenant_scope

    cache, f, loads = _tieredcache(False)
    with tenant_scope(TENANT):
        result = _run_sync(f, loads, repeat, target)
        result["breakdown"] = _breakdown(cache, f)
        result["profile"] = _profile(f)
    stats = cache.stats()
    result["hits_counted"] = stats.layers["memory"].hits
    cache.close()
    return {**result, "versions": _versions("tieredcache", "cachetools")}


def child_theine(repeat: int, target: float) -> dict[str, Any]:
    from datetime import timedelta

    from theine import Memoize

    loads: list[int] = []

    @Memoize(MAXSIZE, timedelta(seconds=TTL))
    def f(x: int) -> dict[str, Any]:
        loads.append(x)
        return payload(x)

    return {**_run_sync(f, loads, repeat, target), "versions": _versions("theine", "theine-core")}


def child_dogpile(repeat: int, target: float) -> dict[str, Any]:
    from dogpile.cache import make_region

    region = make_region().configure("dogpile.cache.memory", expiration_time=TTL)
    loads: list[int] = []

    @region.cache_on_arguments()
    def f(x: int) -> dict[str, Any]:
        loads.append(x)
        return payload(x)

    return {**_run_sync(f, loads, repeat, target), "versions": _versions("dogpile.cache")}


# --------------------------------------------------------------------------- async children


async def _run_async(f: Any, loads: list[int], repeat: int, target: float) -> dict[str, Any]:
    keys = list(range(NKEYS))
    for k in keys:
        await f(k)
    before = len(loads)
    same = await h.time_async(f, [1], repeat=repeat, target=target)
    cycle = await h.time_async(f, keys, repeat=repeat, target=target)
    value = await f(7)
    if value != payload(7):
        raise AssertionError(f"wrong value {value!r}")
    return {"same": same, "cycle": cycle, "loads_during_timing": len(loads) - before}


def child_plain_async(repeat: int, target: float) -> dict[str, Any]:
    async def f(x: int) -> dict[str, Any]:
        return payload(x)

    result = asyncio.run(_run_async(f, [], repeat, target))
    result["loads_during_timing"] = None
    return result


def child_tieredcache_async(repeat: int, target: float) -> dict[str, Any]:
    from tieredcache import tenant_scope

    cache, f, loads = _tieredcache(True)

    async def main() -> dict[str, Any]:
        with tenant_scope(TENANT):
            result = await _run_async(f, loads, repeat, target)
        await cache.aclose()
        return result

    return {**asyncio.run(main()), "versions": _versions("tieredcache")}


def child_cashews(repeat: int, target: float) -> dict[str, Any]:
    from cashews import cache

    cache.setup("mem://")
    loads: list[int] = []

    @cache(ttl=TTL)
    async def f(x: int) -> dict[str, Any]:
        loads.append(x)
        return payload(x)

    return {**asyncio.run(_run_async(f, loads, repeat, target)), "versions": _versions("cashews")}


def child_aiocache(repeat: int, target: float) -> dict[str, Any]:
    from aiocache import Cache, cached

    loads: list[int] = []

    @cached(ttl=TTL, cache=Cache.MEMORY)
    async def f(x: int) -> dict[str, Any]:
        loads.append(x)
        return payload(x)

    result = asyncio.run(_run_async(f, loads, repeat, target))
    return {**result, "versions": _versions("aiocache")}


# --------------------------------------------------------------------------- where the time goes


def _breakdown(cache: Any, f: Any) -> dict[str, float | str]:
    """ns of the whole hit and of the Python primitives a tenant-aware TTL hit is made of.

    Uses no library internals (they change): the cProfile table says which functions the
    library's hit actually runs; this table prices the building blocks on this machine.
    """
    import collections
    import threading
    import time
    from contextvars import ContextVar

    import cachetools

    del cache
    alias = (f, TENANT, (1,))
    var: ContextVar[str | None] = ContextVar("t", default=TENANT)
    counters = [0] * 64
    per = {TENANT: counters}
    lru: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(MAXSIZE)
    lru[alias] = 1

    class Slot:
        __slots__ = ("refresh_at", "value")

        def __init__(self) -> None:
            self.refresh_at = time.time() + TTL
            self.value = payload(1)

    class Instance:
        def __call__(self, *args: Any, **kwargs: Any) -> None:
            return None

    def closure(*args: Any, **kwargs: Any) -> None:
        return None

    hits = {alias: Slot()}
    recent: collections.deque[Any] = collections.deque(maxlen=1024)
    get, remember, now, var_get = hits.get, recent.append, time.time, var.get

    def floor(*args: Any, **kwargs: Any) -> Any:  # the least a tenant-aware TTL hit can do
        tenant = var_get()
        slot = get((f, tenant, args))
        if slot is not None and now() < slot.refresh_at:
            remember(alias)
            per.get(tenant)[0] += 1  # type: ignore[index]
            return slot.value
        return None

    env = {
        "f": f,
        "alias": alias,
        "plain": hits,
        "var": var,
        "lock": threading.Lock(),
        "time": time.time,
        "per": per,
        "obj": Instance(),
        "closure": closure,
        "args": (1,),
        "self": f,
        "tenant": TENANT,
        "floor": floor,
        "lru": lru,
        "recent": recent,
    }
    steps = {
        "whole decorated call f(1)": "f(1)",
        "floor: closure with ContextVar + tuple key + dict.get + expiry + deque + counter": (
            "floor(1)"
        ),
        "call a closure def w(*args, **kwargs): return None": "closure(1)",
        "call an instance with __call__(self, *args, **kwargs)": "obj(1)",
        "ContextVar.get()": "var.get()",
        "build the alias tuple (self, tenant, args)": "(self, tenant, args)",
        "dict.get(alias)": "plain.get(alias)",
        "cachetools LRUCache[alias] (Python __getitem__ + move_to_end)": "lru[alias]",
        "with threading.Lock(): pass": "with lock: pass",
        "deque(maxlen).append(alias)": "recent.append(alias)",
        "time.time()": "time()",
        "counters: dict.get(tenant) + list item += 1": "per.get(tenant)[0] += 1",
        "empty timeit loop (subtract from each)": "pass",
    }
    out: dict[str, float | str] = {}
    for name, stmt in steps.items():
        try:
            out[name] = min(h.time_sync(stmt, env, repeat=5, target=0.1))
        except Exception as exc:
            out[name] = f"n/a ({type(exc).__name__})"
    return out


def _profile(f: Any, n: int = 200_000) -> list[list[Any]]:
    """Python-level functions run per hit (cProfile call counts / n) and their own time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        f(1)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, ncalls, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if ncalls >= n and "_profile" not in func:
            where = f"{Path(file).name}:{line}" if line else file
            rows.append([f"{func} ({where})", ncalls / n, tottime / n * 1e9])
    rows.sort(key=lambda r: -r[2])
    return rows[:12]


CHILDREN = {
    "plain": child_plain,
    "lru_cache": child_lru_cache,
    "cachetools": child_cachetools,
    "tieredcache": child_tieredcache,
    "theine": child_theine,
    "dogpile": child_dogpile,
    "plain_async": child_plain_async,
    "tieredcache_async": child_tieredcache_async,
    "cashews": child_cashews,
    "aiocache": child_aiocache,
}

# (label, venv, child)
SYNC = [
    ("uncached function (reference)", "project", "plain"),
    ("functools.lru_cache", "project", "lru_cache"),
    ("cachetools.cached(TTLCache)", "project", "cachetools"),
    ("**tieredcache** (MemoryLayer)", "project", "tieredcache"),
    ("theine Memoize", "theine", "theine"),
    ("dogpile.cache memory", "dogpile", "dogpile"),
]
ASYNC = [
    ("uncached async function (reference)", "project", "plain_async"),
    ("**tieredcache** (MemoryLayer)", "project", "tieredcache_async"),
    ("cashews mem://", "cashews", "cashews"),
    ("aiocache SimpleMemoryCache", "aiocache", "aiocache"),
]


# --------------------------------------------------------------------------- orchestration


def _measure_all(
    contenders: list[tuple[str, str, str]], rounds: int, params: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for r in range(rounds):
        order = contenders if r % 2 == 0 else list(reversed(contenders))
        for label, venv, child in order:
            entry = merged.setdefault(
                child, {"label": label, "venv": venv, "same": [], "cycle": []}
            )
            if "error" in entry:
                continue
            print(f"  round {r + 1}: {child} ({venv}) ...", file=sys.stderr, flush=True)
            try:
                result = peers.measure(venv, __file__, child, params)
            except peers.PeerError as exc:
                entry["error"] = str(exc).splitlines()[0][:300]
                print(f"    failed: {entry['error']}", file=sys.stderr)
                continue
            entry["same"] += result.pop("same")
            entry["cycle"] += result.pop("cycle")
            entry.update(result)
    for entry in merged.values():
        if "error" not in entry:
            entry["same_s"] = h.summary(entry["same"])
            entry["cycle_s"] = h.summary(entry["cycle"])
    return merged


def _cell(entry: dict[str, Any], variant: str) -> str:
    if "error" in entry:
        return "failed"
    s = entry[f"{variant}_s"]
    return f"{h.fmt_ns(s['median'])} ({h.fmt_ns(s['best'])})"


def _versions_text(entry: dict[str, Any]) -> str:
    v = entry.get("versions") or {}
    return ", ".join(f"{k} {x}" for k, x in v.items()) or "stdlib"


def _table(results: dict[str, dict[str, Any]], ours: str, faster_is: str) -> str:
    base = results[ours]
    rows = []
    for child, entry in results.items():
        ratios = []
        for variant in ("same", "cycle"):
            if "error" in entry or "error" in base:
                ratios.append("-")
                continue
            a, b = base[f"{variant}_s"]["median"], entry[f"{variant}_s"]["median"]
            ratios.append(h.fmt_ratio(a / b if faster_is == "ours/them" else b / a))
        loads = entry.get("loads_during_timing")
        rows.append(
            [
                entry["label"],
                _cell(entry, "same"),
                _cell(entry, "cycle"),
                *ratios,
                "-" if loads is None else str(loads),
                _versions_text(entry) if "error" not in entry else entry["error"],
            ]
        )
        del child
    if faster_is == "ours/them":
        ratio_heads = ["tieredcache ÷ this, same key", "tieredcache ÷ this, 1,000 keys"]
    else:
        ratio_heads = ["this ÷ tieredcache, same key", "this ÷ tieredcache, 1,000 keys"]
    headers = [
        "contender",
        "same key: median (best)",
        "1,000 keys: median (best)",
        *ratio_heads,
        "loads while timed",
        "versions",
    ]
    return peers.markdown_table(headers, rows)


def _targets(sync: dict[str, Any], async_: dict[str, Any]) -> tuple[str, list[str]]:
    rows = []
    misses = []

    def ratio(res: dict[str, Any], a: str, b: str, variant: str) -> float | None:
        if "error" in res[a] or "error" in res[b]:
            return None
        return float(res[a][f"{variant}_s"]["median"] / res[b][f"{variant}_s"]["median"])

    checks = [
        ("sync: tieredcache / cachetools <= 1.0", sync, "tieredcache", "cachetools", 1.0, "le"),
        ("sync: tieredcache / lru_cache <= 8", sync, "tieredcache", "lru_cache", 8.0, "le"),
        ("async: cashews / tieredcache >= 10", async_, "cashews", "tieredcache_async", 10.0, "ge"),
        ("async: aiocache / tieredcache >= 10", async_, "aiocache", "tieredcache_async", 10, "ge"),
    ]
    for name, res, a, b, limit, op in checks:
        for variant, vname in (("same", "same key"), ("cycle", "1,000 keys")):
            r = ratio(res, a, b, variant)
            if r is None:
                rows.append([name, vname, "n/a", "not measured"])
                continue
            ok = r <= limit if op == "le" else r >= limit
            rows.append([name, vname, h.fmt_ratio(r), "met" if ok else "**missed**"])
            if not ok:
                misses.append(f"{name} ({vname}): {r:.2f}")
    return peers.markdown_table(["target", "variant", "measured", "status"], rows), misses


def _breakdown_text(entry: dict[str, Any]) -> str:
    lines = []
    bd = entry.get("breakdown")
    if isinstance(bd, dict):
        empty = bd.get("empty timeit loop (subtract from each)", 0.0)
        empty = empty if isinstance(empty, float) else 0.0
        rows = [
            [name, f"{ns:.0f}", f"{max(0.0, ns - empty):.0f}"]
            if isinstance(ns, float)
            else [name, ns, ""]
            for name, ns in bd.items()
        ]
        lines.append(
            "The sync tieredcache hit and the Python building blocks of such a hit, each "
            "timed alone in the same process (best of 5, ns; `net` = minus the empty timeit "
            "loop). `floor` is a hand-written closure doing the least a tenant-scoped TTL hit "
            "with LRU bookkeeping and a hit counter can do: it bounds what any pure-Python "
            "decorator can reach here:\n"
        )
        lines.append(peers.markdown_table(["step", "ns", "net ns"], rows))
    elif bd:
        lines.append(str(bd))
    prof = entry.get("profile")
    if prof:
        lines.append(
            "\ncProfile of 200,000 sync hits: Python-level functions per hit and their own "
            "time per hit (cProfile inflates each Python call; read it for *which* calls "
            "run, the table above for *how long*):\n"
        )
        rows = [[name, f"{calls:.2f}", f"{ns:.0f}"] for name, calls, ns in prof]
        lines.append(peers.markdown_table(["function", "calls per hit", "own ns per hit"], rows))
    return "\n".join(lines)


def _plot(sync: dict[str, Any], async_: dict[str, Any], out: Path) -> str | None:
    def panel(res: dict[str, Any], title: str, ours: str) -> dict[str, Any]:
        series = {}
        for entry in res.values():
            if "error" in entry:
                continue
            label = entry["label"].replace("**", "").split(" (")[0]
            series[label] = [entry["same_s"]["median"], entry["cycle_s"]["median"]]
        return {
            "title": title,
            "ylabel": "ns per call (median, log scale)",
            "log": True,
            "groups": ["same key", "1,000 keys"],
            "series": series,
            "highlight": "tieredcache",
        }

    spec = {
        "title": "L1 hit: ns per decorated call (lower is better)",
        "panels": [
            panel(sync, "sync", "tieredcache"),
            panel(async_, "async (one event loop)", "tieredcache_async"),
        ],
    }
    return peers.plot(spec, out)


def main() -> int:
    if peers.child_main(CHILDREN):
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="repeats per child per round")
    parser.add_argument("--target", type=float, default=0.2, help="seconds per repeat")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (alternating order)")
    parser.add_argument("--quick", action="store_true", help="3 repeats of 0.05 s, 1 round")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    peers.add_source_argument(parser)
    args = parser.parse_args()
    print(peers.use_snapshot(args.source), file=sys.stderr)
    peers.keep_results(not args.no_write)
    if args.quick:
        args.repeat, args.target, args.rounds = 3, 0.05, 1
    params = {"repeat": args.repeat, "target": args.target}

    print("sync contenders:", file=sys.stderr)
    sync = _measure_all(SYNC, args.rounds, params)
    print("async contenders:", file=sys.stderr)
    async_ = _measure_all(ASYNC, args.rounds, params)

    m = peers.machine()
    n = args.rounds * args.repeat
    header = (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}; {m['python']}; {m['date']}; "
        f"{m['tree']}.\n"
        f"Workload: one decorated call with one int argument whose value (a 4-field dict) is "
        f"already in the in-process cache; `same key` repeats f(1), `1,000 keys` cycles over "
        f"f(0..999) (all cached). Caches sized {MAXSIZE:,}, TTL {TTL} s where the API has one. "
        f"tieredcache: `TieredCache(layers=[MemoryLayer(maxsize={MAXSIZE:,})])`, "
        f"`@cache.cached(ttl={TTL})`, metrics on (default), `tenant_scope('{TENANT}')` entered "
        f"once outside the loop. Each contender in its own process (peers in their own venv, "
        f"same CPython); {args.rounds} rounds in alternating order x {args.repeat} repeats of "
        f"~{args.target} s (timeit loop, GC off); cells are median (best) of the {n} repeats, "
        f"ns per call including the loop. Async: one event loop, `await f(x)` in a for loop."
    )
    sync_table = _table(sync, "tieredcache", "ours/them")
    async_table = _table(async_, "tieredcache_async", "them/ours")
    targets, misses = _targets(sync, async_)
    png = HERE / "l1_hit.png"
    plot_error = _plot(sync, async_, png)
    body = "\n".join(
        [
            "## L1 hit (`bench_l1_hit.py`)\n",
            header + "\n",
            "### Sync\n",
            sync_table + "\n",
            "### Async\n",
            async_table + "\n",
            "### Targets\n",
            targets + "\n",
            "![L1 hit](l1_hit.png)\n" if plot_error is None else f"(no plot: {plot_error})\n",
            "### Where the time goes (tieredcache sync hit)\n",
            _breakdown_text(sync.get("tieredcache", {})) + "\n",
            "Re-run: `.venv/bin/python benchmarks/bench_l1_hit.py`\n",
        ]
    )
    print(body)
    if misses:
        print("MISSED: " + "; ".join(misses), file=sys.stderr)
    if not args.no_write:
        peers.update_results("l1_hit", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
