"""Signed manifests: what a version is made of, and whether to believe it.

A manifest names the version, the channel, every shard's size and SHA-256, the whole file's
SHA-256 and the time it was signed. On the wire (and on disk) it travels as a core signed
envelope (``cotrain.core.signed.Envelope``) of domain ``cotrain.shardcast.manifest/1``::

    {"domain": "cotrain.shardcast.manifest/1", "signer": "<publisher key>",
     "body": {"channel": ..., "version": 7, "created_unix": ..., "name": ..., "file_size": ...,
              "file_sha256": ..., "shard_size": ..., "shards": [{"offset", "size", "sha256"}]},
     "signature": "<ed25519 hex>"}

The signature covers the RFC 8785 canonical form of the body under the domain tag, so a
signature made for anything else cannot pass as a manifest. Parsing is strict: every field has
its type and range (integers within 2^53), the shards must tile the file, and anything else is
``ManifestError``, never another exception.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from cotrain.core import jsonsafe
from cotrain.core.identity import Identity
from cotrain.core.signed import Envelope, EnvelopeError
from cotrain.shardcast.errors import (
    ForgedManifestError,
    ManifestError,
    ReplayedManifestError,
    StaleVersionError,
)

DOMAIN = "cotrain.shardcast.manifest/1"
MAX_MANIFEST_BYTES = 8 << 20
"""A manifest is read from the network only up to this size (about 80,000 shards)."""
MAX_VERSION = 2**53
"""Versions, sizes and offsets are JSON integers, exact in a double up to 2^53."""

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_BODY_KEYS = {
    "channel", "version", "created_unix", "name", "file_size", "file_sha256", "shard_size",
    "shards",
}  # fmt: skip
_ENVELOPE_KEYS = {"domain", "signer", "body", "signature"}


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its byte offset in the file, its size and its SHA-256 (hex)."""

    offset: int
    size: int
    sha256: str


def _int(body: dict[str, Any], key: str, lo: int) -> int:
    value = body.get(key)
    if type(value) is not int or not lo <= value <= MAX_VERSION:
        raise ManifestError(f"malformed manifest: {key} must be an integer in [{lo}, 2^53]")
    return value


def _str(body: dict[str, Any], key: str, limit: int) -> str:
    value = body.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise ManifestError(f"malformed manifest: {key} must be a string of <= {limit} chars")
    return value


@dataclass(frozen=True)
class Manifest:
    """What one version is made of; ``publisher`` is the key that signed it."""

    channel: str
    version: int
    created_unix: float
    publisher: str
    name: str
    file_size: int
    file_sha256: str
    shard_size: int
    shards: tuple[ShardInfo, ...]

    def body(self) -> dict[str, Any]:
        """The signed statement (everything but the publisher, which is the envelope's signer)."""
        return {
            "channel": self.channel,
            "version": self.version,
            "created_unix": self.created_unix,
            "name": self.name,
            "file_size": self.file_size,
            "file_sha256": self.file_sha256,
            "shard_size": self.shard_size,
            "shards": [
                {"offset": s.offset, "size": s.size, "sha256": s.sha256} for s in self.shards
            ],
        }

    @classmethod
    def from_body(cls, body: Any, *, publisher: str) -> Manifest:
        """A manifest from an envelope body; ``ManifestError`` unless every field is sound."""
        if not isinstance(body, dict) or set(body) != _BODY_KEYS:
            raise ManifestError(
                f"malformed manifest: the body must hold exactly {sorted(_BODY_KEYS)}"
            )
        created = body["created_unix"]
        if type(created) not in (int, float) or not math.isfinite(created):
            raise ManifestError("malformed manifest: created_unix must be a finite number")
        digest = _str(body, "file_sha256", 64)
        if not _SHA256.match(digest):
            raise ManifestError("malformed manifest: file_sha256 must be 64 lowercase hex")
        raw_shards = body["shards"]
        if not isinstance(raw_shards, list):
            raise ManifestError("malformed manifest: shards must be a list")
        shards = []
        for s in raw_shards:
            if not isinstance(s, dict) or set(s) != {"offset", "size", "sha256"}:
                raise ManifestError("malformed manifest: a shard is {offset, size, sha256}")
            sha = _str(s, "sha256", 64)
            if not _SHA256.match(sha):
                raise ManifestError("malformed manifest: a shard's sha256 must be 64 hex")
            shards.append(ShardInfo(_int(s, "offset", 0), _int(s, "size", 1), sha))
        m = cls(
            channel=_str(body, "channel", 200),
            version=_int(body, "version", 1),
            created_unix=float(created),
            publisher=publisher,
            name=_str(body, "name", 1000),
            file_size=_int(body, "file_size", 1),
            file_sha256=digest,
            shard_size=_int(body, "shard_size", 1),
            shards=tuple(shards),
        )
        m._check_layout()
        return m

    def _check_layout(self) -> None:
        """The shards must tile the file exactly; a lie here could make us write out of bounds."""
        pos = 0
        for i, s in enumerate(self.shards):
            if s.offset != pos:
                raise ManifestError(f"malformed manifest: shard {i} does not tile the file")
            pos += s.size
        if pos != self.file_size:
            raise ManifestError("malformed manifest: shard sizes do not add up to the file size")


