"""The signed envelope: one format for everything a key vouches for.

::

    {"domain": "cotrain.shardcast.manifest/1",     what kind of statement this is
     "signer": "<ed25519 public key, 64 hex>",      who makes it
     "body":   {...},                                the statement (a JSON object)
     "signature": "<ed25519 signature, 128 hex>"}

The signature covers ``b"cotrain-envelope/1\\n" + domain + b"\\n" + JCS(body)``, where JCS is the
RFC 8785 canonical form (the ``rfc8785`` package): any implementation re-serialises the body to
the same bytes, and the domain tag keeps a signature made for one purpose (a manifest, an
admission token, a rollout, a ledger entry) from being replayed as another. Bodies are plain
JSON: integers within +-2^53 and no NaN or infinity (JCS refuses the rest).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import rfc8785

from cotrain.core import jsonsafe
from cotrain.core.errors import CotrainError
from cotrain.core.identity import Identity, SignatureError, verify_signature

PREFIX = b"cotrain-envelope/1\n"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")
_DOMAIN = re.compile(r"^[a-z0-9_.:/-]{1,100}$")


class EnvelopeError(CotrainError, ValueError):
    """An envelope is malformed, for another domain, from a signer we do not accept, or forged."""


def canonical(body: Mapping[str, Any]) -> bytes:
    """RFC 8785 bytes of ``body``; ``EnvelopeError`` if it is not plain JSON."""
    try:
        return rfc8785.dumps(body)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as e:
        raise EnvelopeError(f"envelope body is not canonical JSON: {e}") from None


def signed_bytes(domain: str, body: Mapping[str, Any]) -> bytes:
    return PREFIX + domain.encode() + b"\n" + canonical(body)


@dataclass(frozen=True)
class Envelope:
    """A statement ``body`` of kind ``domain``, signed by ``signer``."""

    domain: str
    signer: str
    body: dict[str, Any]
    signature: str

    @classmethod
    def seal(cls, identity: Identity, domain: str, body: Mapping[str, Any]) -> Envelope:
        if not _DOMAIN.match(domain):
            raise ValueError(f"bad envelope domain {domain!r}")
        sig = identity.sign(signed_bytes(domain, body)).hex()
        return cls(domain, identity.public_hex, dict(body), sig)

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "signer": self.signer,
            "body": self.body,
            "signature": self.signature,
        }

    def to_bytes(self) -> bytes:
        """The envelope as canonical JSON bytes (what goes on the wire or to disk)."""
        return canonical(self.to_json())

    @classmethod
    def from_json(
        cls,
        obj: Any,
        *,
        domain: str,
        signers: Collection[str] | None = None,
    ) -> Envelope:
        """Check an envelope from untrusted input: its shape, its ``domain``, that its signer is
        one of ``signers`` (any key when None) and its signature. Raises ``EnvelopeError``."""
        if not isinstance(obj, dict) or set(obj) != {"domain", "signer", "body", "signature"}:
            raise EnvelopeError("an envelope is an object with domain, signer, body, signature")
        dom, signer, body, sig = obj["domain"], obj["signer"], obj["body"], obj["signature"]
        if not isinstance(dom, str) or dom != domain:
            raise EnvelopeError(f"envelope is for {str(dom)[:60]!r}, expected {domain!r}")
        if not isinstance(signer, str) or not _HEX64.match(signer):
            raise EnvelopeError("envelope signer must be a 64-hex ed25519 public key")
        if not isinstance(sig, str) or not _HEX128.match(sig):
            raise EnvelopeError("envelope signature must be 128 hex characters")
        if not isinstance(body, dict):
            raise EnvelopeError("envelope body must be a JSON object")
        if signers is not None and signer not in signers:
            raise EnvelopeError(f"envelope signed by {signer[:16]}..., a key we do not accept")
        try:
            verify_signature(signer, signed_bytes(domain, body), bytes.fromhex(sig))
        except SignatureError as e:
            raise EnvelopeError(f"forged envelope: {e}") from None
        return cls(dom, signer, body, sig)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        domain: str,
        signers: Collection[str] | None = None,
        max_bytes: int = 16 << 20,
    ) -> Envelope:
        try:
            obj = jsonsafe.loads(data, max_bytes=max_bytes)
        except jsonsafe.MalformedJSON as e:
            raise EnvelopeError(f"malformed envelope: {e}") from None
        return cls.from_json(obj, domain=domain, signers=signers)
