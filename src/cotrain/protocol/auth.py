"""Signed requests: every write to the coordinator is a statement by a key.

A write carries four headers::

    X-Cotrain-Key        the author's ed25519 public key (64 hex)
    X-Cotrain-Time       the author's clock, unix milliseconds
    X-Cotrain-Nonce      32 hex, never used twice by this key
    X-Cotrain-Signature  ed25519 over the statement (128 hex)

    statement = b"cotrain-request/1\\n" METHOD "\\n" PATH "\\n" hex(sha256(body)) "\\n"
                TIME "\\n" NONCE

The body must be canonical JSON (RFC 8785), so the ledger can keep it as an object and anyone can
re-derive the bytes that were signed. The coordinator refuses a statement whose time is more
than the clock window away from its own, and a nonce it has seen from that key within twice the
window: a captured request cannot be replayed, now or later (Prime's protocol kept nonces for
60 s but accepted requests for 300 s). The signed request itself becomes the ledger entry.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cotrain.core import jsonsafe
from cotrain.core.identity import Identity
from cotrain.core.signed import EnvelopeError, canonical
from cotrain.protocol.errors import AuthError, RateLimited, RequestError

PREFIX = b"cotrain-request/1\n"
H_KEY, H_TIME, H_NONCE, H_SIG = (
    "X-Cotrain-Key",
    "X-Cotrain-Time",
    "X-Cotrain-Nonce",
    "X-Cotrain-Signature",
)
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")
_PATH = re.compile(r"^/[A-Za-z0-9_./-]{0,200}$")
_METHODS = frozenset({"POST", "PUT", "DELETE", "LEDGER"})
"""``LEDGER`` is the method of entries the coordinator writes itself (a node found dead)."""


def statement(method: str, path: str, body_sha256: str, ts_ms: int, nonce: str) -> bytes:
    return PREFIX + f"{method}\n{path}\n{body_sha256}\n{ts_ms}\n{nonce}".encode()


@lru_cache(maxsize=4096)
def _public_key(key_hex: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex))


def check_key(key: Any, what: str = "key") -> str:
    if not isinstance(key, str) or not _HEX64.match(key):
        raise RequestError(f"{what} must be an ed25519 public key (64 lowercase hex)")
    return key


@dataclass(frozen=True)
class SignedRequest:
    """One signed write: who, when, what (method, path, body) and the signature."""

    key: str
    ts_ms: int
    nonce: str
    method: str
    path: str
    body: dict[str, Any]
    sig: str
    raw: bytes | None = field(default=None, compare=False, repr=False)
    """The body's canonical bytes, when known (what was signed): saves re-encoding it."""

    def body_bytes(self) -> bytes:
        return canonical(self.body) if self.raw is None else self.raw

    def statement(self) -> bytes:
        digest = hashlib.sha256(self.body_bytes()).hexdigest()
        return statement(self.method, self.path, digest, self.ts_ms, self.nonce)

    def verify(self) -> None:
        """Raise ``AuthError`` unless ``sig`` is ``key``'s signature over the statement."""
        try:
            _public_key(self.key).verify(bytes.fromhex(self.sig), self.statement())
        except (InvalidSignature, ValueError):
            raise AuthError(f"bad signature from key {self.key[:16]}...") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "ts": self.ts_ms,
            "nonce": self.nonce,
            "method": self.method,
            "path": self.path,
            "body": self.body,
            "sig": self.sig,
        }

    @classmethod
    def from_json(cls, obj: Any) -> SignedRequest:
        """Shape-check a request read back from a ledger (does not verify the signature)."""
        fields = {"key", "ts", "nonce", "method", "path", "body", "sig"}
        if not isinstance(obj, dict) or set(obj) != fields:
            raise RequestError(f"a signed request is an object with {sorted(fields)}")
        ts, nonce, method, path = obj["ts"], obj["nonce"], obj["method"], obj["path"]
        if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts < 2**53:
            raise RequestError("request time must be unix milliseconds")
        if not isinstance(nonce, str) or not _HEX32.match(nonce):
            raise RequestError("request nonce must be 32 lowercase hex")
        if method not in _METHODS or not isinstance(path, str) or not _PATH.match(path):
            raise RequestError("request method or path is malformed")
        if not isinstance(obj["body"], dict):
            raise RequestError("request body must be a JSON object")
        sig = obj["sig"]
        if not isinstance(sig, str) or not _HEX128.match(sig):
            raise RequestError("request signature must be 128 lowercase hex")
        return cls(check_key(obj["key"]), ts, nonce, method, path, obj["body"], sig)


def sign(
    identity: Identity,
    method: str,
    path: str,
    body: dict[str, Any],
    *,
    ts_ms: int | None = None,
    nonce: str | None = None,
) -> SignedRequest:
    """Sign a write: what a client sends (``headers()`` and ``body_bytes()``)."""
    ts = int(time.time() * 1000) if ts_ms is None else ts_ms
    nonce = os.urandom(16).hex() if nonce is None else nonce
    raw = canonical(body)
    sig = identity.sign(statement(method, path, hashlib.sha256(raw).hexdigest(), ts, nonce))
    return SignedRequest(identity.public_hex, ts, nonce, method, path, dict(body), sig.hex(), raw)


def headers(req: SignedRequest) -> dict[str, str]:
    return {
        H_KEY: req.key,
        H_TIME: str(req.ts_ms),
        H_NONCE: req.nonce,
        H_SIG: req.sig,
        "Content-Type": "application/json",
    }


