"""CDN purge layer: surrogate encoding, the vendor purgers against the local fake
vendor APIs (tests/cdn_vendor_server.py), EdgeGrid signing and CdnPurgeLayer."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import httpx
import pytest

from tests.cdn_vendor_server import VendorServer
from tieredcache.errors import BackendError, BackendTimeoutError, InvalidKeyError
from tieredcache.keys import CacheKey, Tag
from tieredcache.layers.base import InvalidationLayer
from tieredcache.layers.cdn import (
    AKAMAI,
    CLOUDFLARE,
    FASTLY,
    VARNISH,
    AkamaiPurger,
    CdnPurgeLayer,
    CloudflarePurger,
    FastlyPurger,
    PurgeAck,
    Purger,
    PurgeRateLimitedError,
    PurgeRequest,
    PurgeResult,
    RetryPolicy,
    TokenBucket,
    cache_key_key,
    edgegrid_authorization,
    purge_keys,
    response_header,
    table_key,
    tag_key,
    tenant_key,
)
from tieredcache.layers.cdn.surrogate import SurrogateScheme

ALL_SCHEMES = [FASTLY, VARNISH, CLOUDFLARE, AKAMAI]
Mode = Literal["sync", "async"]


class FakeClock:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(clock: FakeClock) -> Iterator[VendorServer]:
    with VendorServer(cloudflare_plan="pro", clock=clock) as vendor:
        yield vendor


def _timing(clock: FakeClock) -> dict[str, Any]:
    return {"clock": clock, "sleep": clock.sleep, "asleep": clock.asleep, "rand": lambda: 0.5}


def fastly(server: VendorServer, clock: FakeClock, **options: Any) -> FastlyPurger:
    return FastlyPurger(
        server.fastly_service, server.fastly_key, base_url=server.url, **_timing(clock), **options
    )


def cloudflare(server: VendorServer, clock: FakeClock, **options: Any) -> CloudflarePurger:
    options.setdefault("plan", "pro")
    return CloudflarePurger(
        server.cloudflare_zone,
        server.cloudflare_token,
        base_url=server.url,
        **_timing(clock),
        **options,
    )


def akamai(server: VendorServer, clock: FakeClock, **options: Any) -> AkamaiPurger:
    options.setdefault("client_secret", server.akamai_client_secret)
    return AkamaiPurger(
        server.url,
        client_token=server.akamai_client_token,
        access_token=server.akamai_access_token,
        **_timing(clock),
        **options,
    )


def run(purger: Purger, keys: Sequence[str], mode: Mode, *, soft: bool = False) -> PurgeResult:
    """Purge through the sync or the async driver, then close the purger."""
    if mode == "sync":
        try:
            return purger.purge(keys, soft=soft)
        finally:
            purger.close()

    async def go() -> PurgeResult:
        try:
            return await purger.apurge(keys, soft=soft)
        finally:
            await purger.aclose()

    return asyncio.run(go())


MODES: list[Mode] = ["sync", "async"]


# --------------------------------------------------------------------- package


def test_public_names_and_docstring_examples() -> None:
    """__all__ is sorted and importable, and every docstring example in the package runs."""
    import doctest
    import importlib

    import tieredcache.layers.cdn as cdn

    assert cdn.__all__ == sorted(cdn.__all__)
    assert len(set(cdn.__all__)) == len(cdn.__all__)
    assert all(hasattr(cdn, name) for name in cdn.__all__)
    modules = ["akamai", "base", "cloudflare", "edgegrid", "errors", "fastly", "layer"]
    modules += ["limits", "model", "surrogate", "ticket", "varnish"]
    for name in modules:
        module = importlib.import_module(f"tieredcache.layers.cdn.{name}")
        result = doctest.testmod(module)
        assert result.failed == 0, name


# --------------------------------------------------------------------- surrogate keys


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: s.vendor)
def test_case_different_tenants_never_collide(scheme: SurrogateScheme) -> None:
    """'Acme' and 'acme' get different keys, even where the vendor ignores case."""
    upper = tag_key(scheme, Tag("shop", "Acme", "product:1"))
    lower = tag_key(scheme, Tag("shop", "acme", "product:1"))
    if scheme.safe is not None:
        assert upper.lower() != lower.lower()
        assert upper == upper.lower()
    assert upper != lower
    tenant_upper, tenant_lower = (
        tenant_key(scheme, "shop", "Acme"),
        tenant_key(scheme, "shop", "acme"),
    )
    assert tenant_upper != tenant_lower
    if scheme.safe is not None:
        assert tenant_upper.lower() != tenant_lower.lower()


@pytest.mark.parametrize("scheme", [CLOUDFLARE, AKAMAI], ids=lambda s: s.vendor)
def test_case_insensitive_encoding_is_injective(scheme: SurrogateScheme) -> None:
    """Every tenant id of up to 3 characters over 'aA_1-' maps to a distinct lowercase key,
    including the escape character itself ('a_41' vs 'aA')."""
    seen: dict[str, str] = {}
    for length in (1, 2, 3):
        for chars in itertools.product("aA_1-", repeat=length):
            tenant = "".join(chars)
            if not tenant[0].isalnum():
                continue
            key = tag_key(scheme, Tag("ns", tenant, "t")).lower()
            assert key not in seen, (tenant, seen.get(key))
            seen[key] = tenant


def test_akamai_keys_stay_short_and_in_a_safe_alphabet() -> None:
    """A 200-character tag becomes a digest key within Akamai's 128 characters and alphabet."""
    safe = set("abcdefghijklmnopqrstuvwxyz0123456789.-_~")
    long_a = tag_key(AKAMAI, Tag("shop", "Acme", "x" * 199 + "a"))
    long_b = tag_key(AKAMAI, Tag("shop", "Acme", "x" * 199 + "b"))
    assert len(long_a) <= 128 and set(long_a) <= safe
    assert long_a != long_b
    assert long_a.startswith("shop_3a_41cme_3a~")  # still tenant-prefixed


