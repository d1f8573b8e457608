"""Signed manifests: what a version is made of, and whether to believe it.

A manifest names the version, the channel, every shard's size and SHA-256, the whole file's
SHA-256 and the time it was signed. On the wire (and on disk) it travels as an envelope::

    {"manifest": "<canonical JSON text>", "signature": "<ed25519 hex>"}

The signature covers the exact manifest text (prefixed by a domain tag), so nobody needs to
re-serialise JSON identically to check it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

from cotrain.core.identity import Identity, SignatureError, verify_signature
from cotrain.shardcast.errors import ForgedManifestError, ManifestError, ReplayedManifestError

FORMAT = "cotrain.shardcast/1"
_DOMAIN = b"cotrain.shardcast.manifest\n"


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its byte offset in the file, its size and its SHA-256 (hex)."""

    offset: int
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What one version is made of."""

    channel: str
    version: int
    created_unix: float
    publisher: str
    name: str
    file_size: int
    file_sha256: str
    shard_size: int
    shards: tuple[ShardInfo, ...]

    def text(self) -> str:
        """The canonical JSON text that gets signed."""
        body = asdict(self)
        body["format"] = FORMAT
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_text(cls, text: str) -> Manifest:
        try:
            body = json.loads(text)
            if body.pop("format", None) != FORMAT:
                raise ManifestError(f"malformed manifest: not a {FORMAT} manifest")
            shards = tuple(ShardInfo(**s) for s in body.pop("shards"))
            m = cls(shards=shards, **body)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ManifestError(f"malformed manifest: {e}") from None
        m._check_layout()
        return m

    def _check_layout(self) -> None:
        """The shards must tile the file exactly; a lie here could make us write out of bounds."""
        pos = 0
        for i, s in enumerate(self.shards):
            if s.offset != pos or s.size <= 0 or len(s.sha256) != 64:
                raise ManifestError(f"malformed manifest: shard {i} does not tile the file")
            pos += s.size
        if pos != self.file_size or self.version < 1:
            raise ManifestError("malformed manifest: shard sizes do not add up to the file size")


@dataclass(frozen=True)
class SignedManifest:
    """A manifest with the publisher's signature, as served by origin and relays."""

    manifest: Manifest
    text: str
    signature: str

    @classmethod
    def sign(cls, manifest: Manifest, identity: Identity) -> SignedManifest:
        if manifest.publisher != identity.public_hex:
            raise ValueError("the manifest's publisher field must be the signing key's public hex")
        text = manifest.text()
        sig = identity.sign(_DOMAIN + text.encode()).hex()
        return cls(manifest, text, sig)

    def to_bytes(self) -> bytes:
        return json.dumps({"manifest": self.text, "signature": self.signature}).encode()

    @property
    def digest(self) -> str:
        """SHA-256 of the envelope: names this exact signed manifest (used by resume state)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def parse(cls, raw: bytes) -> SignedManifest:
        """Parse an envelope; does NOT check trust (use ``TrustPolicy.check``)."""
        try:
            env = json.loads(raw)
            text, sig = env["manifest"], env["signature"]
            if not isinstance(text, str) or not isinstance(sig, str):
                raise TypeError("manifest and signature must be strings")
        except (ValueError, TypeError, KeyError) as e:
            raise ManifestError(f"malformed manifest envelope: {e}") from None
        return cls(Manifest.from_text(text), text, sig)


@dataclass(frozen=True)
class TrustPolicy:
    """Which manifests a client or relay accepts."""

    publisher_key: str
    channel: str = "default"
    min_version: int = 1
    max_age_s: float | None = None

    def check(self, signed: SignedManifest, *, expected_version: int | None = None) -> Manifest:
        """Return the manifest if it is signed by our publisher for the version we asked for.

        Raises ``ForgedManifestError`` for a bad signature or a foreign publisher, and
        ``ReplayedManifestError`` for a genuine manifest offered out of place: another channel,
        another version than the one requested, older than ``min_version`` or ``max_age_s``.
        """
        m = signed.manifest
        if m.publisher != self.publisher_key:
            raise ForgedManifestError(
                f"manifest v{m.version} names publisher {m.publisher[:16]}..., "
                f"expected {self.publisher_key[:16]}..."
            )
        try:
            verify_signature(
                self.publisher_key, _DOMAIN + signed.text.encode(), bytes.fromhex(signed.signature)
            )
        except (SignatureError, ValueError) as e:
            raise ForgedManifestError(f"manifest v{m.version}: {e}") from None
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
        if self.max_age_s is not None and time.time() - m.created_unix > self.max_age_s:
            raise ReplayedManifestError(
                f"manifest v{m.version} was signed {time.time() - m.created_unix:.0f} s ago, "
                f"more than max_manifest_age_s={self.max_age_s:g}"
            )
        return m
