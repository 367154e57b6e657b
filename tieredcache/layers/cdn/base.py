"""What every CDN purger shares: the request plan, retries, rate limits and two drivers.

Written once for sync and async, sans-I/O (the httpx ``Auth.auth_flow`` pattern):
a vendor purger only *plans* requests (``_plan``), signs each attempt
(``_authorize``) and reads a success (``_acknowledge``). :meth:`Purger._flow` is a
generator with no I/O that yields ``_Send`` and ``_Sleep`` operations and receives
their results; :meth:`Purger.purge` and :meth:`Purger.apurge` are ~15-line drivers
that run it on an ``httpx.Client`` or ``httpx.AsyncClient``. Retry, backoff and
rate-limit rules therefore exist once and are tested through either driver.

Rules of the flow, for each planned request:

* a client-side :class:`TokenBucket` (Cloudflare, Akamai) is consulted first; a
  wait it asks for is a rate limit, like a vendor 429;
* 2xx is acknowledged; 429 sleeps ``Retry-After`` while the rate-limit budget
  (``RetryPolicy.rate_limit_wait``) lasts, then raises
  :class:`~.errors.PurgeRateLimitedError`; it never uses up an attempt;
* 5xx, connect errors and timeouts are faults: retried with jittered exponential
  backoff up to ``max_attempts`` and ``total_timeout``, then reported as
  :class:`~tieredcache.errors.BackendError` / ``BackendTimeoutError``;
* other 4xx are configuration errors (bad credentials, oversize request): not
  retried, reported at once.

Purges are idempotent, so a retry after a lost response is safe. Secrets are
held in :class:`~.model.Secret` and added per attempt by ``_authorize``, so they
are never part of a planned request's repr, a log line or an error.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

import httpx

from ...errors import BackendError, BackendTimeoutError, InvalidKeyError, TieredCacheError
from .errors import PurgeRateLimitedError
from .limits import RetryPolicy, TokenBucket, retry_after_seconds
from .model import PurgeAck, PurgeRequest, PurgeResult
from .surrogate import SurrogateScheme

__all__ = ["Purger", "RequestFailedError"]

log = logging.getLogger("tieredcache.cdn")
_DETAIL_LIMIT: Final = 200


class RequestFailedError(TieredCacheError):
    """One planned request failed for good (raised inside the flow, reported by it).

    ``detail`` is secret-free; a vendor's ``_acknowledge`` raises it for a 2xx whose
    body denies success.
    """

    def __init__(self, detail: str, timeout: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.timeout = timeout


@dataclass(frozen=True, slots=True)
class _Send:
    request: PurgeRequest
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class _Sleep:
    seconds: float


_Op: TypeAlias = _Send | _Sleep
_Reply: TypeAlias = httpx.Response | httpx.TransportError | None
_Flow: TypeAlias = Generator[_Op, _Reply, PurgeResult]


class Purger:
    """Base of the vendor purgers: ``purge(keys)`` / ``apurge(keys)`` drop surrogate keys.

    Subclasses set ``scheme`` and implement ``_plan`` and ``_acknowledge``.
    ``clock``, ``sleep``, ``asleep`` and ``rand`` are injectable for tests.

    Example (any subclass)::

        purger = FastlyPurger("SERVICE", api_key="...")
        result = purger.purge(["shop:acme:product:1"])
        purger.close()
    """

    scheme: SurrogateScheme
    #: The most surrogate keys one token of ``bucket`` pays for (Cloudflare charges a
    #: request of up to 100 tags; Akamai a tag): how a planner that counts keys
    #: reads the bucket.
    keys_per_token: float = 1.0

    def __init__(
        self,
        *,
        name: str,
        retry: RetryPolicy | None = None,
        timeout: float = 10.0,
        bucket: TokenBucket | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        asleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.bucket = bucket
        self._clock = clock
        self._sleep = sleep
        self._asleep = asleep
        self._rand = rand
        self._sync_client: httpx.Client | None = None
        self._async_client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # -------------------------------------------------------------- vendor hooks

    def _plan(self, keys: Sequence[str], soft: bool) -> list[PurgeRequest]:
        raise NotImplementedError

    def _authorize(self, request: PurgeRequest) -> Mapping[str, str]:
        """Per-attempt headers (a fresh signature); static ones live in the plan."""
        return {}

    def _acknowledge(self, request: PurgeRequest, response: httpx.Response) -> PurgeAck:
        return PurgeAck(request.target, request.keys, response.status_code)

    def _check_keys(self, keys: Sequence[str]) -> None:
        # Keys come from surrogate.py, which keeps them in bounds; a raw key that
        # is not is refused whole rather than cut (a cut key purges nothing).
        scheme = self.scheme
        for key in keys:
            size = len(key.encode()) if scheme.length_unit == "bytes" else len(key)
            if not key or size > scheme.max_key_length or any(c in key for c in " ,\t\r\n"):
                raise InvalidKeyError(
                    f"{self.name}: surrogate key {key[:64]!r} must be 1-{scheme.max_key_length} "
                    f"{scheme.length_unit} without spaces or commas"
                )

    # -------------------------------------------------------------- the flow

    def _flow(self, keys: Sequence[str], soft: bool) -> _Flow:
        unique = list(dict.fromkeys(keys))
        self._check_keys(unique)
        requests = self._plan(unique, soft)
        acks: list[PurgeAck] = []
        failures: list[str] = []
        timed_out = False
        waited = [0.0]  # rate-limit seconds slept so far in this call
        for index, request in enumerate(requests):
            try:
                acks.append((yield from self._send(request, waited)))
            except PurgeRateLimitedError as exc:
                # Deduplicated: Varnish plans the same keys once per node.
                unsent = list(dict.fromkeys(k for r in requests[index:] for k in r.keys))
                raise PurgeRateLimitedError(self.name, "purge", exc.retry_after, unsent) from exc
            except RequestFailedError as exc:
                # One node or batch failing must not stop the others (Varnish nodes).
                failures.append(f"{request.target}: {exc.detail}")
                timed_out = timed_out or exc.timeout
        if failures:
            error = BackendTimeoutError if timed_out else BackendError
            summary = "; ".join(failures)
            if len(requests) > 1:
                summary = f"{len(failures)} of {len(requests)} requests failed: {summary}"
            raise error(self.name, "purge", summary)
        return PurgeResult(tuple(acks))

    def _send(self, request: PurgeRequest, waited: list[float]) -> Generator[_Op, _Reply, PurgeAck]:
        policy = self.retry
        started = self._clock()
        attempt = 0
        while True:
            if self.bucket is not None:
                wait = self.bucket.reserve(request.cost)
                if wait > 0:
                    yield from self._rate_limited(request, wait, waited)
                    continue
            attempt += 1
            reply = yield _Send(request, self._authorize(request))
            if isinstance(reply, httpx.Response) and reply.status_code == 429:
                wait = retry_after_seconds(reply.headers.get("Retry-After"))
                yield from self._rate_limited(request, wait, waited)
                attempt -= 1  # a rate limit is not a fault
                continue
            if isinstance(reply, httpx.Response) and reply.is_success:
                ack = self._acknowledge(request, reply)
                log.debug(
                    "%s: %s purged %d keys (%d)",
                    self.name,
                    request.target,
                    len(request.keys),
                    reply.status_code,
                )
                return ack
            detail, timeout = _describe(reply)
            if isinstance(reply, httpx.Response) and reply.status_code < 500:
                raise RequestFailedError(f"refused: {detail}")
            delay = policy.delay(attempt - 1, self._rand())
            spent = self._clock() - started
            if attempt >= policy.max_attempts or spent + delay > policy.total_timeout:
                raise RequestFailedError(f"{detail} after {attempt} attempts", timeout)
            log.warning(
                "%s: %s: %s; retry %d in %.3fs", self.name, request.target, detail, attempt, delay
            )
            yield _Sleep(delay)

    def _rate_limited(
        self, request: PurgeRequest, wait: float, waited: list[float]
    ) -> Generator[_Op, _Reply, None]:
        if waited[0] + wait > self.retry.rate_limit_wait:
            raise PurgeRateLimitedError(self.name, "purge", wait, request.keys)
        log.info("%s: %s rate limited; waiting %.3fs", self.name, request.target, wait)
        waited[0] += wait
        yield _Sleep(wait)

    # -------------------------------------------------------------- drivers

    def purge(self, keys: Sequence[str], *, soft: bool = False) -> PurgeResult:
        """Purge surrogate ``keys`` (soft: mark stale instead of evicting, if supported)."""
        flow = self._flow(keys, soft)
        reply: _Reply = None
        while True:
            try:
                op = flow.send(reply)
            except StopIteration as stop:
                result: PurgeResult = stop.value
                return result
            if isinstance(op, _Sleep):
                self._sleep(op.seconds)
                reply = None
                continue
            if self._sync_client is None:
                self._sync_client = httpx.Client(timeout=self.timeout)
            client = self._sync_client
            try:
                reply = client.send(_build(client, op))
            except httpx.TransportError as exc:
                reply = exc

    async def apurge(self, keys: Sequence[str], *, soft: bool = False) -> PurgeResult:
        """Async twin of :meth:`purge`, driving the same flow."""
        flow = self._flow(keys, soft)
        reply: _Reply = None
        while True:
            try:
                op = flow.send(reply)
            except StopIteration as stop:
                result: PurgeResult = stop.value
                return result
            if isinstance(op, _Sleep):
                await self._asleep(op.seconds)
                reply = None
                continue
            if self._async_client is None:
                self._async_client = httpx.AsyncClient(timeout=self.timeout)
            client = self._async_client
            try:
                reply = await client.send(_build(client, op))
            except httpx.TransportError as exc:
                reply = exc

    def close(self) -> None:
        """Close the sync HTTP client (the async one needs :meth:`aclose`)."""
        if self._sync_client is not None:
            self._sync_client.close()
            self._sync_client = None

    async def aclose(self) -> None:
        """Close both HTTP clients."""
        self.close()
        if self._async_client is not None:
            await self._async_client.aclose()
            self._async_client = None


def _build(client: httpx.Client | httpx.AsyncClient, op: _Send) -> httpx.Request:
    request = op.request
    return client.build_request(
        method=request.method,
        url=request.url,
        headers={**request.headers, **op.headers},
        content=request.body,
    )


def _describe(reply: _Reply) -> tuple[str, bool]:
    """A short, secret-free description of a failed reply, and whether it timed out."""
    if isinstance(reply, httpx.Response):
        body = reply.text[:_DETAIL_LIMIT].strip()
        return f"HTTP {reply.status_code} {body!r}", False
    if isinstance(reply, httpx.TimeoutException):
        return f"timed out ({type(reply).__name__})", True
    # httpx transport errors carry the URL at most, never request headers.
    return f"{type(reply).__name__}: {reply}", False
