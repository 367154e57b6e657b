"""The CDN side within the vendor's purge budget: escalate past it, never drop a purge,
wait a rate limit's Retry-After, and never commit before the CDN confirmed."""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import pytest

from cdc._cdn_budget import CdnBudget, KeyBucket, PurgerBucket, plan, surrogate_keys, units_of
from cdc._progress import Progress
from cdc.rules import Invalidation, Rules, TableRule
from cdc.worker import Worker, WorkerSettings, _CdnUnit
from tests.cdn_vendor_server import VendorServer
from tieredcache.keys import Tag
from tieredcache.layers.cdn import (
    AKAMAI,
    FASTLY,
    AkamaiPurger,
    CdnPurgeLayer,
    CloudflarePurger,
    PurgeRateLimitedError,
    TokenBucket,
    purge_keys,
    table_key,
    tenant_key,
)
from tieredcache.layers.cdn.model import PurgeAck, PurgeResult

TP = ("shop.public.products", 0)
PRODUCTS = "table:public.products"
CATEGORIES = "table:public.categories"


class RationedPurger:
    """A fake vendor: purges up to ``quota`` keys per ``window`` seconds, then answers
    429 with ``Retry-After: window`` for the rest (the keys before it are purged)."""

    scheme = FASTLY
    name = "fake"

    def __init__(self, quota: int, window: float = 0.2) -> None:
        self.quota, self.window = quota, window
        self.purged: list[str] = []
        self.refusals = 0
        self._left, self._since = quota, time.monotonic()

    def purge(self, keys: Sequence[str], *, soft: bool = False) -> PurgeResult:
        if time.monotonic() - self._since >= self.window:
            self._left, self._since = self.quota, time.monotonic()
        take = list(keys[: self._left])
        self._left -= len(take)
        self.purged += take
        if len(take) < len(keys):
            self.refusals += 1
            raise PurgeRateLimitedError("fake", "purge", self.window, keys[len(take) :])
        return PurgeResult((PurgeAck("fake", tuple(keys), 200),))

    async def apurge(self, keys: Sequence[str], *, soft: bool = False) -> PurgeResult:
        return self.purge(keys, soft=soft)

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class Layer:
    def __init__(self, name: str) -> None:
        self.name, self.cdc_role = name, "storage"


class Target:
    namespace = "shop"

    def __init__(self, cdn: Any) -> None:
        self.layers = [Layer("redis"), cdn]

    def invalidate_many(
        self, items: Iterable[Any], *, layers: Collection[str] | None = None
    ) -> Any:
        raise AssertionError("the CDN side talks to a CdnPurgeLayer directly")


def rules() -> Rules:
    return Rules(
        [
            TableRule("public.products", "tenant_id", ["product:{id}"], ["shop"]),
            TableRule("public.categories", "tenant_id", ["category:{id}"], ["shop"]),
        ],
        message_prefix=None,
    )


def make_worker(purger: RationedPurger, budget: CdnBudget | None) -> tuple[Worker, CdnPurgeLayer]:
    layer = CdnPurgeLayer(purger, name="edge")  # type: ignore[arg-type]
    settings = WorkerSettings(
        bootstrap_servers="127.0.0.1:1", topics=["t"], backoff_initial=0.01, backoff_max=0.04
    )
    worker = Worker(settings, rules(), [Target(layer)], cdn_budgets={"edge": budget})
    return worker, layer


def batch(tenants: int, products: int) -> tuple[set[Invalidation], dict[Invalidation, str | None]]:
    invs = {
        Invalidation("shop", f"t{t}", f"product:{p}")
        for t in range(tenants)
        for p in range(products)
    }
    invs.add(Invalidation("shop", "t0", "category:1"))
    tables: dict[Invalidation, str | None] = {inv: PRODUCTS for inv in invs}
    tables[Invalidation("shop", "t0", "category:1")] = CATEGORIES
    return invs, tables


def covered(invs: set[Invalidation], purged: Collection[str]) -> list[Invalidation]:
    """The invalidations NOT covered by a purged key: their tag key and overflow key,
    their table's tenant-less key, or their tenant key."""
    done = set(purged)
    missing = []
    for inv in invs:
        assert inv.tenant is not None
        tag_keys = set(purge_keys(FASTLY, [Tag(inv.namespace, inv.tenant, inv.tag)]))
        table = PRODUCTS if inv.tag.startswith("product:") else CATEGORIES
        if tag_keys <= done or table_key(FASTLY, inv.namespace, table) in done:
            continue
        if tenant_key(FASTLY, inv.namespace, inv.tenant) in done:
            continue
        missing.append(inv)
    return missing


