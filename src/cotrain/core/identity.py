"""Node identities: ed25519 key pairs, signatures, and their on-disk form."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cotrain.core.errors import CotrainError


class SignatureError(CotrainError):
    """A signature does not verify against the expected public key."""


@dataclass(frozen=True)
class Identity:
    """An ed25519 private key; ``public_hex`` names the node."""

    key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        raw = Path(path).read_bytes()
        key = serialization.load_pem_private_key(raw, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(key).__name__}, expected an ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | Path) -> Identity:
        p = Path(path)
        if p.exists():
            return cls.load(p)
        ident = cls.generate()
        ident.save(p)
        return ident

    def save(self, path: str | Path) -> None:
        """Write the private key as PEM, atomically, readable only by the owner."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = p.with_name(p.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(tmp, p)

    @property
    def public_bytes(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def public_hex(self) -> str:
        return self.public_bytes.hex()

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)


def verify_signature(public_hex: str, message: bytes, signature: bytes) -> None:
    """Raise ``SignatureError`` unless ``signature`` is ``public_hex``'s over ``message``."""
    try:
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
    except ValueError as e:
        raise SignatureError(f"malformed public key {public_hex[:16]}...: {e}") from None
    try:
        pub.verify(signature, message)
    except InvalidSignature:
        raise SignatureError(f"bad signature for key {public_hex[:16]}...") from None