def read(method: str, path: str, hdrs: Any, raw: bytes, *, max_body: int) -> SignedRequest:
    """Parse and verify a signed write from the network (not its time or nonce: ``Replay``).

    Raises ``RequestError`` for a malformed or non-canonical body and ``AuthError`` for missing
    headers or a bad signature."""
    key, ts, nonce, sig = (hdrs.get(h) for h in (H_KEY, H_TIME, H_NONCE, H_SIG))
    if key is None or ts is None or nonce is None or sig is None:
        raise AuthError(
            f"unsigned request: writes need the {H_KEY}, {H_TIME}, {H_NONCE} and "
            f"{H_SIG} headers (cotrain.protocol.client signs them)"
        )
    if not _HEX64.match(key):
        raise AuthError(f"{H_KEY} must be 64 lowercase hex")
    if not ts.isdigit() or len(ts) > 15:
        raise AuthError(f"{H_TIME} must be unix milliseconds")
    if not _HEX32.match(nonce):
        raise AuthError(f"{H_NONCE} must be 32 lowercase hex")
    if not _HEX128.match(sig):
        raise AuthError(f"{H_SIG} must be 128 lowercase hex")
    if len(raw) > max_body:
        raise RequestError(f"request body of {len(raw)} bytes is over the {max_body}-byte limit")
    req_stmt = statement(method, path, hashlib.sha256(raw).hexdigest(), int(ts), nonce)
    try:
        _public_key(key).verify(bytes.fromhex(sig), req_stmt)
    except (InvalidSignature, ValueError):
        raise AuthError(f"bad signature from key {key[:16]}...") from None
    try:
        body = jsonsafe.loads(raw, max_bytes=max_body)
    except jsonsafe.MalformedJSON as e:
        raise RequestError(f"request body: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    try:
        if canonical(body) != raw:
            raise RequestError("request body must be canonical JSON (RFC 8785)")
    except EnvelopeError as e:
        raise RequestError(str(e)) from None
    return SignedRequest(key, int(ts), nonce, method, path, body, sig, raw)


class Replay:
    """Refuses requests outside the clock window, and a (key, nonce) seen before while a
    request carrying it could still pass the time check.

    A request signed at ``ts`` passes only until ``ts + window``, so its nonce is kept until
    then (a second's bucket of them is dropped as the clock passes it): memory is the request
    rate times about one window. Each nonce is kept as a 96-bit fingerprint of (key, nonce), an
    int of 40 bytes instead of two strings, so a minute at thousands of requests a second
    stays at megabytes; a chance collision (2^-96 a pair) would refuse one honest request,
    which its client signs again with a fresh nonce."""

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self._seen: set[int] = set()
        self._expiry: dict[int, list[int]] = {}  # second -> fingerprints that expire then
        self._next = -1  # seconds below this were purged

    @staticmethod
    def _fingerprint(key: str, nonce: str) -> int:
        digest = hashlib.blake2b(f"{key}/{nonce}".encode(), digest_size=12).digest()
        return int.from_bytes(digest, "big")

    def check(self, key: str, nonce: str, ts_ms: int, now_ms: int) -> None:
        skew = ts_ms - now_ms
        if abs(skew) > self.window_ms:
            raise AuthError(
                f"request time is {skew / 1000:+.1f} s from the coordinator's clock, outside "
                f"the {self.window_ms / 1000:.0f} s window: set this machine's clock (NTP)"
            )
        self._purge(now_ms)
        fp = self._fingerprint(key, nonce)
        if fp in self._seen:
            raise AuthError("replayed request: this nonce was already used by this key")
        self._add(fp, ts_ms + self.window_ms)

    def remember(self, key: str, nonce: str, at_ms: int) -> None:
        """A nonce sequenced at ``at_ms``: what a coordinator restarted after a crash reads
        back from its ledger, so a request acknowledged before it is refused after (kept
        until ``at_ms`` + twice the window: its signed time was within a window of it)."""
        fp = self._fingerprint(key, nonce)
        if fp not in self._seen:
            self._add(fp, at_ms + 2 * self.window_ms)

    def _add(self, fp: int, until_ms: int) -> None:
        self._seen.add(fp)
        self._expiry.setdefault(until_ms // 1000 + 1, []).append(fp)

    def _purge(self, now_ms: int) -> None:
        """Forget the nonces whose requests can no longer pass the time check."""
        now_s = now_ms // 1000
        if now_s <= self._next:
            return
        if self._next < 0 or now_s - self._next > len(self._expiry):
            gone = [s for s in self._expiry if s < now_s]  # a clock jump, or the first call
        else:
            gone = [s for s in range(self._next, now_s) if s in self._expiry]
        for s in gone:
            for fp in self._expiry.pop(s):
                self._seen.discard(fp)
        self._next = now_s

    def __len__(self) -> int:
        return len(self._seen)


class RateLimit:
    """A token bucket per key: ``rate`` requests a second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 100_000) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now_s: float) -> None:
        tokens, last = self._buckets.pop(key, (self.burst, now_s))
        tokens = min(self.burst, tokens + (now_s - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now_s)
            raise RateLimited(
                f"key {key[:16]}... is over its rate limit ({self.rate:g} requests/s)"
            )
        self._buckets[key] = (tokens - 1.0, now_s)
        while len(self._buckets) > self.max_keys:  # forget the longest-idle key (it is full)
            self._buckets.popitem(last=False)