def run_batch(
    worker: Worker, invs: set[Invalidation], tables: dict[Invalidation, str | None]
) -> Any:
    worker.progress.assign([TP])
    stamp = worker.progress.stamp({TP: 42}, {})
    worker.progress.storage_acked(stamp)
    return worker._cdn_batch([_CdnUnit(invs, stamp, [], tables)])


# --------------------------------------------------------------------------- planning


def test_within_budget_every_tag_goes_out_as_is() -> None:
    invs, tables = batch(2, 3)
    units = plan(units_of(invs), tables, budget=100)
    assert {u.kind for u in units} == {"tag", "overflow"}
    assert units[-1].kind == "overflow"  # overflow keys after the tags they cover


def test_past_budget_many_tenants_of_one_table_become_the_table_key() -> None:
    invs, tables = batch(20, 3)  # 61 tags + 20 overflow keys
    units = plan(units_of(invs), tables, budget=10)
    kinds = {(u.kind, u.name) for u in units}
    assert ("table", PRODUCTS) in kinds
    assert len(units) <= 10
    keys = surrogate_keys(FASTLY, units)
    assert "shop:*:table:public.products" in keys
    assert covered(invs, keys) == []


def test_past_budget_many_tags_of_one_tenant_become_the_tenant_key() -> None:
    invs = {Invalidation("shop", "acme", f"tag{i}") for i in range(50)}
    units = plan(units_of(invs), {}, budget=5)  # no table known: only the tenant key helps
    assert [(u.kind, u.tenant) for u in units] == [("tenant", "acme")]


def test_without_tenant_keys_and_tables_nothing_is_dropped() -> None:
    invs = {Invalidation("shop", "acme", f"tag{i}") for i in range(50)}
    units = plan(units_of(invs), {}, budget=5, tenant_keys=False)
    assert len([u for u in units if u.kind == "tag"]) == 50  # waits for tokens instead


def test_vendor_budgets_are_in_surrogate_keys() -> None:
    assert CdnBudget.for_vendor("akamai") == CdnBudget(5000, 500 / 60)
    assert CdnBudget.for_vendor("cloudflare", "free") == CdnBudget(2500, 5 / 60 * 100)
    assert CdnBudget.for_vendor("varnish") is None
    bucket = KeyBucket(10, 1.0, clock=lambda: 0.0)
    assert bucket.take(11) == 0.0  # capped at the capacity: sent in parts, never refused
    bucket.drain()
    assert bucket.take(1) == 1.0


# --------------------------------------------------------------------------- the worker


def test_a_429_past_n_keys_escalates_and_drops_nothing() -> None:
    """The vendor takes 8 keys a window: the rest is re-planned coarser after Retry-After."""
    purger = RationedPurger(quota=8, window=0.1)
    worker, layer = make_worker(purger, budget=None)  # our budget unknown: learn from the 429
    invs, tables = batch(20, 3)
    try:
        assert run_batch(worker, invs, tables)
    finally:
        layer.close()
    assert purger.refusals >= 1
    assert "shop:*:table:public.products" in purger.purged  # escalated
    assert covered(invs, purger.purged) == []  # nothing dropped
    assert len(purger.purged) < len(invs)  # far fewer keys than the fine plan
    assert worker.progress.committable() == {TP: 42}


def test_the_budget_escalates_before_the_vendor_says_no() -> None:
    purger = RationedPurger(quota=1000)
    worker, layer = make_worker(purger, CdnBudget(capacity=10, rate=1000))
    invs, tables = batch(20, 3)
    try:
        assert run_batch(worker, invs, tables)
    finally:
        layer.close()
    assert purger.refusals == 0
    assert worker.cdn_escalations["edge"] >= 1
    assert len(purger.purged) <= 10
    assert covered(invs, purger.purged) == []


def test_the_commit_waits_for_a_rate_limited_cdn() -> None:
    """While the CDN answers 429 (Retry-After 0.3 s) nothing commits; then it does."""
    purger = RationedPurger(quota=1, window=0.3)
    worker, layer = make_worker(purger, budget=None)
    invs = {Invalidation("shop", "acme", "product:1"), Invalidation("shop", "acme", "product:2")}
    tables: dict[Invalidation, str | None] = {}  # no table: escalates to the tenant key only
    outcome: list[bool] = []
    thread = threading.Thread(target=lambda: outcome.append(run_batch(worker, invs, tables)))
    started = time.monotonic()
    thread.start()
    try:
        time.sleep(0.15)
        assert worker.progress.committable() == {}  # storage acked, the CDN not yet
        thread.join(10)
    finally:
        layer.close()
    assert outcome == [True]
    assert time.monotonic() - started >= 0.3  # the Retry-After was honoured
    assert worker.progress.committable() == {TP: 42}
    assert covered(invs, purger.purged) == []


