"""``/healthz``, ``/readyz`` and ``/metrics`` on one port (stdlib ``http.server``).

* ``/healthz``: 200 while the consume loop turned within ``stall_after`` seconds
  (a wedged loop gets the pod restarted); 503 otherwise.
* ``/readyz``: 200 once the worker is connected, has its partition assignment
  and no layer is failing; 503 with the reason (``starting``, ``waiting for a
  partition assignment``, ``failing: redis: refused``, ``stopping``) otherwise.
  "Assigned" means the group join completed and the worker was told its share
  (``on_assign``), even an empty one: a group with more members than partitions
  keeps the extra members as ready standbys, which take over on a rebalance.
  While a rebalance has taken the partitions back and not handed them out again,
  the worker is not ready.
  Nothing routes traffic to a worker: readiness is a signal for people and
  for autoscalers, which must not add workers while a layer is down.
* ``/metrics``: the worker's Prometheus registry.

>>> server = HealthServer(status, registry, port=0).start()   # doctest: +SKIP
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["HealthServer", "WorkerStatus"]


@dataclass
class WorkerStatus:
    """What the worker tells the health endpoints; written by the worker thread."""

    stall_after: float = 60.0
    last_loop: float = field(default_factory=time.monotonic)
    consuming: bool = False
    assigned: bool = False  # the group gave this member its share (maybe none)
    stopping: bool = False
    failing: dict[str, str] = field(default_factory=dict)  # layer -> reason

    def beat(self) -> None:
        self.last_loop = time.monotonic()

    def healthy(self) -> tuple[bool, str]:
        age = time.monotonic() - self.last_loop
        if age > self.stall_after:
            return False, f"the consume loop has not turned for {age:.0f} s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        if not self.consuming:
            return False, "starting"
        if not self.assigned:
            return False, "waiting for a partition assignment"
        if self.failing:
            return False, "failing: " + ", ".join(
                f"{k}: {v}" for k, v in sorted(self.failing.items())
            )
        return True, "ok"


class HealthServer:
    """Serve the endpoints on ``host:port`` from a daemon thread (``port=0``: any free)."""

    def __init__(
        self,
        status: WorkerStatus,
        registry: CollectorRegistry,
        *,
        host: str = "0.0.0.0",
        port: int = 9464,
    ) -> None:
        self.status = status
        self.registry = registry
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(200, generate_latest(outer.registry), CONTENT_TYPE_LATEST)
                    return
                check = {"/healthz": outer.status.healthy, "/readyz": outer.status.ready}
                probe = check.get(self.path.split("?")[0])
                if probe is None:
                    self._send(404, b"not found\n", "text/plain")
                    return
                ok, why = probe()
                self._send(200 if ok else 503, why.encode() + b"\n", "text/plain")

            def _send(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes every few seconds would flood the log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="tieredcache-cdc-health", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
