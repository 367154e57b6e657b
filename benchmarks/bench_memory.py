"""Memory per in-process entry, full-GC time and miss-fill time, side by side.

100,000 entries of a decorated ``def f(i: int) -> int`` (values are fresh ints,
distinct from the arguments):

- tieredcache: ``TieredCache("m", [MemoryLayer(maxsize=200_000)])``,
  ``@cache.cached(ttl=600)``, called under ``tenant_scope("t")``;
- ``cachetools.cached(TTLCache(maxsize=200_000, ttl=600))``;
- ``functools.lru_cache(maxsize=200_000)``.

Each contender runs in its own child process (nothing else's objects in its
heap), which measures, in this order:

1. fill time: N misses on a fresh cache, GC off during the loop (collections
   are reported on their own), median of ``--repeat`` fresh caches, us per miss;
2. full ``gc.collect()`` time with the N entries held, minus the same process
   before the fill (median of 5 passes each);
3. bytes per entry with tracemalloc: traced bytes after N misses minus before
   (after a warm-up call and a collection), divided by N, minus the bytes of
   the N value objects; and minus the N argument ints as well (every contender
   keeps its arguments: they are the user's, not the cache's bookkeeping).
   For tieredcache, also the allocation sites that hold the bytes.

    .venv/bin/python benchmarks/bench_memory.py            # full run (~1 min)
    .venv/bin/python benchmarks/bench_memory.py --quick    # smoke run (20,000 entries)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peers

HERE = Path(__file__).resolve().parent
TTL = 600
MAXSIZE = 200_000
FIRST = 1_000_000  # arguments start here: every int is a fresh object of one size


def f(i: int) -> int:
    return i * 2 + 1


# --------------------------------------------------------------------------- contenders


def make_tieredcache() -> tuple[Callable[[int], int], Any]:
    from tieredcache import MemoryLayer, TieredCache, tenant_scope

    cache = TieredCache("m", [MemoryLayer(maxsize=MAXSIZE)])
    scope = tenant_scope("t")
    scope.__enter__()  # left open while the cache lives (its exit resets the tenant)
    return cache.cached(ttl=TTL)(f), (cache, scope)


def make_ttlcache() -> tuple[Callable[[int], int], Any]:
    import cachetools

    store: Any = cachetools.TTLCache(maxsize=MAXSIZE, ttl=TTL)
    return cachetools.cached(store)(f), store


def make_lru_cache() -> tuple[Callable[[int], int], Any]:
    import functools

    return functools.lru_cache(maxsize=MAXSIZE)(f), None


MAKERS: dict[str, Callable[[], tuple[Callable[[int], int], Any]]] = {
    "tieredcache": make_tieredcache,
    "cachetools_ttl": make_ttlcache,
    "functools_lru": make_lru_cache,
}
LABELS = {
    "tieredcache": "tieredcache MemoryLayer",
    "cachetools_ttl": "cachetools.cached(TTLCache)",
    "functools_lru": "functools.lru_cache",
}


def _gc_ms() -> float:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _fill(cached: Callable[[int], int], n: int) -> float:
    """Seconds for n misses, GC off."""
    was = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for i in range(FIRST, FIRST + n):
            cached(i)
        return time.perf_counter() - start
    finally:
        if was:
            gc.enable()


def _int_bytes(n: int) -> float:
    """tracemalloc's bytes for one int of the arguments' and values' size."""
    holder: list[int] = [0] * n
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for j in range(n):
        holder[j] = FIRST + j * 2 + 1
    size = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    return size


def child(name: str, n: int, repeat: int) -> dict[str, Any]:
    make = MAKERS[name]
    fills = []
    for _ in range(repeat):
        cached, _store = make()
        cached(-1)  # warm-up: per-function and per-tenant state
        fills.append(_fill(cached, n) / n * 1e6)
        if cached(FIRST + 7) != f(FIRST + 7):
            raise AssertionError("wrong value")
        del cached, _store
        gc.collect()

    cached, store = make()
    cached(-1)
    gc_empty = _gc_ms()
    _fill(cached, n)
    gc_full = _gc_ms()
    del cached, store
    gc.collect()

    cached, _store = make()  # _store: held until measured
    tracemalloc.start(1)
    cached(-1)
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    snap_before = tracemalloc.take_snapshot()
    _fill(cached, n)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    snap_after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    sites = []
    if name == "tieredcache":
        for stat in snap_after.compare_to(snap_before, "lineno")[:12]:
            per = stat.size_diff / n
            if per >= 4:
                frame = stat.traceback[0]
                parts = Path(frame.filename).parts
                pkg = (
                    len(parts) - 1 - parts[::-1].index("tieredcache")
                    if "tieredcache" in parts
                    else -1
                )
                where = "/".join(parts[pkg:]) if pkg >= 0 else parts[-1]
                sites.append([f"{where}:{frame.lineno}", round(per, 1), stat.count_diff])
    one_int = _int_bytes(n)
    raw = (after - before) / n
    return {
        "n": n,
        "fill_us": statistics.median(fills),
        "fill_all": fills,
        "gc_empty_ms": gc_empty,
        "gc_full_ms": gc_full,
        "bytes_raw": raw,
        "int_bytes": one_int,
        "beyond_values": raw - one_int,
        "beyond_values_and_args": raw - 2 * one_int,
        "sites": sites,
    }


