"""The CDN side judges a purge by its own outcome: the ticket of the keys it queued
(a ``CdnPurgeLayer``), or the settled result of ``invalidate_many`` (another CDN
layer), never by what else the layer sent meanwhile nor by a purge still queued."""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cdc.rules import Invalidation, Rules, TableRule
from cdc.worker import Worker, WorkerSettings
from tieredcache.errors import BackendError
from tieredcache.keys import Tag
from tieredcache.layers.cdn import FASTLY, CdnPurgeLayer, purge_keys
from tieredcache.layers.cdn.model import PurgeAck, PurgeResult
from tieredcache.layers.cdn.ticket import PurgeOutcome

INVS = {Invalidation("shop", "acme", "product:1"), Invalidation("shop", "acme", "product:2")}


def rules() -> Rules:
    return Rules(
        [TableRule("public.products", "tenant_id", ["product:{id}"], ["shop"])],
        message_prefix=None,
    )


def settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "bootstrap_servers": "127.0.0.1:1",
        "topics": ["t"],
        "backoff_initial": 0.01,
        "backoff_max": 0.04,
        "cdn_timeout": 5.0,
    }
    values.update(overrides)
    return WorkerSettings(**values)


class Layer:
    def __init__(self, name: str, role: str) -> None:
        self.name, self.cdc_role = name, role


class Purger:
    """A fake vendor that purges every key it is sent; ``fail`` calls fail first."""

    scheme = FASTLY
    name = "fake"

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def purge(self, keys: Sequence[str], *, soft: bool = False) -> PurgeResult:
        with self.lock:
            self.calls.append(list(keys))
            if self.fail > 0:
                self.fail -= 1
                raise BackendError("edge", "purge", "502 from the vendor")
        return PurgeResult((PurgeAck("fake", tuple(keys), 200),))

    async def apurge(self, keys: Sequence[str], *, soft: bool = False) -> PurgeResult:
        return self.purge(keys, soft=soft)

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class SecondPurgeFails(CdnPurgeLayer):
    """A layer whose delayed second purge of the same keys failed meanwhile: what
    ``flush()`` reports besides the worker's own (purged) batch."""

    def flush(self, timeout: float | None = None) -> list[PurgeOutcome]:
        outcomes = super().flush(timeout)
        keys = tuple(k for call in self.purger.calls for k in call)  # type: ignore[attr-defined]
        error = BackendError(self.name, "purge", "second purge: 502")
        return [*outcomes, PurgeOutcome("failed", keys, error=error, second_keys=keys)]


class Target:
    namespace = "shop"

    def __init__(self, cdn: Any) -> None:
        self.layers = [Layer("redis", "storage"), cdn]

    def invalidate_many(
        self, items: Iterable[Any], *, layers: Collection[str] | None = None
    ) -> Any:
        raise AssertionError("the CDN side talks to a CdnPurgeLayer directly")


def purge(worker: Worker, name: str) -> list[float]:
    """Run the CDN side for INVS on ``name``; the delays it waited (at most 3)."""
    waits: list[float] = []

    def wait(delay: float) -> bool:
        waits.append(delay)
        return len(waits) < 3

    worker._wait_cdn = wait  # type: ignore[method-assign]
    assert worker._purge_layer("shop", name, set(INVS), {})
    return waits


def test_a_failed_second_purge_is_not_counted_against_the_batch() -> None:
    """The batch's keys were purged: a second purge of the same keys that failed in
    the meantime (as ``flush()`` reports it) sends nothing again. Before, the worker
    read ``flush()`` and purged the batch again, and again."""
    purger = Purger()
    layer = SecondPurgeFails(purger, name="edge")  # type: ignore[arg-type]
    worker = Worker(settings(), rules(), [Target(layer)], cdn_budgets={"edge": None})
    try:
        assert purge(worker, "edge") == []
        wanted = [Tag("shop", "acme", "product:1"), Tag("shop", "acme", "product:2")]
        assert set(purge_keys(FASTLY, wanted)) <= set(purger.calls[0])
        assert len(purger.calls) == 1
    finally:
        layer.close()


def test_a_failed_purge_of_the_batch_is_sent_again() -> None:
    """The ticket's failure is the batch's: its keys go out again after the backoff."""
    purger = Purger(fail=1)
    layer = CdnPurgeLayer(purger, name="edge")  # type: ignore[arg-type]
    worker = Worker(settings(), rules(), [Target(layer)], cdn_budgets={"edge": None})
    try:
        assert purge(worker, "edge") == [0.01]
        assert len(purger.calls) == 2 and set(purger.calls[0]) == set(purger.calls[1])
        assert worker.status.failing == {}
    finally:
        layer.close()


@dataclass
class Failure:
    layer: str
    reason: str
    retry_after: float | None = None
    detail: str = ""


@dataclass
class Result:
    """``invalidate_many``'s answer: ``queued`` holds what ``wait_purges`` settles to."""

    failures: list[Failure] = field(default_factory=list)
    purges: dict[str, Any] = field(default_factory=dict)
    settled: Result | None = None
    waited: list[float | None] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [f.layer for f in self.failures]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def pending(self) -> list[str]:
        return list(self.purges)

    def wait_purges(self, timeout: float | None = None) -> Result:
        self.waited.append(timeout)
        return self if self.settled is None else self.settled


class QueuingTarget:
    """A cache whose CDN layer (not a CdnPurgeLayer) only queues: ``ok`` at once."""

    namespace = "shop"

    def __init__(self, results: list[Result]) -> None:
        self.layers = [Layer("redis", "storage"), Layer("cdn", "cdn")]
        self.results = results
        self.calls: list[list[str]] = []

    def invalidate_many(
        self, items: Iterable[Any], *, layers: Collection[str] | None = None
    ) -> Result:
        self.calls.append(list(layers or ()))
        return self.results.pop(0)


def test_a_queued_purge_is_settled_before_it_counts() -> None:
    """``invalidate_many`` says ok for a purge it only queued; settled, it was rate
    limited: the worker waits its Retry-After and purges again. Before, the queued
    purge counted as confirmed and the offsets went on."""
    limited = Result([Failure("cdn", "rate-limited", 0.7)])
    first = Result(purges={"cdn": ["ticket"]}, settled=limited)
    second = Result(purges={"cdn": ["ticket"]}, settled=Result())
    target = QueuingTarget([first, second])
    worker = Worker(settings(), rules(), [target], cdn_budgets={"cdn": None})  # type: ignore[list-item]
    assert purge(worker, "cdn") == [0.7]
    assert target.calls == [["cdn"], ["cdn"]]
    assert first.waited == [5.0] and second.waited == [5.0]


def test_a_purge_still_queued_at_the_deadline_is_not_confirmed() -> None:
    """Still pending after ``cdn_timeout``: not confirmed, sent again."""
    stuck = Result(purges={"cdn": ["ticket"]})
    target = QueuingTarget([stuck, Result()])
    worker = Worker(settings(), rules(), [target], cdn_budgets={"cdn": None})  # type: ignore[list-item]
    assert purge(worker, "cdn") == [0.01]
    assert len(target.calls) == 2
