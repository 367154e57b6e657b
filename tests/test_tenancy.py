"""Tenant scope and tenant ids: every cached call has exactly one, safe tenant.

Also the isolation property: random operations by several tenants that share
key bodies and tag names never see another tenant's value, on a memory-only,
a Redis-only and a memory+Redis cache.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
from collections.abc import Callable, Iterator
from contextvars import copy_context
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tieredcache import (
    InvalidTenantError,
    MemoryLayer,
    RedisLayer,
    TenantRequiredError,
    TieredCache,
    current_tenant,
    tenant_scope,
    validate_tenant,
)
from tieredcache.tenancy import get_tenant_var


@pytest.fixture
def cache() -> Iterator[TieredCache]:
    made = TieredCache(namespace="tenancy", layers=[MemoryLayer()])
    yield made
    made.close()


# -- tenant required -------------------------------------------------------------------


def test_sync_call_without_tenant_raises_tenant_required_naming_the_function(
    cache: TieredCache,
) -> None:
    """A cached sync call outside any tenant scope raises TenantRequiredError with its name."""
    calls: list[int] = []

    @cache.cached(ttl=60, name="catalog.get_product")
    def get_product(product_id: int) -> int:
        calls.append(product_id)
        return product_id

    with pytest.raises(TenantRequiredError, match=r"catalog\.get_product") as info:
        get_product(1)
    assert info.value.function == "catalog.get_product"
    assert calls == []


async def test_async_call_without_tenant_raises_tenant_required_naming_the_function(
    cache: TieredCache,
) -> None:
    """An awaited cached call outside any tenant scope raises TenantRequiredError with its
    default name (module.qualname)."""
    calls: list[int] = []

    @cache.cached(ttl=60)
    async def load_order(order_id: int) -> int:
        calls.append(order_id)
        return order_id

    with pytest.raises(TenantRequiredError) as info:
        await load_order(7)
    assert "load_order" in str(info.value)
    assert info.value.function.endswith("load_order")
    assert calls == []


def test_invalidate_key_and_explicit_api_without_tenant_raise_tenant_required(
    cache: TieredCache,
) -> None:
    """.invalidate(), .key(), cache.get/set/invalidate need a tenant too: no shared entries."""

    @cache.cached(ttl=60, name="f")
    def f(x: int) -> int:
        return x

    for attempt in (
        lambda: f.invalidate(1),
        lambda: f.key(1),
        lambda: cache.get("k"),
        lambda: cache.set("k", 1, ttl=5),
        lambda: cache.invalidate(["k"]),
    ):
        with pytest.raises(TenantRequiredError):
            attempt()


def test_tenant_param_left_at_its_none_default_raises_tenant_required(
    cache: TieredCache,
) -> None:
    """A `tenant` parameter that defaults to None and is not passed is a missing tenant
    (TenantRequiredError naming the function), as passing tenant=None explicitly is."""

    @cache.cached(ttl=60, name="reports.summary")
    def summary(period: str, tenant: str | None = None) -> str:
        return f"{tenant}:{period}"

    with pytest.raises(TenantRequiredError, match=r"reports\.summary"):
        summary("q1", tenant=None)
    with pytest.raises(TenantRequiredError, match=r"reports\.summary"):
        summary("q1")


# -- tenant from a parameter -----------------------------------------------------------


def test_tenant_comes_from_the_tenant_parameter(cache: TieredCache) -> None:
    """A function with a `tenant` parameter caches per value of it, positional or keyword,
    and the parameter is not part of the key body."""
    calls: list[tuple[str, int]] = []

    @cache.cached(ttl=60, name="inv.stock")
    def stock(tenant: str, sku: int) -> str:
        calls.append((tenant, sku))
        return f"{tenant}:{sku}"

    assert stock("acme", 1) == "acme:1"
    assert stock(tenant="acme", sku=1) == "acme:1"
    assert stock("globex", 1) == "globex:1"
    assert calls == [("acme", 1), ("globex", 1)]
    key_a, key_g = stock.key("acme", 1), stock.key("globex", 1)
    assert (key_a.tenant, key_g.tenant) == ("acme", "globex")
    assert key_a.body == key_g.body
    assert "acme" not in key_a.body


def test_tenant_parameter_wins_over_the_scope(cache: TieredCache) -> None:
    """Inside tenant_scope('acme') a call passing tenant='globex' is cached for globex."""

    @cache.cached(ttl=60, name="inv.stock")
    def stock(sku: int, tenant: str) -> str:
        return f"{tenant}:{sku}"

    with tenant_scope("acme"):
        assert stock(1, tenant="globex") == "globex:1"
        assert stock.key(1, tenant="globex").tenant == "globex"


def test_custom_tenant_param_names_the_tenant_parameter(cache: TieredCache) -> None:
    """tenant_param='org' takes the tenant from `org`; a name that is no parameter is refused."""
    from tieredcache import ConfigurationError

    @cache.cached(ttl=60, name="org.members", tenant_param="org")
    def members(org: str, page: int = 0) -> str:
        return f"{org}:{page}"

    assert members("acme") == "acme:0"
    assert members.key("acme").tenant == "acme"
    assert members.key("acme").body == members.key("globex").body

    with pytest.raises(ConfigurationError, match="org"):

        @cache.cached(ttl=60, tenant_param="org")
        def other(x: int) -> int:
            return x


def test_invalid_tenant_in_the_tenant_parameter_is_rejected(cache: TieredCache) -> None:
    """A tenant parameter holding a forged id ('a:b') raises InvalidTenantError, no call."""
    calls: list[str] = []

    @cache.cached(ttl=60)
    def f(tenant: str) -> str:
        calls.append(tenant)
        return tenant

    with pytest.raises(InvalidTenantError):
        f("acme:victim")
    assert calls == []


# -- tenant id validation ----------------------------------------------------------------

INVALID_TENANTS = [
    ("", "must not be empty"),
    ("acme:globex", "character ':'"),
    ("acme{1}", "character '{'"),
    ("acme}", "character '}'"),
    ("acme*", "character '*'"),
    ("acme?", "character '?'"),
    ("acme[0]", "character '['"),
    ("acme|x", "character '|'"),
    ("ac me", "character ' '"),
    ("acme\t", r"character '\t'"),
    ("acme\n", r"character '\n'"),
    ("acme\x00", r"character '\x00'"),
    ("acme\x1b", r"character '\x1b'"),
    ("acmé", "character 'é'"),
    ("\u0430cme", "character '\u0430'"),  # Cyrillic a, a homoglyph of ASCII a
    ("\uff41cme", "character '\uff41'"),  # full-width a
    ("a" * 65, "longer than 64"),
    ("-acme", "must start with a letter or digit"),
    (".acme", "must start with a letter or digit"),
    ("_acme", "must start with a letter or digit"),
]


@pytest.mark.parametrize(("tenant", "rule"), INVALID_TENANTS)
def test_invalid_tenant_id_is_rejected_naming_the_rule(tenant: str, rule: str) -> None:
    """validate_tenant and tenant_scope reject unsafe ids with InvalidTenantError(rule)."""
    with pytest.raises(InvalidTenantError, match=re.escape(rule)) as info:
        validate_tenant(tenant)
    assert info.value.tenant == tenant
    assert info.value.reason
    with pytest.raises(InvalidTenantError, match=re.escape(rule)), tenant_scope(tenant):
        pass
    assert current_tenant() is None


@pytest.mark.parametrize("tenant", [None, 42, b"acme", ["acme"], 1.5])
def test_non_str_tenant_is_rejected_naming_the_type(tenant: object) -> None:
    """A tenant that is not a str raises InvalidTenantError naming its type."""
    with pytest.raises(InvalidTenantError, match=f"must be a str, not {type(tenant).__name__}"):
        validate_tenant(tenant)


@pytest.mark.parametrize("tenant", ["a", "acme", "acme-eu.1", "A_b-C.9", "7", "a" * 64])
def test_valid_tenant_ids_are_accepted_unchanged(tenant: str) -> None:
    """Ids of [A-Za-z0-9._-], 1-64 characters, starting alphanumeric, pass as they are."""
    assert validate_tenant(tenant) == tenant
    with tenant_scope(tenant) as scoped:
        assert scoped == tenant
        assert current_tenant() == tenant


@pytest.mark.parametrize(("tenant", "rule"), INVALID_TENANTS[:6])
def test_explicit_api_rejects_invalid_tenant_argument(
    cache: TieredCache, tenant: str, rule: str
) -> None:
    """cache.get/set/invalidate(tenant=...) validate the id like tenant_scope does."""
    with pytest.raises(InvalidTenantError, match=re.escape(rule)):
        cache.get("k", tenant=tenant)
    with pytest.raises(InvalidTenantError, match=re.escape(rule)):
        cache.set("k", 1, ttl=5, tenant=tenant)
    with pytest.raises(InvalidTenantError, match=re.escape(rule)):
        cache.invalidate(["k"], tenant=tenant)


# -- ContextVar scope --------------------------------------------------------------------


def test_scope_resets_after_the_block_and_nests() -> None:
    """tenant_scope restores the previous tenant on exit, also when nested."""
    assert current_tenant() is None
    with tenant_scope("outer"):
        assert current_tenant() == "outer"
        with tenant_scope("inner"):
            assert current_tenant() == "inner"
        assert current_tenant() == "outer"
    assert current_tenant() is None


def test_scope_resets_when_the_block_raises() -> None:
    """An exception inside tenant_scope still restores the previous tenant."""
    with pytest.raises(RuntimeError), tenant_scope("acme"):
        raise RuntimeError("boom")
    assert current_tenant() is None


def test_scope_set_by_middleware_through_the_context_var_is_seen() -> None:
    """Setting the ContextVar from get_tenant_var() with a token is the same as tenant_scope."""
    var = get_tenant_var()
    token = var.set("acme")
    try:
        assert current_tenant() == "acme"
    finally:
        var.reset(token)
    assert current_tenant() is None


def test_scopes_in_concurrent_threads_do_not_leak(cache: TieredCache) -> None:
    """Threads each in their own tenant_scope see only their tenant, also through cached
    calls running at the same time."""

    @cache.cached(ttl=60, name="whoami")
    def whoami(n: int) -> str | None:
        return current_tenant()

    barrier = threading.Barrier(8)
    seen: dict[str, list[str | None]] = {}
    errors: list[BaseException] = []

    def worker(tenant: str) -> None:
        try:
            with tenant_scope(tenant):
                barrier.wait(timeout=5)
                seen[tenant] = [current_tenant(), whoami(1), whoami(2)]
                barrier.wait(timeout=5)
                seen[tenant].append(current_tenant())
            seen[tenant].append(current_tenant())
        except BaseException as exc:  # collected: a thread's failure must fail the test
            errors.append(exc)

    tenants = [f"t{i}" for i in range(8)]
    threads = [threading.Thread(target=worker, args=(t,)) for t in tenants]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == []
    assert seen == {t: [t, t, t, t, None] for t in tenants}
    assert current_tenant() is None


def test_scope_reaches_work_submitted_with_a_copied_context() -> None:
    """A thread started with copy_context().run inherits the scope; a bare thread does not."""
    results: dict[str, str | None] = {}
    with tenant_scope("acme"):
        ctx = copy_context()
        bare = threading.Thread(target=lambda: results.__setitem__("bare", current_tenant()))
        copied = threading.Thread(
            target=lambda: ctx.run(lambda: results.__setitem__("copied", current_tenant()))
        )
        bare.start()
        copied.start()
        bare.join()
        copied.join()
    assert results == {"bare": None, "copied": "acme"}


async def test_scopes_in_concurrent_asyncio_tasks_do_not_leak(cache: TieredCache) -> None:
    """Tasks inherit the scope they were created in; a task's own scope stays in the task."""

    @cache.cached(ttl=60, name="awhoami")
    async def awhoami(n: int) -> str | None:
        await asyncio.sleep(0)
        return current_tenant()

    async def in_scope(tenant: str) -> list[str | None]:
        with tenant_scope(tenant):
            await asyncio.sleep(0.01)  # suspend inside the scope, so the tasks interleave
            first = current_tenant()
            value = await awhoami(1)
            await asyncio.sleep(0.01)
            return [first, value, current_tenant()]

    results = await asyncio.gather(*(in_scope(f"t{i}") for i in range(10)))
    assert results == [[f"t{i}"] * 3 for i in range(10)]
    assert current_tenant() is None

    with tenant_scope("parent"):
        inherited = await asyncio.create_task(awhoami(2))
        in_thread = await asyncio.to_thread(current_tenant)
    assert (inherited, in_thread) == ("parent", "parent")
    assert current_tenant() is None


