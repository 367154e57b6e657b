"""Run the app to fill an entry: buffer its response, or hand a stream over.

The app runs in a task of its own, so that as soon as the response turns out to
be a stream (``text/event-stream``, or more than ``limit`` bytes sent in several
chunks) the loader can return at once - nothing is stored, and requests that
coalesced onto this fill stop waiting - while the request that started the fill
takes the stream over (:meth:`Capture.attach`) and relays it to its client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]

# How long a stream waits for its request to take it over before it is cancelled
# (the fill was a background refresh, or the request went away).
ATTACH_TIMEOUT = 5.0


class Capture:
    """The response of one fill, as the app sent it."""

    __slots__ = ("_attached", "_decided", "body", "headers", "limit", "messages",
                 "owner_waiting", "passthrough", "size", "status", "streaming", "task")  # fmt: skip

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.messages: list[Message] = []
        self.size = 0
        self.body = b""
        self.streaming = False
        self.owner_waiting = False
        self.passthrough: Send | None = None
        self.task: asyncio.Task[None] | None = None
        self._decided = asyncio.Event()
        self._attached = asyncio.Event()

    @property
    def complete(self) -> bool:
        return self._decided.is_set() and not self.streaming and self.status != 0

    async def send(self, message: Message) -> None:
        if self.passthrough is not None:
            await self.passthrough(message)
            return
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", ()))
            self.messages.append(message)
            for key, value in self.headers:
                if key == b"content-type" and value.lower().startswith(b"text/event-stream"):
                    await self._stream()
            return
        if kind != "http.response.body":
            return
        self.messages.append(message)
        self.size += len(message.get("body", b""))
        if not message.get("more_body", False):
            chunks = [m.get("body", b"") for m in self.messages[1:]]
            self.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._decided.set()
        elif self.size > self.limit:
            await self._stream()

    async def _stream(self) -> None:
        self.streaming = True
        self._decided.set()
        try:
            await asyncio.wait_for(self._attached.wait(), ATTACH_TIMEOUT)
        except TimeoutError:
            raise asyncio.CancelledError from None  # nobody relays it: stop the app

    async def run(self, app_call: Awaitable[None]) -> None:
        """Start the app and wait until its response is complete or a stream."""
        self.task = asyncio.ensure_future(app_call)
        decided = asyncio.ensure_future(self._decided.wait())
        try:
            await asyncio.wait({self.task, decided}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            decided.cancel()
        if self.task.done():
            self.task.result()  # the app's own exception, if it raised
            if not self._decided.is_set():
                raise RuntimeError("the app returned without completing its response")

    async def attach(self, send: Send, receive: Callable[[], Awaitable[Message]],
                     head: bool) -> None:  # fmt: skip
        """Relay a stream to the requester: what was buffered, then the rest live.

        The request's ``receive`` is watched for a disconnect, which stops the app.
        A HEAD request gets the start and an empty body; the app is then stopped.
        """
        assert self.task is not None
        if head:
            await send(self.messages[0])
            await send({"type": "http.response.body", "body": b""})
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
            return
        for message in self.messages:
            await send(message)
        self.passthrough = send
        self._attached.set()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            assert self.task is not None
            self.task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        finally:
            watcher.cancel()

    def abandon(self) -> None:
        """No request takes this stream over (a background refill): stop the app."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
