"""The sync API under threads: Zipf requests from 64 threads, a 0.01 s loader, Redis shared.

The key stream of ``bench_zipf.py`` (its bounded Zipf generator, here 50,000
requests), consumed by 64 threads that call a sync cached function; on a miss
the loader sleeps 0.01 s (``time.sleep``) and counts its calls. Redis is flushed
before each run. Contenders, each in its own process:

- tieredcache *before* and *after*: two source trees measured in the same run
  (``--before PATH``, default ``/work/before``; ``--after PATH``, default this
  repository's working tree); ``TieredCache(namespace, [MemoryLayer(100,000),
  RedisLayer(url=...)])``, a sync ``@cache.cached(ttl=600)`` function, each thread
  inside ``tenant_scope("bench")``;
- dogpile.cache: ``dogpile.cache.redis`` with ``distributed_lock=True``,
  ``@region.cache_on_arguments()`` (``get_or_create``), ``expiration_time`` and
  ``redis_expiration_time`` 600 s; its lock polls every ``lock_sleep`` (0.1 s by
  default), so a second row with ``lock_sleep=0.01`` shows it at the loader's pace.

The floor is what 64 threads need to run every distinct key's loader once:
distinct keys x 0.01 s / 64. Each contender runs ``--rounds`` times (default 3,
alternating the order) and is reported by its median run.

    .venv/bin/python benchmarks/bench_zipf_threads.py               # full run (~3 min)
    .venv/bin/python benchmarks/bench_zipf_threads.py --quick --no-write
    .venv/bin/python benchmarks/bench_zipf_threads.py --before /work/before --after /work/engine
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _redis
import peers
from bench_zipf import _LogCounter, _top_commands, _versions, value, zipf_keys

HERE = Path(__file__).resolve().parent
TTL = 600
TENANT = "bench"
DEFAULT_BEFORE = "/work/before"


# --------------------------------------------------------------------------- children


def _drive(
    call: Callable[[int], Any], keys: list[int], threads: int, enter: Callable[[], Any]
) -> dict[str, Any]:
    """Run ``call`` over ``keys`` from ``threads`` threads, each inside ``enter()``."""
    counts = _redis.count_client("sync")
    it = iter(keys)  # a list iterator's next() is atomic: each key is taken once
    lock = threading.Lock()
    tally = {"wrong": 0, "errors": 0}
    errors_by_type: dict[str, int] = {}
    first_error: list[str] = []
    start_line = threading.Barrier(threads + 1)

    def worker() -> None:
        wrong = errors = 0
        mine: dict[str, int] = {}
        start_line.wait()
        with enter():
            for uid in it:
                try:
                    result = call(uid)
                except Exception as exc:
                    errors += 1
                    kind = type(exc).__name__
                    mine[kind] = mine.get(kind, 0) + 1
                    if not first_error:
                        first_error.append(f"{kind}: {exc}"[:200])
                    continue
                if not isinstance(result, dict) or result.get("uid") != uid:
                    wrong += 1
        with lock:
            tally["wrong"] += wrong
            tally["errors"] += errors
            for kind, n in mine.items():
                errors_by_type[kind] = errors_by_type.get(kind, 0) + n

    pool = [threading.Thread(target=worker, name=f"caller-{i}") for i in range(threads)]
    for thread in pool:
        thread.start()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start_line.wait()
    start = time.perf_counter()
    for thread in pool:
        thread.join()
    wall = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall": wall,
        "cpu": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
        "wrong": tally["wrong"],
        "errors": tally["errors"],
        "errors_by_type": errors_by_type,
        "first_error": first_error[0] if first_error else "",
        "rss_mb": cpu1.ru_maxrss / 1024,
        "client": counts,
    }


def _steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests, all CPUs, since boot (0 if unknown).
    The loader's sleeps do not slow down on a busy host but the CPU work does, so
    the wall/floor ratio moves with it: each run reports how much was stolen."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _keys(path: str) -> list[int]:
    return list(json.loads(Path(path).read_text()))


def child_tieredcache(url: str, keys: str, threads: int, sleep: float) -> dict[str, Any]:
    import logging

    from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope

    log_counter = _LogCounter()
    logging.getLogger("tieredcache").addHandler(log_counter)
    logging.getLogger("tieredcache").propagate = False
    cache = TieredCache(
        namespace="zipf", layers=[MemoryLayer(maxsize=100_000), RedisLayer(url=url)]
    )
    calls = itertools.count()

    @cache.cached(ttl=TTL)
    def get_item(uid: int) -> dict:  # type: ignore[type-arg]
        next(calls)
        time.sleep(sleep)
        return value(uid)

    result = _drive(get_item, _keys(keys), threads, lambda: tenant_scope(TENANT))
    stats = cache.stats()
    result["library_stats"] = {
        "loader.calls": stats.loader.calls,
        "loader.lock_waits": stats.loader.lock_waits,
        "loader.lease_rejections": stats.loader.lease_rejections,
        "loader.timeouts": stats.loader.timeouts,
        **{
            f"{name}.{f}": getattr(layer, f)
            for name, layer in stats.layers.items()
            for f in ("hits", "misses", "sets", "errors")
        },
        "breakers": dict(stats.breakers),
    }
    result["layer_warnings"] = log_counter.counts
    result["logged_by_type"] = log_counter.by_type
    cache.close()
    return {
        **result,
        "loads": next(calls),
        "versions": _versions("redis", "hiredis"),
    }


def child_minimal(url: str, keys: str, threads: int, sleep: float) -> dict[str, Any]:
    """The protocol's floor: tieredcache's own wire (a blocking socket per thread) and
    Lua scripts, driven by the least code that does a miss: a dict as the in-process
    layer, read-or-lock, load, fill with the lease, no engine (no metrics, breaker,
    single-flight, XFetch, tags, tenants, codec). A caller that finds the fill lock
    held polls GET every millisecond. What "after" costs above this row is the engine."""
    import contextlib
    import json as json_
    import uuid
    from urllib.parse import urlparse

    from tieredcache.layers.redis._sync.store import FILL_LUA, GET_OR_LOCK_LUA
    from tieredcache.layers.redis.wire.direct import DirectConnections

    parsed = urlparse(url)
    conns = DirectConnections(host=parsed.hostname or "127.0.0.1", port=parsed.port or 6379)
    get_or_lock = conns.execute("SCRIPT", "LOAD", GET_OR_LOCK_LUA)
    fill = conns.execute("SCRIPT", "LOAD", FILL_LUA)
    memory: dict[int, Any] = {}
    calls = itertools.count()
    slot = "tc:{zipf:bench:0}"

    def get_item(uid: int) -> Any:
        found = memory.get(uid)
        if found is not None:
            return found
        body = f"get_item:{uid}"
        value_name, lock, gen = f"{slot}:v:{body}", f"{slot}:l:{body}", f"{slot}:gk:{body}"
        token = uuid.uuid4().hex
        deadline = int(time.time() * 1000) + 5000
        reply = conns.execute(
            "EVALSHA", get_or_lock, 3, value_name, lock, gen, token, 5000, deadline, 600_000
        )
        while reply[0] is None and reply[1] != 1:  # another caller fills it: poll
            time.sleep(0.001)
            stored = conns.execute("GET", value_name)
            if stored is not None:
                reply = [stored]
        if reply[0] is not None:
            found = memory[uid] = json_.loads(reply[0])
            return found
        next(calls)
        time.sleep(sleep)
        result = value(uid)
        conns.execute(
            "EVALSHA", fill, 5, value_name, gen, f"{slot}:kt:{body}", lock, f"{slot}:w:{body}",
            json_.dumps(result), 600_000, 0, 1, 660_000, 0, 600_000, token, "fills", body,
            reply[3] or b"",
        )  # fmt: skip
        memory[uid] = result
        return result

    result = _drive(get_item, _keys(keys), threads, contextlib.nullcontext)
    conns.close()
    return {**result, "loads": next(calls), "versions": _versions("redis", "hiredis")}


def child_dogpile(
    url: str, keys: str, threads: int, sleep: float, lock_sleep: float | None = None
) -> dict[str, Any]:
    import contextlib

    from dogpile.cache import make_region

    arguments: dict[str, Any] = {
        "url": url,
        "distributed_lock": True,
        "redis_expiration_time": TTL,
    }
    if lock_sleep is not None:
        arguments["lock_sleep"] = lock_sleep
    region = make_region().configure(
        "dogpile.cache.redis", expiration_time=TTL, arguments=arguments
    )
    calls = itertools.count()

    @region.cache_on_arguments()
    def get_item(uid: int) -> dict[str, Any]:
        next(calls)
        time.sleep(sleep)
        return value(uid)

    result = _drive(get_item, _keys(keys), threads, contextlib.nullcontext)
    return {
        **result,
        "loads": next(calls),
        "versions": _versions("dogpile.cache", "redis", "hiredis"),
    }


def child_dogpile_fastpoll(url: str, keys: str, threads: int, sleep: float) -> dict[str, Any]:
    return child_dogpile(url, keys, threads, sleep, lock_sleep=sleep)


CHILDREN = {
    "before": child_tieredcache,
    "after": child_tieredcache,
    "minimal": child_minimal,
    "dogpile": child_dogpile,
    "dogpile_fastpoll": child_dogpile_fastpoll,
}

# (name, label, venv, config note)
CONTENDERS = [
    (
        "before",
        "tieredcache before",
        "project",
        "MemoryLayer(100k) + RedisLayer, defaults; sync @cache.cached(ttl=600)",
    ),
    ("after", "**tieredcache after**", "project", "as above"),
    (
        "minimal",
        "floor of the protocol (reference)",
        "project",
        "after's wire and Lua scripts with no engine: dict L1, read-or-lock, load, fill "
        "with lease; lock waiters poll GET every 1 ms (`child_minimal`)",
    ),
    (
        "dogpile",
        "dogpile.cache",
        "dogpile",
        "dogpile.cache.redis, distributed_lock=True (redis-py Lock, lock_sleep 0.1 s "
        "default), expiration 600 s, cache_on_arguments",
    ),
    (
        "dogpile_fastpoll",
        "dogpile.cache lock_sleep=0.01",
        "dogpile",
        "as above with lock_sleep=0.01 (its lock waiters poll at the loader's pace)",
    ),
]


# --------------------------------------------------------------------------- parent


def main() -> int:
    if peers.child_main(CHILDREN):
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--sleep", type=float, default=0.01, help="loader sleep, seconds")
    parser.add_argument("--s", type=float, default=1.001, help="Zipf exponent")
    parser.add_argument("--v", type=float, default=10.0, help="Zipf offset")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each (median reported)")
    parser.add_argument("--only", default="", help="comma-separated: before,after,dogpile,...")
    parser.add_argument(
        "--before",
        default=DEFAULT_BEFORE,
        metavar="PATH",
        help=f"the tieredcache source tree before the change (default {DEFAULT_BEFORE})",
    )
    parser.add_argument(
        "--after",
        "--source",
        dest="after",
        default="worktree",
        metavar="worktree|head|PATH",
        help="the tree after it: this repository's working tree (default), its HEAD, or a path",
    )
    parser.add_argument("--quick", action="store_true", help="10,000 requests, 1 round")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()
    peers.keep_results(not args.no_write)
    if args.quick:
        args.requests, args.rounds = 10_000, 1
    chosen = [n for n in args.only.split(",") if n]
    unknown = set(chosen) - {n for n, *_ in CONTENDERS}
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    contenders = [c for c in CONTENDERS if not chosen or c[0] in chosen]

    results: dict[str, dict[str, Any]] = {}
    sources = {"before": args.before, "after": args.after}
    for name, source in sources.items():
        try:
            snap = peers.snapshot(source)
            results[name] = {"source": snap["desc"], "snapshot": snap["path"]}
            print(f"{name}: {snap['desc']}", file=sys.stderr)
        except (peers.PeerError, OSError) as exc:
            results[name] = {"error": f"source {source}: {exc}"[:300]}
            print(f"{name}: {results[name]['error']}", file=sys.stderr)

    keys = zipf_keys(args.requests, args.s, args.v, args.requests, args.seed)
    distinct = len(set(keys))
    floor = distinct * args.sleep / args.threads
    keys_file = Path(tempfile.mkdtemp(prefix="zipf-threads-")) / "keys.json"
    keys_file.write_text(json.dumps(keys))
    print(
        f"{args.requests:,} requests, {distinct:,} distinct keys, floor {floor:.2f} s",
        file=sys.stderr,
    )

    cpus = os.sched_getaffinity(0)
    pinned = len(cpus & {0, 1}) == 2
    t_start = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {}
    with _redis.server() as server:
        host, port = server.host, server.port
        redis_v = _redis.version(host, port)
        redis_pid = int(_redis.info(host, port)["process_id"])
        try:
            if pinned:  # Redis on CPU 1, the contender on CPU 0 (as bench_zipf.py)
                os.sched_setaffinity(redis_pid, {1})
            for round_ in range(args.rounds):
                order = contenders if round_ % 2 == 0 else contenders[::-1]
                for name, label, venv, _note in order:
                    entry = results.setdefault(name, {})
                    entry.update(label=label, venv=venv)
                    if "error" in entry:
                        continue
                    params = {
                        "url": f"redis://{host}:{port}/0",
                        "keys": str(keys_file),
                        "threads": args.threads,
                        "sleep": args.sleep,
                    }
                    _redis.flushall(host, port)
                    before = _redis.info(host, port)
                    print(f"{name} ({venv}) round {round_ + 1} ...", file=sys.stderr, flush=True)
                    if pinned:
                        os.sched_setaffinity(0, {0})
                    stolen = _steal_seconds()
                    try:
                        run = peers.measure(
                            venv,
                            __file__,
                            name,
                            params,
                            timeout=900,
                            source=sources.get("after" if name == "minimal" else name)
                            if venv == "project"
                            else None,
                        )
                    except peers.PeerError as exc:
                        entry["error"] = str(exc).splitlines()[0][:300]
                        print(f"  failed: {entry['error']}", file=sys.stderr)
                        continue
                    finally:
                        os.sched_setaffinity(0, cpus)
                    run["server"] = _redis.delta(before, _redis.info(host, port))
                    run["steal"] = _steal_seconds() - stolen
                    runs.setdefault(name, []).append(run)
                    print(
                        f"  {run['wall']:.2f} s ({run['wall'] / floor:.2f}x floor), "
                        f"host steal {run['steal']:.1f} s, "
                        f"loads {run['loads']:,}, round trips {run['server']['reads']:,}",
                        file=sys.stderr,
                    )
        finally:
            os.sched_setaffinity(0, cpus)
    for name, done in runs.items():
        done.sort(key=lambda run: float(run["wall"]))
        results[name].update(done[len(done) // 2])
        results[name]["walls"] = [float(run["wall"]) for run in done]
    print(f"total {time.monotonic() - t_start:.0f} s", file=sys.stderr)

    body = _report(args, contenders, results, distinct, floor, redis_v, pinned)
    print(body)
    if not args.no_write:
        peers.update_results("zipf_threads", body)
    return 0


# --------------------------------------------------------------------------- report


def _fmt_int(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else str(x)


def _wall(e: dict[str, Any]) -> str:
    walls = e.get("walls") or [e["wall"]]
    if len(walls) == 1:
        return f"{e['wall']:.2f} s"
    return f"{e['wall']:.2f} s ({min(walls):.2f}-{max(walls):.2f})"


def _report(
    args: argparse.Namespace,
    contenders: list[tuple[str, str, str, str]],
    results: dict[str, dict[str, Any]],
    distinct: int,
    floor: float,
    redis_v: str,
    pinned: bool,
) -> str:
    m = peers.machine()
    trees = "; ".join(
        f"{name}: {results[name].get('source') or results[name].get('error')}"
        for name in ("before", "after")
        if name in results and any(c[0] == name for c in contenders)
    )
    dogpile_v = next(
        (e["versions"] for n, e in results.items() if n.startswith("dogpile") and "versions" in e),
        {},
    )
    header = (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}; {m['python']}; {m['date']}. "
        f"{trees}. "
        + (", ".join(f"{k} {v}" for k, v in dogpile_v.items()) + ". " if dogpile_v else "")
        + f"Redis {redis_v} on 127.0.0.1 (local process, no persistence)"
        + ("; Redis pinned to CPU 1, the contender to CPU 0" if pinned else "")
        + ".\n"
        f"Workload: `bench_zipf.py`'s key stream, {args.requests:,} requests (bounded Zipf "
        f"P(k) ~ ({args.v:g} + k)^-{args.s:g}, k <= {args.requests:,}, seed {args.seed}) -> "
        f"**{distinct:,} distinct keys**, consumed by {args.threads} threads calling a sync "
        f"cached function; the loader sleeps {args.sleep:g} s (`time.sleep`) and counts its "
        f"calls; value = a 4-field dict; TTL {TTL} s; Redis flushed before each run. "
        f"**Floor** = distinct keys x {args.sleep:g} s / {args.threads} = {floor:.2f} s (every "
        f"loader run once, all threads busy). Wall time = the threads' start to the last "
        f"answer, in the child; each contender ran {args.rounds} times in alternating order "
        f"and is reported by its median run (range in brackets).\n\n"
        f"Columns: `round trips` = Redis `total_reads_processed` delta (client -> server "
        f"bursts as Redis read them; pipelined commands read together count once); `server "
        f"cmds` = `INFO commandstats` calls delta (every command Redis executed, including "
        f"the ones run inside Lua scripts); `client cmds` and `client bursts` = counted in "
        f"the client, in redis-py's sync `Connection` (dogpile, and tieredcache's redis-py "
        f"calls) and in tieredcache's own per-thread sockets (its fast path): commands sent "
        f"(a Lua script call is one) and socket writes. `host steal` = CPU time the "
        "hypervisor gave to other guests during that run (both CPUs, /proc/stat): the "
        "loader's sleeps do not stretch on a busy host, the CPU work does, so the ratio "
        "to the floor moves with it while before/after in the same run stay comparable."
    )
    rows = []
    for name, _label, _venv, note in contenders:
        e = results.get(name, {})
        label = e.get("label", name)
        if "error" in e:
            rows.append([label, note, "failed: " + e["error"], *[""] * 11])
            continue
        if "wall" not in e:
            continue
        srv = e["server"]
        problems = []
        if e.get("errors"):
            kinds = ", ".join(f"{n:,} {k}" for k, n in e["errors_by_type"].items())
            problems.append(f"{e['errors']:,} exceptions: {kinds} (first: {e['first_error']})")
        if e.get("wrong"):
            problems.append(f"{e['wrong']:,} wrong values")
        for what, count in (e.get("layer_warnings") or {}).items():
            problems.append(f"{count:,} logged, not raised: {what}")
        client = e["client"]
        partial = name in ("before", "after") and not client.get("fast_path")
        rows.append(
            [
                label,
                note,
                _wall(e),
                f"{e['wall'] / floor:.2f}x",
                f"{e['cpu']:.1f} s",
                f"{e.get('steal', 0.0):.1f} s",
                _fmt_int(e["loads"]),
                f"{e['loads'] / distinct:.2f}",
                _fmt_int(srv["reads"]),
                _fmt_int(srv["commands_total"]),
                _fmt_int(client["commands"]) + (" (redis-py only)" if partial else ""),
                _fmt_int(client["bursts"]),
                _top_commands(srv["commands"]),
                "; ".join(problems) or "ok",
            ]
        )
    table = peers.markdown_table(
        [
            "contender",
            "config",
            "wall",
            "wall / floor",
            "client CPU",
            "host steal",
            "loader calls",
            "calls / distinct",
            "round trips",
            "server cmds",
            "client cmds",
            "client bursts",
            "top server commands (incl. inside Lua)",
            "errors",
        ],
        rows,
    )
    ok = {n: e for n, e in results.items() if "error" not in e and "wall" in e}
    lines = [
        f"## The sync API under threads: Zipf, {args.threads} threads (`bench_zipf_threads.py`)\n",
        header + "\n",
        f"Floor: {distinct:,} x {args.sleep:g} s / {args.threads} = **{floor:.2f} s**.\n",
        table + "\n",
        _targets(ok, distinct, floor) + "\n",
    ]
    counter_rows = [
        [e["label"], ", ".join(f"`{k}` {v}" for k, v in e["library_stats"].items())]
        for n, e in ok.items()
        if e.get("library_stats")
    ]
    if counter_rows:
        lines.append("tieredcache's own counters (`cache.stats()`) after each run:\n")
        lines.append(peers.markdown_table(["run", "counters"], counter_rows) + "\n")
    lines.append(_plot_and_link(contenders, ok, floor))
    lines.append("Re-run: `.venv/bin/python benchmarks/bench_zipf_threads.py`\n")
    return "\n".join(lines)


def _targets(ok: dict[str, dict[str, Any]], distinct: int, floor: float) -> str:
    """The issue's gate: after the change, tieredcache's wall time is within 1.3x of the
    floor and below dogpile's (the faster dogpile row), and it loads each key once."""
    dogpiles = [e for n, e in ok.items() if n.startswith("dogpile")]
    best = min(dogpiles, key=lambda e: e["wall"]) if dogpiles else None
    rows = []
    for name in ("after", "before"):
        if name not in ok:
            continue
        e = ok[name]
        label = e["label"] + ("" if name == "after" else " (for reference)")
        rows.append(
            [
                label,
                "loader calls == distinct keys",
                f"{e['loads']:,} vs {distinct:,}",
                "met" if e["loads"] == distinct else "**missed**",
            ]
        )
        ratio = e["wall"] / floor
        rows.append(
            [
                label,
                "wall <= 1.3x floor",
                f"{e['wall']:.2f} s = {ratio:.2f}x {floor:.2f} s",
                "met" if ratio <= 1.3 else "**missed**",
            ]
        )
        if best is not None:
            rows.append(
                [
                    label,
                    "wall below dogpile's",
                    f"{e['wall']:.2f} s vs {best['wall']:.2f} s ({best['label']})",
                    "met" if e["wall"] < best["wall"] else "**missed**",
                ]
            )
    if "after" in ok and "before" in ok:
        a, b = ok["after"], ok["before"]
        rows.append(
            [
                "after vs before",
                "(not a gate) wall, round trips",
                f"{a['wall'] / b['wall']:.2f}x wall, "
                f"{a['server']['reads'] / max(b['server']['reads'], 1):.2f}x round trips",
                "-",
            ]
        )
    if "after" in ok and "minimal" in ok:
        a, m = ok["after"], ok["minimal"]
        rows.append(
            [
                "after vs the protocol's floor",
                "(not a gate) wall, client CPU",
                f"{a['wall'] / floor:.2f}x vs {m['wall'] / floor:.2f}x the floor; client CPU "
                f"{a['cpu']:.1f} s vs {m['cpu']:.1f} s (the engine: "
                f"{(a['cpu'] - m['cpu']) / max(a['loads'], 1) * 1e6:.0f} µs per load)",
                "-",
            ]
        )
    table = peers.markdown_table(["tieredcache run", "target", "measured", "status"], rows)
    return "Targets (issue 8):\n\n" + table


