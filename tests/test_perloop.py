"""PerLoop: one object per event loop, the last loop's found without a lookup."""

from __future__ import annotations

import asyncio
import gc

from tieredcache._perloop import PerLoop


def test_each_loop_gets_its_own_object_and_a_dropped_loop_takes_it_along() -> None:
    per_loop: PerLoop[list[int]] = PerLoop()

    async def get() -> list[int]:
        first = per_loop.get(list)
        assert per_loop.get(list) is first  # the same loop: the same object
        return first

    one, two = asyncio.run(get()), asyncio.run(get())
    assert one is not two
    gc.collect()
    assert per_loop.values() == []  # both loops are gone, and their objects with them


def test_pop_forgets_the_running_loops_object() -> None:
    per_loop: PerLoop[list[int]] = PerLoop()

    async def main() -> None:
        first = per_loop.get(list)
        assert per_loop.values() == [first]
        assert per_loop.pop() is first
        assert per_loop.pop() is None
        assert per_loop.get(list) is not first  # made again after a pop

    asyncio.run(main())