@dataclass(frozen=True)
class SignedManifest:
    """A manifest in the publisher's signed envelope, as served by origin and relays."""

    manifest: Manifest
    envelope: Envelope
    raw: bytes = field(repr=False, default=b"")

    @classmethod
    def sign(cls, manifest: Manifest, identity: Identity) -> SignedManifest:
        if manifest.publisher != identity.public_hex:
            raise ValueError("the manifest's publisher field must be the signing key's public hex")
        env = Envelope.seal(identity, DOMAIN, manifest.body())
        return cls(manifest, env, env.to_bytes())

    def to_bytes(self) -> bytes:
        return self.raw or self.envelope.to_bytes()

    @property
    def digest(self) -> str:
        """SHA-256 of the envelope: names this exact signed manifest (used by resume state)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def parse(cls, raw: bytes) -> SignedManifest:
        """Parse an envelope and check its signature against the key it names.

        Whether that key is our publisher, and the version the one we want, is
        ``TrustPolicy.check``'s business. Raises ``ForgedManifestError`` for an envelope whose
        signature does not verify (or that was signed for another domain), ``ManifestError``
        for anything malformed.
        """
        try:
            obj = jsonsafe.loads(raw, max_bytes=MAX_MANIFEST_BYTES)
        except jsonsafe.MalformedJSON as e:
            raise ManifestError(f"malformed manifest envelope: {e}") from None
        if not isinstance(obj, dict) or set(obj) != _ENVELOPE_KEYS:
            raise ManifestError("malformed manifest envelope: not a signed envelope")
        try:
            env = Envelope.from_json(obj, domain=DOMAIN)
        except EnvelopeError as e:
            raise ForgedManifestError(f"manifest envelope does not verify: {e}") from None
        # Kept in canonical form: what a relay stores and passes on is exactly what was signed,
        # whatever padding or key order the server that sent it chose.
        return cls(Manifest.from_body(env.body, publisher=env.signer), env, env.to_bytes())


@dataclass(frozen=True)
class TrustPolicy:
    """Which manifests a client or relay accepts."""

    publisher_key: str
    channel: str = "default"
    min_version: int = 1
    max_age_s: float | None = None

    def check(self, signed: SignedManifest, *, expected_version: int | None = None) -> Manifest:
        """Return the manifest if it is signed by our publisher for the version we asked for.

        Raises ``ForgedManifestError`` for a bad signature or a foreign publisher,
        ``ReplayedManifestError`` for a genuine manifest offered out of place (another channel,
        another version than the one requested, older than ``min_version``), and
        ``StaleVersionError`` for one signed longer than ``max_age_s`` ago.
        """
        env = signed.envelope
        if env.signer != self.publisher_key:
            raise ForgedManifestError(
                f"manifest names publisher {env.signer[:16]}..., "
                f"expected {self.publisher_key[:16]}..."
            )
        try:  # re-verified here: a SignedManifest may have been built by hand
            Envelope.from_json(env.to_json(), domain=DOMAIN, signers=(self.publisher_key,))
            m = Manifest.from_body(env.body, publisher=env.signer)
        except EnvelopeError as e:
            raise ForgedManifestError(f"manifest: bad signature: {e}") from None
        if m != signed.manifest:
            raise ForgedManifestError("manifest: bad signature (it does not cover this manifest)")
        if m.channel != self.channel:
            raise ReplayedManifestError(
                f"manifest is for channel {m.channel!r}, not {self.channel!r}"
            )
        if expected_version is not None and m.version != expected_version:
            raise ReplayedManifestError(
                f"asked for version {expected_version} but got a signed manifest of v{m.version}"
            )
        if m.version < self.min_version:
            raise ReplayedManifestError(
                f"manifest v{m.version} is older than the minimum v{self.min_version}"
            )
        age = time.time() - m.created_unix
        if self.max_age_s is not None and age > self.max_age_s:
            raise StaleVersionError(
                f"v{m.version} was signed {age:.0f} s ago, more than max_manifest_age_s="
                f"{self.max_age_s:g} (raise it, or set it to inf, to accept older versions)"
            )
        return m