# -- isolation property ------------------------------------------------------------------

TENANTS = ["acme", "globex", "initech"]
BODIES = ["p:1", "user:1"]
TAG_NAMES = ["red", "blue"]

tenants_st = st.sampled_from(TENANTS)
bodies_st = st.sampled_from(BODIES)
tags_st = st.lists(st.sampled_from(TAG_NAMES), max_size=2, unique=True)
operation_st = st.one_of(
    st.tuples(st.just("set"), tenants_st, bodies_st, tags_st),
    st.tuples(st.just("invalidate_key"), tenants_st, bodies_st),
    st.tuples(st.just("invalidate_tag"), tenants_st, st.sampled_from(TAG_NAMES)),
    st.tuples(st.just("call"), tenants_st, bodies_st),
    st.tuples(st.just("invalidate_call"), tenants_st, bodies_st),
)


def call_tag(body: str) -> str:
    """The tag a decorated call for ``body`` carries (shared names with explicit tags)."""
    return "red" if body.startswith("p") else "blue"


@dataclass
class Stored:
    """An explicit entry in the model. ``old_tags``: tags an earlier value of the key carried;
    invalidating one of them may or may not drop this value (exactness is pinned by the
    test_contract.py tests on re-tagged keys), so such a value becomes ``uncertain``:
    present or a miss, never anything else."""

    value: str
    tags: frozenset[str]
    old_tags: frozenset[str]
    uncertain: bool = False


