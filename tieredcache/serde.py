"""Serialization for shared layers: safe by default.

The default is msgpack through msgspec (fast, maintained, no code execution on
decode). JSON is available for readability. Pickle executes code on load, so
it is only available when the user opts in with a secret: every entry is then
signed with HMAC-SHA256 over the key, the header and the payload, and an entry
that fails to verify is never unpickled. Binding the key into the signature
stops a signed entry copied under another tenant's key from verifying.

Wire format of an entry::

    b"TC" version:u8 flags:u8 created:f64 fresh_until:f64 stale_until:f64 compute:f32
    [signature: 32 bytes when flags & SIGNED] payload
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import struct
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec

from .entry import Entry
from .errors import ConfigurationError, DecodeError, EncodeError

__all__ = ["JsonSerializer", "MsgpackSerializer", "PickleSerializer", "Serializer"]

Decoder = Callable[[bytes], Any]


class Serializer(Protocol):
    """Turns values into bytes and back. ``decoder(type_)`` may decode into a type."""

    name: str

    def encode(self, value: Any) -> bytes: ...

    def decoder(self, type_: Any) -> Decoder: ...


def _typed_or_any(module: Any, type_: Any) -> Decoder:
    if type_ is not Any:
        try:
            return module.Decoder(type_).decode  # type: ignore[no-any-return]
        except (TypeError, ValueError):
            pass  # a return annotation msgspec cannot decode into: fall back to plain types
    return module.Decoder().decode  # type: ignore[no-any-return]


class MsgpackSerializer:
    """msgpack via msgspec. With a return annotation, values decode into that type
    (dataclasses, msgspec Structs, datetimes, UUIDs, tuples)."""

    name = "msgpack"

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()

    def encode(self, value: Any) -> bytes:
        return self._encoder.encode(value)

    def decoder(self, type_: Any) -> Decoder:
        return _typed_or_any(msgspec.msgpack, type_)


class JsonSerializer:
    """JSON via msgspec: readable in ``redis-cli``, a little larger and slower than msgpack."""

    name = "json"

    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder()

    def encode(self, value: Any) -> bytes:
        return self._encoder.encode(value)

    def decoder(self, type_: Any) -> Decoder:
        return _typed_or_any(msgspec.json, type_)


class PickleSerializer:
    """Pickle, for values nothing else can encode. Requires a signing secret.

    Entries are signed (see :class:`EntryCodec`); an entry that fails to verify
    is a miss and is never unpickled.
    """

    name = "pickle"
    requires_signature = True

    def encode(self, value: Any) -> bytes:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def decoder(self, type_: Any) -> Decoder:
        return pickle.loads


_HEADER = struct.Struct("<2sBBdddf")
_MAGIC = b"TC"
_VERSION = 1
_SIGNED = 1
_SIG_LEN = 32


class EntryCodec:
    """Encodes :class:`Entry` objects for shared layers, signing them when secrets are set.

    ``secrets``: the first signs, all verify (rotate by prepending a new one).
    """

    __slots__ = ("_keys", "serializer")

    def __init__(self, serializer: Serializer, secrets: Sequence[bytes | str] = ()) -> None:
        self.serializer = serializer
        self._keys = [s.encode() if isinstance(s, str) else bytes(s) for s in secrets]
        if any(len(k) < 16 for k in self._keys):
            raise ConfigurationError("signing secrets must be at least 16 bytes")
        if getattr(serializer, "requires_signature", False) and not self._keys:
            raise ConfigurationError(
                "serializer=PickleSerializer() executes code on load; it needs "
                "signing_secrets=[...] so tampered entries are rejected"
            )

    @property
    def signed(self) -> bool:
        return bool(self._keys)

    def _mac(self, secret: bytes, key: str, header: bytes, payload: bytes) -> bytes:
        mac = hmac.new(secret, key.encode(), hashlib.sha256)
        mac.update(b"\0")
        mac.update(header)
        mac.update(payload)
        return mac.digest()

    def encode(self, key: str, entry: Entry) -> bytes:
        try:
            payload = self.serializer.encode(entry.value)
        except (TypeError, ValueError, pickle.PicklingError, OverflowError) as exc:
            raise EncodeError(
                f"cannot encode the value for key {key!r} with {self.serializer.name}: {exc}"
            ) from exc
        header = _HEADER.pack(
            _MAGIC,
            _VERSION,
            _SIGNED if self._keys else 0,
            entry.created_at,
            entry.fresh_until,
            entry.stale_until,
            entry.compute_time,
        )
        if not self._keys:
            return header + payload
        return header + self._mac(self._keys[0], key, header, payload) + payload

    def decode(self, key: str, data: bytes, decode: Decoder) -> Entry:
        """Decode ``data`` stored under ``key``; raise :class:`DecodeError` if it is bad."""
        if len(data) < _HEADER.size:
            raise DecodeError(f"entry for key {key!r} is truncated ({len(data)} bytes)")
        magic, version, flags, created, fresh, stale, compute = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != _VERSION:
            raise DecodeError(f"entry for key {key!r} has an unknown format")
        offset = _HEADER.size
        if self._keys:
            if not flags & _SIGNED:
                raise DecodeError(f"entry for key {key!r} is unsigned but signing is required")
            signature = data[offset : offset + _SIG_LEN]
            offset += _SIG_LEN
            payload = data[offset:]
            header = data[: _HEADER.size]
            if not any(
                hmac.compare_digest(signature, self._mac(k, key, header, payload))
                for k in self._keys
            ):
                raise DecodeError(f"entry for key {key!r} failed signature verification")
        elif flags & _SIGNED:
            raise DecodeError(f"entry for key {key!r} is signed but no secret is configured")
        else:
            payload = data[offset:]
        try:
            value = decode(payload)
        except Exception as exc:  # any decoder failure: the entry is unusable
            raise DecodeError(
                f"entry for key {key!r} does not decode with {self.serializer.name}: {exc}"
            ) from exc
        return Entry(value, created, fresh, stale, compute)
