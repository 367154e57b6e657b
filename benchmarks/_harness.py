"""Timing helpers shared by the benchmarks (stdlib only: the peer venvs import it too).

Sync code is timed with :mod:`timeit` (its generated loop, GC off during a
repeat). Async code is timed inside one running event loop, awaiting the call
in a plain ``for`` loop, GC off the same way. Both calibrate the number of
calls per repeat so that one repeat lasts about ``target`` seconds, then return
the nanoseconds per call of every repeat.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import time
import timeit
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


def time_sync(
    stmt: str, env: dict[str, Any], *, per: int = 1, target: float = 0.2, repeat: int = 7
) -> list[float]:
    """ns per call of ``stmt`` (which makes ``per`` calls), for each of ``repeat`` repeats."""
    timer = timeit.Timer(stmt, globals=env)
    number, elapsed = timer.autorange()  # >= 0.2 s
    number = max(1, int(number * target / max(elapsed, 1e-9)))
    return [t / (number * per) * 1e9 for t in timer.repeat(repeat=repeat, number=number)]


async def time_async(
    call: Callable[[Any], Awaitable[Any]],
    keys: Sequence[Any],
    *,
    target: float = 0.2,
    repeat: int = 7,
) -> list[float]:
    """ns per ``await call(key)``, cycling over ``keys``, for each repeat."""

    async def run(number: int) -> float:
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            start = time.perf_counter()
            if len(keys) == 1:
                key = keys[0]
                for _ in itertools.repeat(None, number):
                    await call(key)
            else:
                for _ in itertools.repeat(None, number):
                    for key in keys:
                        await call(key)
            return time.perf_counter() - start
        finally:
            if gc_was_enabled:
                gc.enable()

    number = 1
    while True:
        elapsed = await run(number)
        if elapsed >= 0.05:
            break
        number *= 2
    number = max(1, int(number * target / elapsed))
    return [await run(number) / (number * len(keys)) * 1e9 for _ in range(repeat)]


def summary(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median": statistics.median(ordered),
        "best": ordered[0],
        "worst": ordered[-1],
        "n": len(ordered),
    }


def fmt_ns(ns: float) -> str:
    if ns >= 100_000:
        return f"{ns / 1000:,.0f} µs"
    if ns >= 10_000:
        return f"{ns / 1000:,.1f} µs"
    return f"{ns:,.0f} ns"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 100 else f"{x:,.0f}x"