def test_surrogate_kinds_do_not_collide() -> None:
    """Tag keys, the tenant key, the overflow key, cache-key keys and table keys are distinct."""
    for scheme in ALL_SCHEMES:
        keys = [
            tag_key(scheme, Tag("shop", "acme", "orders")),
            tenant_key(scheme, "shop", "acme"),
            *purge_keys(scheme, [Tag("shop", "acme", "orders")]),
            cache_key_key(scheme, CacheKey("shop", "acme", "orders")),
            table_key(scheme, "shop", "orders"),
        ]
        assert len(set(keys)) == len(keys) - 1  # purge_keys repeats the tag key
        assert table_key(scheme, "shop", "orders") == table_key(scheme, "shop", "orders")


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: s.vendor)
def test_response_header_and_purge_use_the_same_keys(scheme: SurrogateScheme) -> None:
    """Every key a purge sends for a tag is the one the response was tagged with."""
    tags = [Tag("shop", "Acme", "product:1"), Tag("shop", "Acme", "list/all")]
    name, value = response_header(scheme, tags, tables=[("shop", "products")])
    assert name == scheme.header
    sent = value.split(scheme.separator)
    for tag in tags:
        assert tag_key(scheme, tag) in sent
    assert tenant_key(scheme, "shop", "Acme") in sent
    assert table_key(scheme, "shop", "products") in sent


@pytest.mark.parametrize(
    ("scheme", "count"), [(AKAMAI, 200), (FASTLY, 200), (CLOUDFLARE, 200), (VARNISH, 100)]
)
def test_header_over_the_limit_falls_back_to_coarse_keys(
    scheme: SurrogateScheme, count: int
) -> None:
    """Too many tags for the vendor: the response carries the tenant and overflow keys
    instead (never a cut list), and a purge of any one tag sends that overflow key."""
    tags = [Tag("shop", "acme", f"product:{i}:" + "x" * 150) for i in range(count)]
    _, value = response_header(scheme, tags)
    sent = value.split(scheme.separator)
    assert tag_key(scheme, tags[0]) not in sent
    assert tenant_key(scheme, "shop", "acme") in sent
    overflow = purge_keys(scheme, [tags[7]])[-1]
    assert overflow in sent
    assert len(value) <= scheme.max_header_length


def test_header_within_limits_is_kept_whole() -> None:
    """128 short tags fit Akamai's 128-keys-an-object only without the tenant key: fallback;
    126 fit with it: no fallback."""
    tags = [Tag("shop", "acme", f"p{i}") for i in range(126)]
    _, value = response_header(AKAMAI, tags)
    assert len(value.split(",")) == 127
    _, value = response_header(AKAMAI, [*tags, Tag("shop", "acme", "p999"), Tag("shop", "b", "q")])
    assert tag_key(AKAMAI, tags[0]) not in value.split(",")