def _plot_and_link(
    contenders: list[tuple[str, str, str, str]], ok: dict[str, Any], floor: float
) -> str:
    names = [n for n, *_ in contenders if n in ok]
    if not names:
        return ""
    labels = [ok[n]["label"].replace("**", "") for n in names]

    def series(metric: Callable[[dict[str, Any]], float]) -> dict[str, list[float]]:
        return {label: [metric(ok[n])] for n, label in zip(names, labels, strict=True)}

    walls = series(lambda e: e["wall"])
    walls["floor"] = [floor]
    spec = {
        "title": "Sync API, 64 threads, Zipf keys, 0.01 s loader (lower is better)",
        "panels": [
            {
                "title": "wall time (floor = distinct keys x 0.01 s / 64)",
                "ylabel": "seconds",
                "groups": ["wall"],
                "fmt": "{:.2f}",
                "series": walls,
                "highlight": "tieredcache after",
            },
            {
                "title": "round trips (Redis read events, log)",
                "ylabel": "round trips",
                "groups": ["round trips"],
                "log": True,
                "series": series(lambda e: max(1, e["server"]["reads"])),
                "highlight": "tieredcache after",
            },
        ],
    }
    error = peers.plot(spec, HERE / "zipf_threads.png")
    return "![Zipf, threads](zipf_threads.png)\n" if error is None else f"(no plot: {error})\n"


if __name__ == "__main__":
    sys.exit(main())