def test_the_cdn_never_passes_the_storage_side() -> None:
    progress = Progress(cdn=True)
    progress.assign([TP])
    early = progress.stamp({TP: 10}, {})
    late = progress.stamp({TP: 20}, {})
    progress.cdn_acked(late)  # out of order: must not count before the storage side
    assert progress.committable() == {}
    progress.storage_acked(early)
    progress.cdn_acked(late)
    assert progress.committable() == {TP: 10}


@pytest.mark.parametrize("stop_after", [0.05])
def test_a_stop_while_rate_limited_gives_up_without_acking(stop_after: float) -> None:
    purger = RationedPurger(quota=0, window=60)
    worker, layer = make_worker(purger, budget=None)
    worker.settings = WorkerSettings(
        bootstrap_servers="127.0.0.1:1", topics=["t"], shutdown_grace=stop_after
    )
    with worker._cdn_cond:
        worker._cdn_stop = True
    invs, tables = batch(1, 1)
    assert run_batch(worker, invs, tables) is False
    assert worker.progress.committable() == {}
    with layer._cond:  # the layer itself holds nothing: close() would not block
        assert not layer._pending


# --------------------------------------------------------------------------- one budget


def _frozen() -> float:
    return 1000.0


def test_one_purge_costs_one_token_of_the_purgers_own_bucket() -> None:
    """The worker plans with the Akamai purger's own bucket (10 tags, no refill) and
    does not keep a second one: the application's 4 keys and the worker's keys are
    each charged once, the worker escalated to what was left, and no purge was
    refused or made to wait by the purger."""
    with VendorServer(clock=_frozen) as server:
        purger = AkamaiPurger(
            server.url,
            client_token=server.akamai_client_token,
            client_secret=server.akamai_client_secret,
            access_token=server.akamai_access_token,
            bucket=TokenBucket(10, 1e-9, _frozen),
            clock=_frozen,
            sleep=lambda s: pytest.fail(f"the purger waited {s}s for its bucket"),
        )
        layer = CdnPurgeLayer(purger, name="edge")
        settings = WorkerSettings(bootstrap_servers="127.0.0.1:1", topics=["t"])
        worker = Worker(settings, rules(), [Target(layer)])  # the default budget
        assert layer.purge_keys(["app-a", "app-b", "app-c", "app-d"]).wait(10)
        assert worker._cdn_buckets["edge"].available() == pytest.approx(6)
        invs, tables = batch(20, 3)
        try:
            assert run_batch(worker, invs, tables)
        finally:
            layer.close()
        sent = server.keys("akamai")[4:]
    assert 0 < len(sent) <= 6 and worker.cdn_escalations["edge"] >= 1
    assert purger.bucket is not None
    assert purger.bucket.available() == pytest.approx(10 - 4 - len(sent))
    assert worker._cdn_buckets["edge"].available() == purger.bucket.available()
    assert covered_at(AKAMAI, invs, sent) == []


def test_a_cloudflare_budget_is_its_request_bucket_read_in_tags() -> None:
    """Cloudflare charges a request of up to 100 tags: the worker's view of the pro
    plan's 25 requests is 2,500 keys; asking whether keys fit takes nothing; a
    vendor 429 (drain) empties the one bucket both share."""
    purger = CloudflarePurger("ZONE", api_token="t", plan="pro", clock=_frozen)
    budget = CdnBudget.for_layer(CdnPurgeLayer(purger))
    assert budget is not None and (budget.capacity, budget.rate) == (2500, 500)
    view = budget.bucket()
    assert isinstance(view, PurgerBucket) and view.available() == 2500
    assert purger.bucket is not None and purger.bucket.reserve(3) == 0.0  # 3 requests sent
    assert view.available() == 2200
    assert view.take(150) == 0.0 and view.take(150) == 0.0  # two requests fit; none taken
    assert purger.bucket.available() == 22
    view.drain()
    assert purger.bucket.available() == 0 and view.take(101) == pytest.approx(2 / 5.0)


def test_a_purger_without_a_bucket_keeps_the_vendor_default() -> None:
    budget = CdnBudget.for_layer(CdnPurgeLayer(RationedPurger(quota=1)))  # type: ignore[arg-type]
    assert budget is not None and budget == CdnBudget.for_vendor("fastly")
    assert isinstance(budget.bucket(), KeyBucket)


def covered_at(scheme: Any, invs: set[Invalidation], purged: Collection[str]) -> list[Invalidation]:
    """``covered`` at another vendor's encoding."""
    done = set(purged)
    missing = []
    for inv in invs:
        assert inv.tenant is not None
        tag = Tag(inv.namespace, inv.tenant, inv.tag)
        table = PRODUCTS if inv.tag.startswith("product:") else CATEGORIES
        if set(purge_keys(scheme, [tag])) <= done or table_key(scheme, "shop", table) in done:
            continue
        if tenant_key(scheme, inv.namespace, inv.tenant) not in done:
            missing.append(inv)
    return missing