# --------------------------------------------------------------------- EdgeGrid

# Akamai's published EdgeGrid test vectors (shared by the official clients).
_EG = {
    "client_token": "akab-client-token-xxx-xxxxxxxxxxxxxxxx",
    "access_token": "akab-access-token-xxx-xxxxxxxxxxxxxxxx",
    "client_secret": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx=",
    "timestamp": "20140321T19:34:21+0000",
    "nonce": "nonce-xx-xxxx-xxxx-xxxx-xxxxxxxxxxxx",
    "max_body": 2048,
}
_EG_HOST = "https://akaa-baseurl-xxxxxxxxxxx-xxxxxxxxxxxxx.luna.akamaiapis.net"


@pytest.mark.parametrize(
    ("method", "path", "body", "signature"),
    [
        ("GET", "/", b"", "tL+y4hxyHxgWVD30X3pWnGKHcPzmrIF+LThiAOhMxYU="),
        ("GET", "/testapi/v1/t1?p1=1&p2=2", b"", "hKDH1UlnQySSHjvIcZpDMbQHihTQ0XyVAKZaApabdeA="),
        (
            "POST",
            "/testapi/v1/t3",
            b"datadatadatadatadatadatadatadata",
            "hXm4iCxtpN22m4cbZb4lVLW5rhX8Ca82vCFqXzSTPe4=",
        ),
        ("POST", "/testapi/v1/t3", b"d" * 3000, "6Q6PiTipLae6n4GsSIDTCJ54bEbHUBp+4MUXrbQCBoY="),
    ],
)
def test_edgegrid_matches_the_published_vectors(
    method: str, path: str, body: bytes, signature: str
) -> None:
    """Our EG1-HMAC-SHA256 signer reproduces Akamai's published test vectors."""
    header = edgegrid_authorization(method=method, url=_EG_HOST + path, body=body, **_EG)  # type: ignore[arg-type]
    assert header.endswith(f";signature={signature}")
    assert header.startswith("EG1-HMAC-SHA256 client_token=akab-client-token-xxx")


# --------------------------------------------------------------------- Fastly


@pytest.mark.parametrize("mode", MODES)
def test_fastly_batches_256_keys_a_request(
    server: VendorServer, clock: FakeClock, mode: Mode
) -> None:
    """600 keys go out as 256 + 256 + 88, soft purge flagged; all acknowledged."""
    keys = [f"shop:acme:k{i}" for i in range(600)]
    result = run(fastly(server, clock), keys, mode, soft=True)
    assert [len(p.keys) for p in server.purges] == [256, 256, 88]
    assert all(p.soft for p in server.purges)
    assert server.keys("fastly") == keys
    assert [a.status for a in result.acks] == [200, 200, 200]


@pytest.mark.parametrize("mode", MODES)
def test_fastly_oversize_key_is_refused_before_sending(
    server: VendorServer, clock: FakeClock, mode: Mode
) -> None:
    """A 1025-byte key is refused whole, not cut; nothing is sent."""
    with pytest.raises(InvalidKeyError, match="1-1024 bytes"):
        run(fastly(server, clock), ["ok", "k" * 1025], mode)
    assert server.requests["fastly"] == 0


def test_fastly_server_enforces_its_limits(server: VendorServer, clock: FakeClock) -> None:
    """The fake Fastly itself refuses 257 keys and a 1025-byte key (guards the fake)."""
    from tieredcache.layers.cdn import fastly as fastly_module

    purger = fastly(server, clock)
    # Bypass the purger's own checks to hit the server with illegal requests.
    purger._check_keys = lambda keys: None  # type: ignore[method-assign]
    try:
        with pytest.raises(BackendError, match="1024 bytes"):
            purger.purge(["k" * 1025])
        original = fastly_module.MAX_KEYS_PER_REQUEST
        fastly_module.MAX_KEYS_PER_REQUEST = 257  # type: ignore[misc]
        try:
            with pytest.raises(BackendError, match="256"):
                purger.purge([f"k{i}" for i in range(257)])
        finally:
            fastly_module.MAX_KEYS_PER_REQUEST = original  # type: ignore[misc]
    finally:
        purger.close()
    assert server.purges == []


