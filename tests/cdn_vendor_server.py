"""A local fake of the Fastly, Cloudflare and Akamai purge APIs that enforces their limits.

One stdlib ``ThreadingHTTPServer`` on a free 127.0.0.1 port serves all three:

* Fastly ``POST /service/{id}/purge``: ``Fastly-Key`` auth, <= 256 keys from the
  JSON ``surrogate_keys`` or the ``Surrogate-Key`` header (<= 16,384 bytes), each
  key <= 1024 bytes; ``Fastly-Soft-Purge: 1`` recorded as soft.
* Cloudflare ``POST /zones/{zone}/purge_cache``: Bearer auth, <= 100 tags, each
  <= 1024 characters; the plan's token bucket, 429 with ``Retry-After`` when empty.
* Akamai ``POST /ccu/v3/{invalidate|delete}/tag/{network}``: a valid EdgeGrid
  signature (recomputed from the shared secret, nonces never reused), body <= 50 KB,
  the tag bucket (5,000, +500/min), 429 with ``Retry-After``; 201 with
  ``estimatedSeconds``.

``fail_next(vendor, times, status)`` makes the next requests fail with a 5xx;
every accepted purge is appended to ``purges``. ``clock`` drives the buckets so a
test can share a fake clock with the purger.

Example::

    with VendorServer() as server:
        FastlyPurger(server.fastly_service, server.fastly_key, base_url=server.url)
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from tieredcache.layers.cdn.edgegrid import edgegrid_authorization

CLOUDFLARE_PLANS = {
    "free": (25, 5 / 60),
    "pro": (25, 5.0),
    "business": (50, 10.0),
    "enterprise": (500, 50.0),
}
_AUTH_RE = re.compile(
    r"EG1-HMAC-SHA256 client_token=(?P<client>[^;]*);access_token=(?P<access>[^;]*);"
    r"timestamp=(?P<ts>[^;]*);nonce=(?P<nonce>[^;]*);signature=(?P<sig>.*)\Z"
)


@dataclass(frozen=True)
class RecordedPurge:
    """One purge the fake vendor accepted."""

    vendor: str
    keys: tuple[str, ...]
    soft: bool
    path: str


class Bucket:
    """The vendor-side token bucket (written apart from the purger's, on purpose)."""

    def __init__(self, capacity: float, rate: float, clock: Callable[[], float]) -> None:
        self.capacity, self.rate, self._clock = capacity, rate, clock
        self.tokens = float(capacity)
        self.at = clock()

    def take(self, cost: float) -> float:
        """Take ``cost`` tokens and return 0, or return seconds until they are there."""
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens + 1e-9 >= cost:  # float rounding must not turn a full refill into a 429
            self.tokens = max(0.0, self.tokens - cost)
            return 0.0
        return (cost - self.tokens) / self.rate

    def drain(self) -> None:
        self.take(0)
        self.tokens = 0.0


class VendorServer:
    """The fake purge APIs; a context manager that starts and stops the server thread."""

    def __init__(
        self, *, cloudflare_plan: str = "free", clock: Callable[[], float] = time.monotonic
    ):
        self.fastly_service = "svc-123"
        self.fastly_key = "fastly-SECRET-key-0001"
        self.cloudflare_zone = "zone-abc"
        self.cloudflare_token = "cf-SECRET-token-0002"
        self.akamai_client_token = "akab-client-SECRET-0003"
        self.akamai_client_secret = "akamai-client-SECRET-0004="
        self.akamai_access_token = "akab-access-SECRET-0005"
        self.clock = clock
        capacity, rate = CLOUDFLARE_PLANS[cloudflare_plan]
        self.cloudflare_bucket = Bucket(capacity, rate, clock)
        self.akamai_bucket = Bucket(5000, 500 / 60, clock)
        self.purges: list[RecordedPurge] = []
        self.requests: dict[str, int] = {"fastly": 0, "cloudflare": 0, "akamai": 0}
        self.rejections: list[tuple[str, int, str]] = []
        self._failures: dict[str, list[int]] = {}
        self._nonces: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail_next(self, vendor: str, times: int, status: int = 503) -> None:
        """Answer the next ``times`` requests to ``vendor`` with ``status``."""
        with self._lock:
            self._failures.setdefault(vendor, []).extend([status] * times)

    def keys(self, vendor: str) -> list[str]:
        """Every key the vendor accepted, in order."""
        return [k for p in self.purges if p.vendor == vendor for k in p.keys]

    def start(self) -> Self:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        # A short poll interval: shutdown() waits for it, once per test.
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.02,), name="cdn-vendor", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ vendors

    def handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], Any]:
        """Route one request; returns (status, headers, JSON body)."""
        vendor = _vendor_of(path)
        if vendor is None or method != "POST":
            return 404, {}, {"error": "no such endpoint"}
        with self._lock:
            self.requests[vendor] += 1
            failures = self._failures.get(vendor)
            if failures:
                return failures.pop(0), {}, {"error": "injected failure"}
            status, extra, payload = getattr(self, f"_{vendor}")(path, headers, body)
            if status >= 400:
                self.rejections.append((vendor, status, json.dumps(payload)))
            return status, extra, payload

    def _fastly(
        self, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], Any]:
        if path != f"/service/{self.fastly_service}/purge":
            return 404, {}, {"msg": "unknown service"}
        if headers.get("fastly-key") != self.fastly_key:
            return 401, {}, {"msg": "Provided credentials are missing or invalid"}
        header = headers.get("surrogate-key")
        if header is not None:
            if len(header.encode()) > 16384:
                return 400, {}, {"msg": "Surrogate-Key header longer than 16384 bytes"}
            keys = header.split()
        else:
            try:
                keys = json.loads(body)["surrogate_keys"]
            except (ValueError, KeyError, TypeError):
                return 400, {}, {"msg": 'body must be {"surrogate_keys": [...]}'}
        if not isinstance(keys, list) or not keys or len(keys) > 256:
            return 400, {}, {"msg": "between 1 and 256 surrogate keys per request"}
        if any(not isinstance(k, str) or len(k.encode()) > 1024 for k in keys):
            return 400, {}, {"msg": "surrogate key longer than 1024 bytes"}
        soft = headers.get("fastly-soft-purge") == "1"
        self.purges.append(RecordedPurge("fastly", tuple(keys), soft, path))
        return 200, {}, {k: f"purge-{uuid.uuid4().hex[:8]}" for k in keys}

    def _cloudflare(
        self, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], Any]:
        if path != f"/zones/{self.cloudflare_zone}/purge_cache":
            return 404, {}, _cf_error(7003, "Could not route to zone")
        if headers.get("authorization") != f"Bearer {self.cloudflare_token}":
            return 403, {}, _cf_error(10000, "Authentication error")
        try:
            tags = json.loads(body)["tags"]
        except (ValueError, KeyError, TypeError):
            return 400, {}, _cf_error(1012, "Request must contain tags")
        if not isinstance(tags, list) or not tags or len(tags) > 100:
            return 400, {}, _cf_error(1015, "at most 100 tags per request")
        if any(not isinstance(t, str) or len(t) > 1024 for t in tags):
            return 400, {}, _cf_error(1016, "tag longer than 1024 characters")
        wait = self.cloudflare_bucket.take(1)
        if wait > 0:
            return 429, {"Retry-After": str(math.ceil(wait))}, _cf_error(971, "rate limited")
        self.purges.append(RecordedPurge("cloudflare", tuple(tags), False, path))
        return (
            200,
            {},
            {"success": True, "errors": [], "messages": [], "result": {"id": uuid.uuid4().hex}},
        )

    def _akamai(
        self, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], Any]:
        match = re.fullmatch(r"/ccu/v3/(invalidate|delete)/tag/(production|staging)", path)
        if match is None:
            return 404, {}, _ak_error(404, "unknown purge endpoint")
        problem = self._edgegrid_problem(path, headers, body)
        if problem:
            return 401, {}, _ak_error(401, problem)
        if len(body) > 50_000:
            return 413, {}, _ak_error(413, "request body larger than 50000 bytes")
        try:
            objects = json.loads(body)["objects"]
        except (ValueError, KeyError, TypeError):
            return 400, {}, _ak_error(400, 'body must be {"objects": [...]}')
        if not isinstance(objects, list) or not objects:
            return 400, {}, _ak_error(400, "objects must be a non-empty list")
        if any(not isinstance(t, str) or len(t) > 128 for t in objects):
            return 400, {}, _ak_error(400, "cache tag longer than 128 characters")
        wait = self.akamai_bucket.take(len(objects))
        if wait > 0:
            return 429, {"Retry-After": str(math.ceil(wait))}, _ak_error(429, "tag rate limit")
        soft = match.group(1) == "invalidate"
        self.purges.append(RecordedPurge("akamai", tuple(objects), soft, path))
        return (
            201,
            {},
            {
                "httpStatus": 201,
                "estimatedSeconds": 5,
                "purgeId": uuid.uuid4().hex,
                "supportId": uuid.uuid4().hex[:12],
                "detail": "Request accepted",
            },
        )

    def _edgegrid_problem(self, path: str, headers: dict[str, str], body: bytes) -> str | None:
        match = _AUTH_RE.match(headers.get("authorization", ""))
        if match is None:
            return "missing or malformed EdgeGrid Authorization header"
        if (match["client"], match["access"]) != (
            self.akamai_client_token,
            self.akamai_access_token,
        ):
            return "unknown client or access token"
        if match["nonce"] in self._nonces:
            return "nonce reused"
        expected = edgegrid_authorization(
            method="POST",
            url=f"http://{headers.get('host', '')}{path}",
            body=body,
            client_token=self.akamai_client_token,
            client_secret=self.akamai_client_secret,
            access_token=self.akamai_access_token,
            timestamp=match["ts"],
            nonce=match["nonce"],
        )
        if expected != match.group(0):
            return "signature does not match"
        self._nonces.add(match["nonce"])
        return None


def _vendor_of(path: str) -> str | None:
    if path.startswith("/service/"):
        return "fastly"
    if path.startswith("/zones/"):
        return "cloudflare"
    if path.startswith("/ccu/v3/"):
        return "akamai"
    return None


def _cf_error(code: int, message: str) -> dict[str, Any]:
    return {
        "success": False,
        "errors": [{"code": code, "message": message}],
        "messages": [],
        "result": None,
    }


def _ak_error(status: int, detail: str) -> dict[str, Any]:
    return {"httpStatus": status, "title": "error", "detail": detail}


def _handler_for(server: VendorServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: without this, Nagle + delayed ACK
        # cost ~40 ms a request.
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra, payload = server.handle("POST", self.path, headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

    return Handler
