"""Akamai EdgeGrid request signing (EG1-HMAC-SHA256), written from the published algorithm.

::

    signing_key = b64(HMAC-SHA256(client_secret, timestamp))
    prefix      = "EG1-HMAC-SHA256 client_token=..;access_token=..;timestamp=..;nonce=..;"
    data        = TAB-join(METHOD, scheme, host[:port], path?query, canonical_headers,
                           content_hash, prefix)
    content_hash = b64(SHA256(body[:max_body])) for a POST with a body, else ""
    Authorization = prefix + "signature=" + b64(HMAC-SHA256(signing_key, data))

The timestamp is UTC ``YYYYMMDDTHH:MM:SS+0000``. No headers are signed here (the
purge API needs none), so ``canonical_headers`` is empty. Checked against the
published test vectors in ``tests/test_cdn_purgers.py``.

>>> edgegrid_timestamp(0.0)
'19700101T00:00:00+0000'
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Final
from urllib.parse import urlsplit

__all__ = ["edgegrid_authorization", "edgegrid_timestamp"]

DEFAULT_MAX_BODY: Final = 131072


def edgegrid_timestamp(seconds: float) -> str:
    """The EdgeGrid timestamp for a POSIX time."""
    return time.strftime("%Y%m%dT%H:%M:%S+0000", time.gmtime(seconds))


def _b64_hmac(key: bytes, message: bytes) -> str:
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


def edgegrid_authorization(
    *,
    method: str,
    url: str,
    body: bytes,
    client_token: str,
    client_secret: str,
    access_token: str,
    timestamp: str,
    nonce: str,
    max_body: int = DEFAULT_MAX_BODY,
) -> str:
    """The ``Authorization`` header value for one request.

    >>> edgegrid_authorization(method="GET", url="https://h/", body=b"", client_token="c",
    ...     client_secret="s", access_token="a", timestamp="t", nonce="n").split(";")[0]
    'EG1-HMAC-SHA256 client_token=c'
    """
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    content_hash = ""
    if method.upper() == "POST" and body:
        content_hash = base64.b64encode(hashlib.sha256(body[:max_body]).digest()).decode()
    prefix = (
        f"EG1-HMAC-SHA256 client_token={client_token};access_token={access_token};"
        f"timestamp={timestamp};nonce={nonce};"
    )
    data = "\t".join(
        [method.upper(), parts.scheme, parts.netloc.lower(), path, "", content_hash, prefix]
    )
    signing_key = _b64_hmac(client_secret.encode(), timestamp.encode())
    return prefix + "signature=" + _b64_hmac(signing_key.encode(), data.encode())
