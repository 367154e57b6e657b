"""CdnPurgeLayer off the caller's path: each call's ticket settles with the outcome of
the batches that carried its keys, that outcome reaches InvalidationResult through
wait_purges/await_purges, and the optional delayed second purge (timed by an
injected clock, woken by flush or by its own timer)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from tieredcache import Invalidation, MemoryLayer, TieredCache
from tieredcache.errors import BackendError, ConfigurationError
from tieredcache.keys import Tag
from tieredcache.layers.base import PendingPurge
from tieredcache.layers.cdn import (
    FASTLY,
    CdnPurgeLayer,
    PurgeAck,
    Purger,
    PurgeRateLimitedError,
    PurgeRequest,
    PurgeResult,
    PurgeTicket,
    purge_keys,
)
from tieredcache.testing import FakeClock, await_until, wait_until


class ScriptedPurger(Purger):
    """Records each batch; answers from ``script`` (then "ok"): "ok", "fail", or
    ("limit", n) = purge the first n keys, rate-limit the rest with Retry-After 2.
    While ``gate`` is cleared, a sync purge waits for it."""

    scheme = FASTLY

    def __init__(self, *script: str | tuple[str, int]) -> None:
        super().__init__(name="scripted")
        self.script = list(script)
        self.batches: list[tuple[str, ...]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def _answer(self, keys: Sequence[str]) -> PurgeResult:
        self.batches.append(tuple(keys))
        step = self.script.pop(0) if self.script else "ok"
        if step == "fail":
            raise BackendError("scripted", "purge", "HTTP 503 after 4 attempts")
        if isinstance(step, tuple):
            raise PurgeRateLimitedError("scripted", "purge", 2.0, keys[step[1] :])
        return PurgeResult((PurgeAck("scripted", tuple(keys), 200),))

    def purge(self, keys: Sequence[str], *, soft: bool = False) -> PurgeResult:
        self.started.set()
        assert self.gate.wait(10)
        return self._answer(keys)

    async def apurge(self, keys: Sequence[str], *, soft: bool = False) -> PurgeResult:
        await asyncio.sleep(0)
        return self._answer(keys)

    def _plan(self, keys: Sequence[str], soft: bool) -> list[PurgeRequest]:
        return []


def tag_keys(*names: str) -> list[str]:
    return purge_keys(FASTLY, [Tag("shop", "acme", n) for n in names])


# --------------------------------------------------------------------------- tickets


def test_a_ticket_settles_only_when_every_key_it_queued_was_sent() -> None:
    """Keys merged with other callers' and split over two batches (max_batch=2): the
    ticket is pending until the second batch went, and carries both outcomes."""
    purger = ScriptedPurger()
    purger.gate.clear()
    layer = CdnPurgeLayer(purger, name="edge", max_batch=2)
    first = layer.purge_keys(["a"])
    assert purger.started.wait(10)
    spread = layer.purge_keys(["b", "c", "d"])
    shared = layer.purge_keys(["c"])  # merged with spread's "c"
    assert isinstance(spread, PendingPurge) and not spread.done()
    assert spread.status == "pending" and spread.error is None
    purger.gate.set()
    assert spread.wait(10) and first.wait(10) and shared.wait(10)
    layer.close()
    assert purger.batches == [("a",), ("b", "c"), ("d",)]
    assert [o.keys for o in spread.outcomes] == [("b", "c"), ("d",)]
    assert [o.keys for o in shared.outcomes] == [("b", "c")]
    assert spread.status == "purged" and spread.unpurged == ()


def test_a_rate_limited_batch_settles_only_the_tickets_it_did_not_purge() -> None:
    """The vendor purged "a" then answered 429: a's ticket is purged, b's is
    rate_limited with the Retry-After and the keys to send again."""
    purger = ScriptedPurger("ok", ("limit", 1))
    purger.gate.clear()
    layer = CdnPurgeLayer(purger)
    layer.purge_keys(["x"])  # holds the worker so that a and b share a batch
    assert purger.started.wait(10)
    a, b = layer.purge_keys(["a"]), layer.purge_keys(["b"])
    purger.gate.set()
    assert a.wait(10) and b.wait(10)
    layer.close()
    assert (a.status, a.error) == ("purged", None)
    assert b.status == "rate_limited" and b.retry_after == 2.0
    assert isinstance(b.error, PurgeRateLimitedError) and b.unpurged == ("b",)


def test_a_failed_batch_settles_its_ticket_with_the_error() -> None:
    purger = ScriptedPurger("fail")
    layer = CdnPurgeLayer(purger)
    ticket = layer.delete_tags([Tag("shop", "acme", "p")])
    assert ticket.wait(10)
    layer.close()
    assert ticket.status == "failed" and isinstance(ticket.error, BackendError)
    assert ticket.unpurged == tuple(tag_keys("p"))


def test_a_ticket_with_no_keys_is_settled_at_once() -> None:
    layer = CdnPurgeLayer(ScriptedPurger())
    ticket = layer.delete([])
    assert ticket.done() and ticket.status == "purged" and ticket.outcomes == ()
    layer.close()


async def test_await_done_settles_from_the_drain_task() -> None:
    purger = ScriptedPurger()
    layer = CdnPurgeLayer(purger)
    ticket = await layer.adelete_tags([Tag("shop", "acme", "p")])
    assert await ticket.await_done(10)
    assert ticket.status == "purged"
    await layer.aclose()


async def test_await_done_settles_from_the_sync_thread_and_times_out_while_held() -> None:
    purger = ScriptedPurger()
    purger.gate.clear()
    layer = CdnPurgeLayer(purger)
    ticket = layer.purge_keys(["k"])  # sent by the layer's thread, not this loop
    assert await ticket.await_done(0.01) is False
    purger.gate.set()
    assert await ticket.await_done(10)
    await layer.aclose()


# --------------------------------------------------------------------------- results


def cdn_cache(purger: ScriptedPurger) -> tuple[TieredCache, CdnPurgeLayer]:
    layer = CdnPurgeLayer(purger, name="edge")
    return TieredCache("shop", [MemoryLayer(), layer]), layer


def test_the_result_names_the_cdn_pending_until_its_purge_settles() -> None:
    """The call returns while the purge is held: ok, CDN pending, not complete; then
    wait_purges returns the settled result (complete), the original left as it was."""
    purger = ScriptedPurger()
    purger.gate.clear()
    cache, _ = cdn_cache(purger)
    result = cache.invalidate(["k"], tags=["p"], tenant="acme")
    assert result.ok and result.pending == ["edge"] and not result.complete
    assert result.wait_purges(timeout=0.01).pending == ["edge"]  # still held
    purger.gate.set()
    settled = result.wait_purges(timeout=10)
    assert settled.ok and settled.complete and settled.pending == []
    assert result.pending == ["edge"]
    cache.close()


def test_a_rate_limited_purge_reaches_the_result_and_retrying_reaches_only_the_cdn() -> None:
    """A 429 from the CDN is a 'rate-limited' failure with retry_after in the settled
    result; invalidate_many(layers=result.failed) purges the CDN again, and nothing else."""
    purger = ScriptedPurger(("limit", 0))
    cache, _ = cdn_cache(purger)
    items = [Invalidation("acme", tags=("p",))]
    settled = cache.invalidate_many(items).wait_purges(timeout=10)
    assert settled.failed == ["edge"] and not settled.ok
    (failure,) = settled.failures
    assert (failure.layer, failure.reason, failure.retry_after) == ("edge", "rate-limited", 2.0)
    assert settled.retry_after == 2.0
    with pytest.raises(BackendError, match="edge: rate-limited"):
        settled.raise_for_failure()
    retried = cache.invalidate_many(items, layers=settled.failed)
    assert retried.pending == ["edge"]
    assert retried.wait_purges(timeout=10).complete
    assert purger.batches == [tuple(tag_keys("p"))] * 2
    cache.close()


def test_a_failed_purge_is_an_error_in_the_settled_result() -> None:
    purger = ScriptedPurger("fail")
    cache, _ = cdn_cache(purger)
    settled = cache.invalidate(tags=["p"], tenant="acme").wait_purges(timeout=10)
    assert [(f.layer, f.reason) for f in settled.failures] == [("edge", "error")]
    cache.close()


async def test_await_purges_settles_an_async_invalidation() -> None:
    purger = ScriptedPurger(("limit", 0))
    cache, _ = cdn_cache(purger)
    result = await cache.ainvalidate(tags=["p"], tenant="acme")
    assert result.pending == ["edge"]
    settled = await result.await_purges(timeout=10)
    assert settled.failed == ["edge"] and settled.failures[0].reason == "rate-limited"
    await cache.aclose()


# --------------------------------------------------------------------------- second purge


def test_a_purged_key_is_purged_again_after_the_delay_and_only_once(clock: FakeClock) -> None:
    purger = ScriptedPurger()
    layer = CdnPurgeLayer(purger, second_purge_after=30, clock=clock)
    ticket = layer.delete_tags([Tag("shop", "acme", "p")])
    assert ticket.wait(10)  # the ticket is about the first purge only
    assert [o.second for o in layer.flush(timeout=10)] == [False]
    clock.advance(29)
    assert layer.flush(timeout=10) == []
    clock.advance(1)
    (second,) = layer.flush(timeout=10)
    assert second.second and second.second_keys == tuple(tag_keys("p"))
    clock.advance(300)
    assert layer.flush(timeout=10) == []  # a second purge never schedules a third
    assert purger.batches == [tuple(tag_keys("p"))] * 2
    layer.close()


def test_a_due_second_purge_merges_with_what_is_queued(clock: FakeClock) -> None:
    """a's second purge goes out with b's first purge, and b's first purge with a's
    own request again counts as a first purge of a (so a gets another second)."""
    purger = ScriptedPurger()
    layer = CdnPurgeLayer(purger, second_purge_after=30, clock=clock)
    layer.purge_keys(["a", "c"])
    layer.flush(timeout=10)
    clock.advance(30)
    layer.purge_keys(["b", "c"])
    (merged,) = layer.flush(timeout=10)
    assert set(merged.keys) == {"a", "b", "c"} and merged.second_keys == ("a",)
    assert not merged.second
    clock.advance(30)
    (again,) = layer.flush(timeout=10)
    assert set(again.keys) == {"b", "c"} and set(again.second_keys) == {"b", "c"}
    layer.close()


def test_failed_and_rate_limited_keys_get_no_second_purge(clock: FakeClock) -> None:
    purger = ScriptedPurger("fail", ("limit", 1))
    layer = CdnPurgeLayer(purger, second_purge_after=5, clock=clock)
    layer.purge_keys(["f"])
    layer.flush(timeout=10)
    layer.purge_keys(["ok", "limited"])
    layer.flush(timeout=10)
    clock.advance(5)
    (second,) = layer.flush(timeout=10)
    assert second.keys == ("ok",) and second.second
    layer.close()


def test_close_sends_the_scheduled_second_purges_at_once(clock: FakeClock) -> None:
    purger = ScriptedPurger()
    layer = CdnPurgeLayer(purger, second_purge_after=3600, clock=clock)
    layer.purge_keys(["a"])
    layer.flush(timeout=10)
    layer.close()  # the clock never moved: sent early rather than never
    assert purger.batches == [("a",), ("a",)]
    with pytest.raises(BackendError, match="closed"):
        layer.purge_keys(["b"])


def test_the_worker_thread_wakes_for_a_second_purge_by_itself() -> None:
    """With the real clock and no flush, the thread sends the second purge when due."""
    purger = ScriptedPurger()
    layer = CdnPurgeLayer(purger, second_purge_after=0.05)
    layer.purge_keys(["a"])
    wait_until(lambda: len(purger.batches) == 2, message="the second purge went out")
    layer.close()
    assert purger.batches == [("a",), ("a",)]


async def test_the_async_drain_sends_the_second_purge_from_a_loop_timer() -> None:
    purger = ScriptedPurger()
    layer = CdnPurgeLayer(purger, second_purge_after=0.05)
    await layer.apurge_keys(["a"])
    await await_until(lambda: len(purger.batches) == 2, message="the second purge went out")
    assert [o.second for o in await layer.aflush()] == [False, True]
    await layer.aclose()
    assert purger.batches == [("a",), ("a",)]


async def test_aflush_sends_a_due_second_purge_and_aclose_the_scheduled_ones(
    clock: FakeClock,
) -> None:
    purger = ScriptedPurger()
    layer = CdnPurgeLayer(purger, second_purge_after=30, clock=clock)
    await layer.apurge_keys(["a"])
    await layer.aflush()
    clock.advance(30)
    assert [o.second_keys for o in await layer.aflush()] == [("a",)]
    await layer.apurge_keys(["b"])
    await layer.aflush()
    await layer.aclose()
    assert purger.batches == [("a",), ("a",), ("b",), ("b",)]


def test_second_purge_after_must_be_positive() -> None:
    with pytest.raises(ConfigurationError, match="second_purge_after"):
        CdnPurgeLayer(ScriptedPurger(), second_purge_after=0)


def test_ticket_repr_names_the_layer_and_status() -> None:
    assert (
        repr(PurgeTicket("edge", ("a",))) == "PurgeTicket(layer='edge', keys=1, status='pending')"
    )