CHILDREN = {name: (lambda name=name, **kw: child(name, **kw)) for name in MAKERS}


# --------------------------------------------------------------------------- report


def _table(results: dict[str, dict[str, Any]]) -> str:
    base = results.get("cachetools_ttl")
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([LABELS[name], r["error"], "", "", "", ""])
            continue
        ratio = "-"
        if base and "error" not in base:
            ratio = f"{r['beyond_values'] / base['beyond_values']:.2f}x"
        rows.append(
            [
                LABELS[name],
                f"{r['beyond_values']:,.0f} B",
                ratio,
                f"{r['beyond_values_and_args']:,.0f} B",
                f"{r['gc_full_ms']:.1f} ms ({r['gc_full_ms'] - r['gc_empty_ms']:+.1f})",
                f"{r['fill_us']:.1f} us",
            ]
        )
    return peers.markdown_table(
        [
            "cache",
            "bytes/entry beyond values",
            "vs TTLCache",
            "beyond values and args",
            "full GC, filled (vs empty)",
            "fill a miss",
        ],
        rows,
    )


def _sites(result: dict[str, Any]) -> str:
    rows = [[f"`{where}`", f"{per:,.0f}", f"{count:,}"] for where, per, count in result["sites"]]
    return peers.markdown_table(["allocated at", "bytes/entry", "objects"], rows)


LAYOUT = """\
How the layer holds an entry (`tieredcache/layers/memory.py`, module docstring): one
dict from the call's alias to a slot, read without a lock; a second dict from the full
key to the alias for aliased entries only; LRU order as two links in the slot (no
`OrderedDict` node); the slot a `gc=False` msgspec struct of six pointers (value,
`refresh_at`, the `Entry`, the key or key+tags, two links); a stale window of 0 shares
one float for `fresh_until` and `stale_until`. What is left beyond the layer's own
objects is the engine's `Entry` and its floats (returned as the same object by
`get`, which the layer contract pins), the full key string, and the decorator's
alias tuple and the argument tuple it holds."""


def main() -> int:
    if peers.child_main(CHILDREN):
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000, help="entries per cache")
    parser.add_argument("--repeat", type=int, default=3, help="fresh caches filled for timing")
    parser.add_argument("--quick", action="store_true", help="20,000 entries, 1 timing fill")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    peers.add_source_argument(parser)
    args = parser.parse_args()
    print(peers.use_snapshot(args.source), file=sys.stderr)
    if args.quick:
        args.entries, args.repeat = 20_000, 1
    params = {"n": args.entries, "repeat": args.repeat}
    results: dict[str, dict[str, Any]] = {}
    for name in MAKERS:
        print(f"  {name} ...", file=sys.stderr)
        try:
            results[name] = peers.measure("project", __file__, name, params)
        except peers.PeerError as exc:
            results[name] = {"error": str(exc).splitlines()[0]}

    m = peers.machine()
    n = args.entries
    header = (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}; {m['python']}; {m['date']}; "
        f"{m['tree']}.\n"
        f"Workload: {n:,} misses of `def f(i: int) -> int` (distinct int arguments, fresh int "
        f"values), caches sized {MAXSIZE:,}, TTL {TTL} s. tieredcache: "
        f'`TieredCache("m", [MemoryLayer(maxsize={MAXSIZE:,})])`, `@cache.cached(ttl={TTL})`, '
        f'under `tenant_scope("t")`. Each cache in its own process. Bytes: tracemalloc, traced '
        f"bytes after the fill minus before, per entry, minus one value object (and, in the "
        f"next column, one argument int too: every cache keeps its arguments). Full GC: "
        f"`gc.collect()` with the entries held, median of 5, and its difference from the same "
        f"process before the fill. Fill: us per miss, GC off, median of {args.repeat} fresh "
        f"caches."
    )
    body = [
        "## Memory per in-process entry (`bench_memory.py`)\n",
        header + "\n",
        _table(results) + "\n",
    ]
    ours = results.get("tieredcache", {})
    if ours.get("sites"):
        body += ["### Where tieredcache's bytes go (tracemalloc, per entry)\n", _sites(ours) + "\n"]
    body += [LAYOUT + "\n", "Re-run: `.venv/bin/python benchmarks/bench_memory.py`\n"]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        peers.update_results("memory", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