@pytest.mark.parametrize("mode", MODES)
def test_5xx_is_retried_with_backoff_then_succeeds(
    server: VendorServer, clock: FakeClock, mode: Mode
) -> None:
    """Two 503s then success: three requests, two growing backoff sleeps."""
    server.fail_next("fastly", 2, 503)
    run(fastly(server, clock, retry=RetryPolicy(base_delay=0.1)), ["shop:acme:a"], mode)
    assert server.requests["fastly"] == 3
    assert clock.sleeps == pytest.approx([0.075, 0.15])
    assert server.keys("fastly") == ["shop:acme:a"]


@pytest.mark.parametrize("mode", MODES)
def test_5xx_past_the_attempt_budget_is_reported(
    server: VendorServer, clock: FakeClock, mode: Mode
) -> None:
    """Persistent 502s: exactly max_attempts requests, then a BackendError naming the status."""
    server.fail_next("fastly", 10, 502)
    with pytest.raises(BackendError, match=r"HTTP 502.*after 3 attempts"):
        run(fastly(server, clock, retry=RetryPolicy(max_attempts=3)), ["shop:acme:a"], mode)
    assert server.requests["fastly"] == 3


def test_retries_stop_at_the_total_time_budget(server: VendorServer, clock: FakeClock) -> None:
    """With a 0.5 s total budget and 0.3 s delays, only two attempts fit."""
    server.fail_next("fastly", 10, 503)
    policy = RetryPolicy(max_attempts=10, base_delay=0.4, max_delay=0.4, total_timeout=0.5)
    with pytest.raises(BackendError, match="after 2 attempts"):
        run(fastly(server, clock, retry=policy), ["k"], "sync")


@pytest.mark.parametrize("mode", MODES)
def test_connect_errors_are_retried_then_reported(clock: FakeClock, mode: Mode) -> None:
    """Nothing listening: bounded retries, then BackendError (not an httpx error)."""
    from scripts.varnish_service import free_port

    purger = FastlyPurger(
        "svc",
        "key",
        base_url=f"http://127.0.0.1:{free_port()}",
        retry=RetryPolicy(max_attempts=2),
        **_timing(clock),
    )
    with pytest.raises(BackendError, match=r"ConnectError.*after 2 attempts") as info:
        run(purger, ["k"], mode)
    assert not isinstance(info.value, BackendTimeoutError)
    assert len(clock.sleeps) == 1


def test_timeouts_are_reported_as_backend_timeout(clock: FakeClock) -> None:
    """The sans-I/O flow, driven by hand: two read timeouts end in BackendTimeoutError."""
    from tieredcache.layers.cdn.base import _Send, _Sleep

    purger = FastlyPurger(
        "svc", "key", base_url="http://x", retry=RetryPolicy(max_attempts=2), **_timing(clock)
    )
    flow = purger._flow(["k"], False)
    assert isinstance(next(flow), _Send)
    assert isinstance(flow.send(httpx.ReadTimeout("slow")), _Sleep)
    assert isinstance(flow.send(None), _Send)
    with pytest.raises(BackendTimeoutError, match="timed out"):
        flow.send(httpx.ReadTimeout("slow"))


@pytest.mark.parametrize("mode", MODES)
def test_bad_credentials_are_not_retried(
    server: VendorServer, clock: FakeClock, mode: Mode
) -> None:
    """401 is a configuration error: one request, reported at once."""
    purger = FastlyPurger(server.fastly_service, "wrong-key", base_url=server.url, **_timing(clock))
    with pytest.raises(BackendError, match="refused: HTTP 401"):
        run(purger, ["k"], mode)
    assert server.requests["fastly"] == 1 and clock.sleeps == []


# --------------------------------------------------------------------- Cloudflare


@pytest.mark.parametrize("mode", MODES)
def test_cloudflare_batches_100_tags_a_request(
    server: VendorServer, clock: FakeClock, mode: Mode
) -> None:
    """250 tags go out as 100 + 100 + 50."""
    tags = [tag_key(CLOUDFLARE, Tag("shop", "Acme", f"p{i}")) for i in range(250)]
    result = run(cloudflare(server, clock), tags, mode)
    assert [len(p.keys) for p in server.purges] == [100, 100, 50]
    assert server.keys("cloudflare") == tags
    assert all(a.purge_id for a in result.acks)


