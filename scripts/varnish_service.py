"""Start a real ``varnishd`` with vmod xkey on free 127.0.0.1 ports, in front of a backend.

Stdlib only. Used by ``tests/test_cdn_varnish.py`` and for manual runs. Needs the
Debian packages ``varnish`` and ``varnish-modules`` (installed by the bootstrap
script, never from here).

The generated VCL (:func:`render_vcl`):

* proxies to the given backend;
* copies the backend's ``Surrogate-Key`` header into ``xkey`` when it sent no ``xkey``;
* answers ``PURGE`` only from 127.0.0.1 (an ACL; anything else gets 403): with
  ``xkey-purge: k1 k2`` it evicts, with ``xkey-softpurge`` it marks stale; the
  reply is 200 with the object count in the ``xkey-purged`` header and the body;
* keeps objects ``grace`` seconds past their TTL, so a soft-purged object is
  served stale once while it is fetched again;
* adds ``X-Cache: HIT|MISS`` to each response and answers ``GET /__ready`` itself.

Any failure raises :class:`VarnishError` carrying the tail of varnishd's log.

Example::

    with VarnishService("127.0.0.1", 8080) as varnish:
        print(varnish.url)  # http://127.0.0.1:41234

Command line (prints the URL, stops on Ctrl-C or SIGTERM)::

    python -m scripts.varnish_service 127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["VarnishError", "VarnishService", "free_port", "render_vcl"]

LOCALHOST = "127.0.0.1"


class VarnishError(RuntimeError):
    """varnishd failed to start, answer or stop; ``log_tail`` holds its last log lines."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(
            f"{message}\n--- varnishd log tail ---\n{log_tail}" if log_tail else message
        )
        self.log_tail = log_tail


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def render_vcl(backend_host: str, backend_port: int, *, grace: int = 30) -> str:
    """The VCL for a node in front of ``backend_host:backend_port`` (see module docstring)."""
    return f"""vcl 4.1;
import xkey;

backend default {{
    .host = "{backend_host}";
    .port = "{backend_port}";
}}

acl purgers {{
    "127.0.0.1";
}}

sub vcl_recv {{
    if (req.url == "/__ready") {{
        return (synth(200, "ready"));
    }}
    if (req.method == "PURGE") {{
        if (client.ip !~ purgers) {{
            return (synth(403, "PURGE not allowed from this address"));
        }}
        if (req.http.xkey-purge) {{
            set req.http.x-purged = xkey.purge(req.http.xkey-purge);
        }} elsif (req.http.xkey-softpurge) {{
            set req.http.x-purged = xkey.softpurge(req.http.xkey-softpurge);
        }} else {{
            return (synth(400, "send an xkey-purge or xkey-softpurge header"));
        }}
        return (synth(200, "purged"));
    }}
}}

sub vcl_backend_response {{
    if (!beresp.http.xkey && beresp.http.Surrogate-Key) {{
        set beresp.http.xkey = beresp.http.Surrogate-Key;
    }}
    set beresp.grace = {grace}s;
}}

sub vcl_deliver {{
    if (obj.hits > 0) {{
        set resp.http.X-Cache = "HIT";
    }} else {{
        set resp.http.X-Cache = "MISS";
    }}
}}

sub vcl_synth {{
    if (req.method == "PURGE" && req.http.x-purged) {{
        set resp.http.xkey-purged = req.http.x-purged;
        set resp.body = req.http.x-purged;
        return (deliver);
    }}
}}
"""


class VarnishService:
    """One ``varnishd -F`` process; a context manager.

    ``url`` is the HTTP address, ``admin_port`` the CLI (``-T``) port.
    """

    def __init__(
        self,
        backend_host: str,
        backend_port: int,
        *,
        grace: int = 30,
        varnishd: str = "varnishd",
        startup_timeout: float = 15.0,
    ) -> None:
        self.backend_host = backend_host
        self.backend_port = backend_port
        self.grace = grace
        self.varnishd = varnishd
        self.startup_timeout = startup_timeout
        self.port = 0
        self.admin_port = 0
        self.workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        """The last lines varnishd wrote (stdout and stderr)."""
        if self.workdir is None:
            return ""
        path = self.workdir / "varnishd.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> Self:
        binary = shutil.which(self.varnishd) or (
            "/usr/sbin/varnishd" if Path("/usr/sbin/varnishd").exists() else None
        )
        if binary is None:
            raise VarnishError(
                "varnishd not found: install the Debian packages 'varnish' and 'varnish-modules'"
            )
        self.workdir = Path(tempfile.mkdtemp(prefix="tieredcache-varnish-"))
        vcl = self.workdir / "default.vcl"
        vcl.write_text(render_vcl(self.backend_host, self.backend_port, grace=self.grace))
        self.port, self.admin_port = free_port(), free_port()
        self._log = open(self.workdir / "varnishd.log", "wb")  # noqa: SIM115 - lives with the process
        command = [
            binary,
            "-F",
            "-n", str(self.workdir / "n"),
            "-a", f"{LOCALHOST}:{self.port}",
            "-T", f"{LOCALHOST}:{self.admin_port}",
            "-f", str(vcl),
            "-s", "malloc,64m",
            # Run as the invoking user: the worker must read the root-owned temp dir.
            "-j", "none",
            # Small pools: tests run on shared 2-core machines.
            "-p", "thread_pools=1",
            "-p", "thread_pool_min=5",
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise VarnishError(
                    f"varnishd exited with status {code} during start", self.log_tail()
                )
            try:
                with urllib.request.urlopen(f"{self.url}/__ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.05)
        raise VarnishError(
            f"varnishd did not answer on {self.url} within {self.startup_timeout}s ({last})",
            self.log_tail(),
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; removes the work directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("backend", help="backend host:port")
    parser.add_argument("--grace", type=int, default=30)
    args = parser.parse_args(argv)
    host, _, port = args.backend.rpartition(":")
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    with VarnishService(host or LOCALHOST, int(port), grace=args.grace) as varnish:
        print(varnish.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not stop:
                time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
