"""A counting TCP proxy in front of Redis (stdlib asyncio), for ``bench_zipf.py``.

    python benchmarks/_resp_proxy.py LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT STATS_JSON

Forwards bytes both ways unchanged and counts, on the client -> server side:

- ``bursts``: reads that returned data from a client socket, i.e. the client's
  write bursts as this proxy saw them (a round trip is one burst; pipelined
  commands sent together are one burst; TCP may split a large write in two);
- ``commands``: top-level RESP commands parsed from that stream (a command inside
  a Lua script is *not* a client command and is not counted here);
- ``connections``: client connections accepted.

It writes the counts to STATS_JSON twice a second and when it gets SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path

COUNTS = {"bursts": 0, "commands": 0, "connections": 0, "bytes_in": 0}


class RespCounter:
    """Counts top-level commands in a client's RESP stream, fed in arbitrary chunks."""

    __slots__ = ("buf", "bulks", "need")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.bulks = 0  # bulk strings still expected in the current command
        self.need = -1  # bytes (incl. CRLF) of the bulk body being read, or -1 for a header

    def feed(self, data: bytes) -> int:
        buf = self.buf
        buf += data
        pos = 0
        found = 0
        size = len(buf)
        while pos < size:
            if self.bulks == 0:  # expecting a new command
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                if buf[pos] == 0x2A:  # '*': an array of bulk strings
                    self.bulks = int(buf[pos + 1 : end])
                found += 1  # an inline command (no '*') is one line
                pos = end + 2
                self.need = -1
            elif self.need < 0:  # '$<len>' header of the next bulk string
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                self.need = int(buf[pos + 1 : end]) + 2
                pos = end + 2
            else:
                if size - pos < self.need:
                    break
                pos += self.need
                self.need = -1
                self.bulks -= 1
        del buf[:pos]
        return found


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool) -> None:
    counter = RespCounter() if count else None
    try:
        while data := await reader.read(65536):
            if counter is not None:
                COUNTS["bursts"] += 1
                COUNTS["bytes_in"] += len(data)
                COUNTS["commands"] += counter.feed(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main(listen: int, host: str, port: int, stats: Path) -> None:
    async def handle(creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        COUNTS["connections"] += 1
        try:
            sreader, swriter = await asyncio.open_connection(host, port)
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(pump(creader, swriter, True), pump(sreader, cwriter, False))

    def dump() -> None:
        tmp = stats.with_suffix(".tmp")
        tmp.write_text(json.dumps(COUNTS))
        tmp.replace(stats)

    server = await asyncio.start_server(handle, "127.0.0.1", listen, backlog=4096)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    dump()
    async with server:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            dump()
    dump()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])))