@pytest.mark.parametrize("mode", MODES)
def test_cloudflare_429_retry_after_is_honoured(
    server: VendorServer, clock: FakeClock, mode: Mode
) -> None:
    """The zone's bucket is empty (another client): 429 Retry-After 1 is slept, then accepted;
    the 429 does not use up the single attempt."""
    server.cloudflare_bucket.drain()
    purger = cloudflare(
        server, clock, retry=RetryPolicy(max_attempts=1), bucket=TokenBucket(1000, 1000, clock)
    )
    run(purger, ["t1"], mode)
    assert clock.sleeps == [1.0]
    assert server.requests["cloudflare"] == 2
    assert server.keys("cloudflare") == ["t1"]


@pytest.mark.parametrize("mode", MODES)
def test_cloudflare_429_past_the_wait_budget_is_rate_limited(
    server: VendorServer, clock: FakeClock, mode: Mode
) -> None:
    """Free plan, empty zone bucket: Retry-After 12 s exceeds a 5 s budget, so the call
    raises PurgeRateLimitedError with retry_after and every unsent key."""
    free = VendorServer(cloudflare_plan="free", clock=clock).start()
    try:
        free.cloudflare_bucket.drain()
        purger = cloudflare(free, clock, plan="free", bucket=TokenBucket(1000, 1000, clock))
        tags = [f"t{i}" for i in range(150)]
        with pytest.raises(PurgeRateLimitedError) as info:
            run(purger, tags, mode)
    finally:
        free.stop()
    assert info.value.retry_after == 12.0
    assert info.value.keys == tuple(tags)
    assert clock.sleeps == []


@pytest.mark.parametrize("mode", MODES)
def test_cloudflare_client_bucket_paces_requests(
    server: VendorServer, clock: FakeClock, mode: Mode
) -> None:
    """Pro plan (bucket 25, 5/s): 30 requests' worth of tags: 25 at once, then 5 paced
    at 0.2 s each by the client bucket; Cloudflare never has to answer 429."""
    purger = cloudflare(server, clock, retry=RetryPolicy(rate_limit_wait=10))
    run(purger, [f"t{i}" for i in range(3000)], mode)
    assert server.requests["cloudflare"] == 30
    assert clock.sleeps == pytest.approx([0.2] * 5)
    assert all(status != 429 for _, status, _ in server.rejections)


def test_cloudflare_client_bucket_reports_rate_limit(
    server: VendorServer, clock: FakeClock
) -> None:
    """Past the wait budget the client bucket raises instead of sleeping on."""
    purger = cloudflare(server, clock, retry=RetryPolicy(rate_limit_wait=0.3))
    with pytest.raises(PurgeRateLimitedError) as info:
        run(purger, [f"t{i}" for i in range(3000)], "sync")
    assert server.requests["cloudflare"] == 26
    assert info.value.retry_after == pytest.approx(0.2)
    assert len(info.value.keys) == 3000 - 2600


# --------------------------------------------------------------------- Akamai


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("soft", "action"), [(True, "invalidate"), (False, "delete")])
def test_akamai_signed_purge_is_accepted(
    server: VendorServer, clock: FakeClock, mode: Mode, soft: bool, action: str
) -> None:
    """EdgeGrid-signed request to invalidate (soft) or delete: 201 with estimatedSeconds."""
    tags = [tag_key(AKAMAI, Tag("shop", "Acme", "p1"))]
    result = run(akamai(server, clock), tags, mode, soft=soft)
    assert server.purges[0].path == f"/ccu/v3/{action}/tag/production"
    assert result.acks[0].status == 201
    assert result.acks[0].estimated_seconds == 5.0


