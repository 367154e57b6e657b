"""HTTP rules without I/O: what is stored, what is stripped, ETags, validators, dates.

Everything here works on ASGI's raw header lists (``[(b"name", b"value"), ...]``,
names lowercase) so the middleware never builds a ``Headers`` object on a hit.
"""

from __future__ import annotations

import hashlib
import mimetypes
from collections.abc import Iterable, Sequence
from email.utils import formatdate
from typing import Final

RawHeaders = list[tuple[bytes, bytes]]

# Never stored in an entry: hop-by-hop (RFC 9110 7.6.1) and per-response headers
# the middleware writes itself on every answer.
NOT_STORED: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"date",
        b"age",
        b"expires",
        b"etag",
        b"content-length",
        b"cache-control",
        b"cdn-cache-control",
        b"surrogate-control",
        b"x-cache",
        b"vary",
        b"set-cookie",
        b"surrogate-key",
        b"xkey",
        b"cache-tag",
        b"edge-cache-tag",
    }
)

# Request headers that frameworks and proxies honour but a cache key would not
# cover: each can make the app render a different page for the same URL (cache
# poisoning). Stripped before the app runs unless the route keys them.
UNKEYED_INPUTS: Final = frozenset(
    {
        b"forwarded",
        b"x-forwarded-host",
        b"x-forwarded-server",
        b"x-forwarded-scheme",
        b"x-forwarded-proto",
        b"x-forwarded-protocol",
        b"x-forwarded-ssl",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-path",
        b"x-host",
        b"x-original-host",
        b"x-original-url",
        b"x-rewrite-url",
        b"x-override-url",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-url-scheme",
        b"front-end-https",
    }
)

# Statuses stored by default (RFC 9111 "heuristically cacheable", minus those a
# request header can provoke). 404 and 410 only from a clean request (see below).
STORABLE_STATUSES: Final = frozenset({200, 203, 204, 300, 301, 308, 404, 410})
# Request headers larger than this, or holding control characters, make a request
# "unclean": a 404 it provokes is not stored (CPDoS: HHO / HMC).
MAX_CLEAN_HEADER_BYTES: Final = 8 * 1024

STATIC_SUFFIXES: Final = frozenset(
    {
        ".css", ".js", ".mjs", ".map", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".avif",
        ".svg", ".ico", ".bmp", ".tif", ".tiff", ".woff", ".woff2", ".ttf", ".otf", ".eot",
        ".txt", ".xml", ".pdf", ".zip", ".gz", ".mp4", ".webm", ".mp3", ".wav", ".csv",
    }
)  # fmt: skip


def header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of ``name`` (lowercase) or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def directives(value: bytes | None) -> set[str]:
    """The lowercase directive names of a Cache-Control value (arguments dropped)."""
    if not value:
        return set()
    return {
        part.split("=", 1)[0].strip().lower()
        for part in value.decode("latin-1").split(",")
        if part.strip()
    }


def static_suffix(path: str) -> str | None:
    """The static-file extension the last path segment ends in, or None."""
    last = path.rsplit("/", 1)[-1]
    dot = last.rfind(".")
    if dot <= 0 and not (dot == 0 and len(last) > 1):
        return None
    suffix = last[dot:].lower()
    return suffix if suffix in STATIC_SUFFIXES else None


def content_type_matches(suffix: str, content_type: bytes | None) -> bool:
    """Whether a response's media type is what a file with ``suffix`` would be."""
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower().decode("latin-1")
    expected = mimetypes.types_map.get(suffix) or {
        ".mjs": "text/javascript",
        ".map": "application/json",
        ".woff": "font/woff",
        ".woff2": "font/woff2",
        ".avif": "image/avif",
        ".webp": "image/webp",
    }.get(suffix)
    if expected is None:
        return False
    javascript = {"application/javascript", "text/javascript", "application/x-javascript"}
    if expected in javascript:
        return media in javascript
    return media == expected


def clean_request(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """A request whose headers cannot have provoked an error page (CPDoS)."""
    total = 0
    for key, value in headers:
        total += len(key) + len(value) + 4
        if total > MAX_CLEAN_HEADER_BYTES:
            return False
        if any((b < 0x20 and b != 0x09) or b == 0x7F for b in value):
            return False
    return True


def make_etag(namespace: str, tenant: str, key: str, status: int, body: bytes) -> bytes:
    """A strong, quoted ETag bound to tenant and key: identical in every process,
    and useless as an oracle for another tenant's content (the tenant is hashed in)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (namespace, tenant, key, str(status)):
        encoded = part.encode()
        digest.update(len(encoded).to_bytes(4, "big"))
        digest.update(encoded)
    digest.update(body)
    return b'"' + digest.hexdigest().encode() + b'"'


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """RFC 9110 13.1.2: weak comparison; ``*`` matches any current representation."""
    value = if_none_match.strip()
    if value == b"*":
        return True
    opaque = etag[2:] if etag.startswith(b"W/") else etag
    for candidate in value.split(b","):
        candidate = candidate.strip()
        if candidate.startswith(b"W/"):
            candidate = candidate[2:]
        if candidate == opaque:
            return True
    return False


def http_date(timestamp: float) -> bytes:
    """An IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``)."""
    return formatdate(timestamp, usegmt=True).encode()


def vary_names(value: bytes | None) -> list[str]:
    """Lowercase field names of a Vary value (``*`` kept as is)."""
    if not value:
        return []
    return [n.strip().lower() for n in value.decode("latin-1").split(",") if n.strip()]


def accept_encoding_bucket(value: bytes | None) -> str:
    """The codings a request accepts, normalised to a few key values: ``br,gzip``,
    ``gzip``, ``identity``... (q=0 means refused)."""
    if not value:
        return "identity"
    accepted = set()
    for part in value.decode("latin-1").lower().split(","):
        name, _, params = part.strip().partition(";")
        name = name.strip()
        q = params.replace(" ", "")
        if q.startswith("q=") and q[2:] in {"0", "0.0", "0.00", "0.000"}:
            continue
        if name in {"gzip", "br", "zstd", "deflate"}:
            accepted.add(name)
        elif name == "*":
            accepted.update({"gzip", "br"})
    return ",".join(sorted(accepted)) or "identity"


def request_cookies(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The (name, value) pairs of every ``Cookie`` header (HTTP/2 may send several)."""
    pairs = []
    for key, value in headers:
        if key == b"cookie":
            for part in value.split(b";"):
                name, _, val = part.strip().partition(b"=")
                if name:
                    pairs.append((name, val))
    return pairs


def credentials(
    headers: Sequence[tuple[bytes, bytes]], keyed_cookies: frozenset[bytes]
) -> bytes | None:
    """What identifies the client, or None: ``Authorization``, and every cookie the
    route does not key (any of them may be a session). A page answered to a request
    carrying them is that user's page, not a shared one."""
    auth = header(headers, b"authorization")
    session = [(k, v) for k, v in request_cookies(headers) if k not in keyed_cookies]
    if auth is None and not session:
        return None
    parts = [b"authorization\0" + (auth or b"")]
    parts.extend(b"cookie\0" + k + b"=" + v for k, v in sorted(session))
    return b"\1".join(parts)
