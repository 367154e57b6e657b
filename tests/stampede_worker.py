"""One process of the cross-process stampede test: N threads call one cold key at once.

    python tests/stampede_worker.py REDIS_URL NAMESPACE START_AT THREADS

The loader INCRs a Redis counter (the test's global loader-call count) and
sleeps, so a second loader anywhere in the cluster would show up in the count.
Prints one JSON line: the distinct results seen by this process's threads.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import redis

from tieredcache import MemoryLayer, RedisLayer, TieredCache, tenant_scope


def main() -> None:
    url, namespace, start_at, threads = (
        sys.argv[1],
        sys.argv[2],
        float(sys.argv[3]),
        int(sys.argv[4]),
    )
    counter = redis.Redis.from_url(url)
    cache = TieredCache(namespace, [MemoryLayer(), RedisLayer(url=url)])

    @cache.cached(ttl=60, lock_wait=20.0, lock_ttl=30.0)
    def load(item: int) -> dict[str, int]:
        calls = int(counter.incr(f"{namespace}:loader-calls"))
        time.sleep(0.5)
        return {"item": item, "call": calls}

    results: list[object] = []
    errors: list[str] = []

    def call() -> None:
        with tenant_scope("acme"):
            time.sleep(max(0.0, start_at - time.time()))
            try:
                results.append(load(7))
            except Exception as exc:  # reported to the parent, which fails the test
                errors.append(repr(exc))

    workers = [threading.Thread(target=call) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    distinct = sorted({json.dumps(r, sort_keys=True) for r in results})
    print(json.dumps({"distinct": distinct, "count": len(results), "errors": errors}), flush=True)
    cache.close()


if __name__ == "__main__":
    main()