def test_akamai_wrong_secret_fails_signature(server: VendorServer, clock: FakeClock) -> None:
    """A wrong client secret is caught by the server's signature check: 401, no retry."""
    purger = akamai(server, clock, client_secret="not-the-secret")
    with pytest.raises(BackendError, match="signature does not match"):
        run(purger, ["t"], "sync")
    assert server.requests["akamai"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_akamai_bodies_stay_under_50kb(server: VendorServer, clock: FakeClock, mode: Mode) -> None:
    """1000 128-character tags (~131 KB) are split into bodies of at most 50,000 bytes,
    each signed with a fresh nonce."""
    tags = [f"{i:04d}" + "t" * 124 for i in range(1000)]
    result = run(akamai(server, clock), tags, mode)
    assert len(result.acks) == 3
    assert server.keys("akamai") == tags
    assert server.rejections == []


def test_akamai_tag_bucket_waits_then_rate_limits(server: VendorServer, clock: FakeClock) -> None:
    """5,000 tags pass at once; 500 more must wait a minute for the refill: within a
    90 s budget they wait, within a 10 s budget they are reported rate limited."""
    first = [f"a{i}" for i in range(5000)]
    run(akamai(server, clock), first, "sync")
    purger = akamai(server, clock, retry=RetryPolicy(rate_limit_wait=10))
    # Share the bucket state: a fresh purger starts full, so drain it like the server.
    assert purger.bucket is not None
    purger.bucket.reserve(5000)
    with pytest.raises(PurgeRateLimitedError) as info:
        run(purger, [f"b{i}" for i in range(500)], "sync")
    assert info.value.retry_after == pytest.approx(60.0)
    patient = akamai(server, clock, retry=RetryPolicy(rate_limit_wait=90))
    assert patient.bucket is not None
    patient.bucket.reserve(5000)
    run(patient, [f"b{i}" for i in range(500)], "sync")
    assert clock.sleeps == pytest.approx([60.0])
    assert server.rejections == []


def test_akamai_server_answers_429_over_its_tag_bucket(
    server: VendorServer, clock: FakeClock
) -> None:
    """The fake enforces its own tag bucket: a client bucket that lets too much through
    meets a 429 with Retry-After 1, sleeps it and is then accepted."""
    server.akamai_bucket.drain()
    purger = akamai(server, clock, bucket=TokenBucket(10_000, 1000, clock))
    run(purger, ["t1", "t2"], "sync")
    assert clock.sleeps == [1.0]
    assert [(v, s) for v, s, _ in server.rejections] == [("akamai", 429)]
    assert server.keys("akamai") == ["t1", "t2"]


# --------------------------------------------------------------------- secrets


def test_secrets_never_reach_logs_reprs_or_errors(
    server: VendorServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Successful, retried, refused and rate-limited purges of all three vendors log and
    raise without any credential."""
    caplog.set_level(logging.DEBUG)
    secrets = [
        server.fastly_key,
        server.cloudflare_token,
        server.akamai_client_token,
        server.akamai_client_secret,
        server.akamai_access_token,
    ]
    texts: list[str] = []
    working: list[tuple[str, Purger]] = [
        ("fastly", fastly(server, clock)),
        ("cloudflare", cloudflare(server, clock)),
        ("akamai", akamai(server, clock)),
    ]
    for vendor, purger in working:
        texts += [repr(purger), repr(purger.__dict__)]
        server.fail_next(vendor, 1, 503)  # one retry, logged
        texts.append(repr(run(purger, ["k1"], "sync")))
    server.fail_next("fastly", 5, 500)
    bad_token = CloudflarePurger(
        server.cloudflare_zone, "bad-token", base_url=server.url, **_timing(clock)
    )
    failing: list[tuple[Purger, Mode]] = [
        (fastly(server, clock, retry=RetryPolicy(max_attempts=2)), "async"),
        (akamai(server, clock, client_secret="wrong"), "sync"),
        (bad_token, "sync"),
    ]
    for purger, mode in failing:
        with pytest.raises(BackendError) as info:
            run(purger, ["k"], mode)
        error: BaseException | None = info.value
        while error is not None:
            texts.append(f"{error!s} {error!r}")
            error = error.__cause__ or error.__context__
    texts.append(caplog.text)
    assert "; retry 1 in" in caplog.text  # the log did see the retries
    blob = "\n".join(texts)
    for secret in secrets:
        assert secret not in blob


# --------------------------------------------------------------------- the layer


class GatedPurger(Purger):
    """A purger that records batches and holds the first one until released."""

    scheme = FASTLY

    def __init__(self) -> None:
        super().__init__(name="gated")
        self.batches: list[tuple[str, ...]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def purge(self, keys: Sequence[str], *, soft: bool = False) -> PurgeResult:
        self.started.set()
        assert self.release.wait(10)
        self.batches.append(tuple(keys))
        return PurgeResult((PurgeAck("gated", tuple(keys), 200),))

    async def apurge(self, keys: Sequence[str], *, soft: bool = False) -> PurgeResult:
        self.batches.append(tuple(keys))
        await asyncio.sleep(0)
        return PurgeResult((PurgeAck("gated", tuple(keys), 200),))

    def _plan(self, keys: Sequence[str], soft: bool) -> list[PurgeRequest]:
        return []


def test_layer_coalesces_queued_purges() -> None:
    """While one purge is in flight, three more delete_tags calls merge into one batch."""
    purger = GatedPurger()
    layer = CdnPurgeLayer(purger, name="edge")
    assert isinstance(layer, InvalidationLayer)
    layer.delete_tags([Tag("shop", "acme", "a")])
    assert purger.started.wait(10)
    layer.delete_tags([Tag("shop", "acme", "b")])
    layer.delete_tags([Tag("shop", "acme", "c"), Tag("shop", "acme", "b")])
    layer.delete([CacheKey("shop", "acme", "p:1")])
    purger.release.set()
    outcomes = layer.flush(timeout=10)
    layer.close()
    assert [o.status for o in outcomes] == ["purged", "purged"]
    assert purger.batches[0] == ("shop:acme:a", "shop:acme:~")
    assert purger.batches[1] == (
        "shop:acme:b",
        "shop:acme:~",
        "shop:acme:c",
        cache_key_key(FASTLY, CacheKey("shop", "acme", "p:1")),
    )


def test_layer_purges_through_fastly(server: VendorServer, clock: FakeClock) -> None:
    """delete_tags and delete reach Fastly with the response-header encoding; flush
    returns the outcome with the vendor's acknowledgement."""
    seen: list[str] = []
    layer = CdnPurgeLayer(fastly(server, clock), on_outcome=lambda o: seen.append(o.status))
    tags = [Tag("shop", "acme", "product:1")]
    layer.delete_tags(tags)
    outcomes = layer.flush(timeout=10)
    layer.close()
    assert server.keys("fastly") == purge_keys(FASTLY, tags)
    assert outcomes[0].status == "purged" and outcomes[0].result is not None
    assert seen == ["purged"]


def test_layer_reports_rate_limited_batches(server: VendorServer, clock: FakeClock) -> None:
    """A rate-limited batch ends as a 'rate_limited' outcome with retry_after and its keys."""
    server.cloudflare_bucket.drain()
    purger = cloudflare(
        server, clock, retry=RetryPolicy(rate_limit_wait=0), bucket=TokenBucket(99, 99, clock)
    )
    layer = CdnPurgeLayer(purger)
    layer.delete_tags([Tag("shop", "Acme", "p")])
    (outcome,) = layer.flush(timeout=10)
    layer.close()
    assert outcome.status == "rate_limited"
    assert outcome.retry_after == 1.0
    assert outcome.keys == tuple(purge_keys(CLOUDFLARE, [Tag("shop", "Acme", "p")]))


def test_layer_reports_failed_batches(server: VendorServer, clock: FakeClock) -> None:
    """A batch that fails after its retries ends as a 'failed' outcome carrying the error."""
    server.fail_next("fastly", 5, 503)
    layer = CdnPurgeLayer(fastly(server, clock, retry=RetryPolicy(max_attempts=2)))
    layer.delete([CacheKey("shop", "acme", "k")])
    (outcome,) = layer.flush(timeout=10)
    layer.close()
    assert outcome.status == "failed"
    assert isinstance(outcome.error, BackendError)


async def test_layer_async_purges_through_akamai(server: VendorServer, clock: FakeClock) -> None:
    """adelete_tags queues onto a drain task; aflush waits for it and returns the outcome."""
    layer = CdnPurgeLayer(akamai(server, clock), soft=True)
    await layer.adelete_tags([Tag("shop", "Acme", "p1")])
    await layer.adelete_tags([Tag("shop", "Acme", "p2")])
    outcomes = await layer.aflush()
    await layer.aclose()
    # Both calls were queued before the drain task ran: one merged batch.
    assert [o.status for o in outcomes] == ["purged"]
    p1, p2 = Tag("shop", "Acme", "p1"), Tag("shop", "Acme", "p2")
    assert server.keys("akamai") == [
        tag_key(AKAMAI, p1),
        purge_keys(AKAMAI, [p1])[-1],
        tag_key(AKAMAI, p2),
    ]
    assert all(p.soft for p in server.purges)