@dataclass
class Model:
    """What each tenant should see: explicit entries and decorated results."""

    explicit: dict[tuple[str, str], Stored]
    calls: dict[tuple[str, str], str]
    # Tags each (tenant, body) carried at some point since that tag was last invalidated.
    tag_history: dict[tuple[str, str], set[str]]


_namespaces = itertools.count()


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("memory+redis", marks=pytest.mark.redis),
    ]
)
def make_cache(request: pytest.FixtureRequest) -> Iterator[Callable[[], TieredCache]]:
    """Builds caches of one composition, each in a namespace of its own (no flush needed)."""
    made: list[TieredCache] = []
    url = request.getfixturevalue("redis_url") if "redis" in request.param else None

    def build() -> TieredCache:
        layers: list[MemoryLayer | RedisLayer] = []
        if "memory" in request.param:
            layers.append(MemoryLayer())
        if url is not None:
            layers.append(RedisLayer(url=url))
        cache = TieredCache(namespace=f"iso{next(_namespaces)}", layers=layers, broadcast=False)
        made.append(cache)
        return cache

    yield build
    for cache in made:
        cache.close()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(operations=st.lists(operation_st, min_size=1, max_size=30))
def test_random_operations_never_return_another_tenants_value(
    make_cache: Callable[[], TieredCache], operations: list[tuple[str, ...]]
) -> None:
    """Sets, key/tag invalidations and decorated calls by several tenants over shared bodies
    and tag names; after every step each tenant reads exactly its own latest value or a miss."""
    cache = make_cache()
    counter = itertools.count()

    @cache.cached(ttl=300, name="load", tags=lambda body: [call_tag(body)])
    def load(body: str) -> str:
        return f"{current_tenant()}|{body}|{next(counter)}"

    model = Model(explicit={}, calls={}, tag_history={})

    def call(tenant: str, body: str) -> str:
        with tenant_scope(tenant):
            got = load(body)
        assert got.startswith(f"{tenant}|{body}|"), (tenant, body, got)
        return got

    def check_all(step: tuple[str, ...]) -> None:
        for tenant in TENANTS:
            for body in BODIES:
                want = model.explicit.get((tenant, body))
                got = cache.get(body, tenant=tenant)
                if want is not None and want.uncertain:
                    assert got in (None, want.value), (step, tenant, body, got)
                    if got is None:
                        del model.explicit[(tenant, body)]
                    else:
                        want.uncertain = False
                    continue
                assert got == (None if want is None else want.value), (step, tenant, body, got)
        for (tenant, body), want_call in model.calls.items():
            assert call(tenant, body) == want_call, (step, tenant, body)

    try:
        for op in operations:
            kind, tenant = op[0], op[1]
            if kind == "set":
                value = f"{tenant}|{op[2]}|{next(counter)}"
                cache.set(op[2], value, ttl=300, tags=op[3], tenant=tenant)
                tags = frozenset(op[3])
                history = model.tag_history.setdefault((tenant, op[2]), set())
                model.explicit[(tenant, op[2])] = Stored(value, tags, frozenset(history - tags))
                history.update(tags)
            elif kind == "invalidate_key":
                assert cache.invalidate([op[2]], tenant=tenant).ok
                model.explicit.pop((tenant, op[2]), None)
            elif kind == "invalidate_tag":
                assert cache.invalidate(tags=[op[2]], tenant=tenant).ok
                for (t, body), stored in list(model.explicit.items()):
                    if t == tenant and op[2] in stored.tags:
                        del model.explicit[(t, body)]
                    elif t == tenant and op[2] in stored.old_tags:
                        stored.uncertain = True
                for (t, _), history in model.tag_history.items():
                    if t == tenant:
                        history.discard(op[2])
                for t, body in list(model.calls):
                    if t == tenant and call_tag(body) == op[2]:
                        del model.calls[(t, body)]
            elif kind == "call":
                got = call(tenant, op[2])
                want_call = model.calls.get((tenant, op[2]))
                assert want_call is None or got == want_call, (op, got)
                model.calls[(tenant, op[2])] = got
            else:  # invalidate_call
                with tenant_scope(tenant):
                    assert load.invalidate(op[2]).ok
                model.calls.pop((tenant, op[2]), None)
            check_all(op)
    finally:
        cache.close()
