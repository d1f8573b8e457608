"""Signed notes (https://c2sp.org/signed-note) and log checkpoints
(https://c2sp.org/tlog-checkpoint), Ed25519 signatures only.

A signed note is a UTF-8 text ending in a newline, a blank line, then one line per signature::

    <text, one or more lines, each ending in "\\n">
    <blank line>
    — <key name> base64(key ID || Ed25519 signature over the text)

(the em dash is U+2014, followed by a space). Key names are non-empty, with no spaces and no
"+". The key ID is ``SHA-256(name || 0x0A || 0x01 || public key)[:4]``, and a verifier key is
written ``name+hex(key ID)+base64(0x01 || public key)``. A verifier ignores signatures by keys
it does not know (a key is its name and ID together), refuses the note when the signature of a
key it knows does not verify, and when none does.

A checkpoint is the text of a note a log signs: its origin, its size in decimal (no leading
zeros), the base64 of its RFC 9162 root hash, then optional non-empty extension lines::

    example.com/behind-the-sofa
    20852163
    CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=

Witnesses co-sign the same text (``add_signature``) once they have checked that it is consistent
with the last checkpoint they saw (``cotrain.protocol.merkle.verify_consistency``).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cotrain.core.errors import CotrainError
from cotrain.core.identity import Identity, SignatureError, verify_signature

__all__ = [
    "MAX_NOTE_BYTES",
    "MAX_SIGNATURES",
    "Checkpoint",
    "Note",
    "NoteError",
    "Signature",
    "VerifierKey",
    "add_signature",
    "format_checkpoint",
    "key_id",
    "parse_checkpoint",
    "parse_note",
    "parse_verifier_key",
    "sign_note",
    "verifier_key",
    "verify_note",
]

MAX_NOTE_BYTES = 1_000_000
"""Longer notes are refused unread (the spec asks verifiers for a limit)."""
MAX_SIGNATURES = 100
"""More signature lines are refused (the spec requires accepting at least 16)."""

_ED25519 = b"\x01"  # the signature type byte of Ed25519 keys
_SIG_PREFIX = "\u2014 "  # em dash, space
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")  # ASCII controls other than newline
_SIZE = re.compile(r"0|[1-9][0-9]*", re.ASCII)


class NoteError(CotrainError, ValueError):
    """A note, verifier key or checkpoint is malformed, or its signatures do not check out."""


@dataclass(frozen=True)
class Signature:
    """One signature line: ``— name base64(key_id || sig)``."""

    name: str
    key_id: bytes  # 4 bytes
    sig: bytes


@dataclass(frozen=True)
class Note:
    """A parsed note. ``verified`` names the keys whose signatures ``verify_note`` checked."""

    text: str
    signatures: list[Signature]
    verified: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class VerifierKey:
    """A named Ed25519 public key, as in ``name+hex(key_id)+base64(0x01 || public_key)``."""

    name: str
    key_id: bytes
    public_key: bytes


@dataclass(frozen=True)
class Checkpoint:
    """A log's tree head: ``origin`` names the log, ``root`` is MTH of its first ``size`` leaves."""

    origin: str
    size: int
    root: bytes
    extensions: list[str] = field(default_factory=list)


def valid_name(name: str) -> bool:
    """Whether ``name`` may name a key in a note's signature lines (``— name base64(...)``):
    non-empty, with no spaces and no '+', as the signed-note format requires."""
    return bool(name) and "+" not in name and not any(c.isspace() for c in name)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not valid_name(name) or _CONTROL.search(name):
        raise NoteError(f"key name {name!r} must be non-empty, without spaces or '+'")


def _check_text(text: str) -> None:
    if not isinstance(text, str) or not text.endswith("\n"):
        raise NoteError("note text must be non-empty and end with a newline")
    if _CONTROL.search(text):
        raise NoteError("note text must not contain control characters other than newline")


def _b64decode(s: str, what: str) -> bytes:
    """Strict standard base64: only the alphabet, padded, and in its one canonical form."""
    try:
        raw = base64.b64decode(s.encode("ascii"), validate=True)
    except ValueError:
        raise NoteError(f"{what} is not base64") from None
    if base64.b64encode(raw).decode("ascii") != s:
        raise NoteError(f"{what} is not canonical base64")
    return raw


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte ID of an Ed25519 key: SHA-256(name || 0x0A || 0x01 || public_key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + _ED25519 + public_key).digest()[:4]


def verifier_key(name: str, public_key: bytes) -> str:
    """The spec's text form of a verifier key: ``name+hex(key_id)+base64(0x01 || key)``."""
    _check_name(name)
    if len(public_key) != 32:
        raise NoteError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
    return f"{name}+{key_id(name, public_key).hex()}+{_b64(_ED25519 + public_key)}"


def parse_verifier_key(vkey: str) -> VerifierKey:
    """Parse ``verifier_key``'s form; raises ``NoteError`` unless the key ID matches the key."""
    parts = vkey.split("+", 2)  # the base64 may itself contain '+'
    if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]{8}", parts[1]):
        raise NoteError(f"verifier key {vkey[:40]!r} is not name+hex(key ID)+base64(key)")
    name, hex_id, b64 = parts
    _check_name(name)
    raw = _b64decode(b64, "verifier key")
    if len(raw) != 33 or raw[:1] != _ED25519:
        raise NoteError(f"verifier key of {name} is not an Ed25519 key (type 0x01, 32 bytes)")
    kid = key_id(name, raw[1:])
    if kid.hex() != hex_id:
        raise NoteError(f"verifier key of {name} has ID {hex_id}, its key's is {kid.hex()}")
    return VerifierKey(name=name, key_id=kid, public_key=raw[1:])


def _signature_line(text: str, name: str, identity: Identity) -> str:
    kid = key_id(name, identity.public_bytes)
    return f"{_SIG_PREFIX}{name} {_b64(kid + identity.sign(text.encode()))}\n"


def _format(text: str, signatures: Iterable[Signature]) -> str:
    lines = "".join(f"{_SIG_PREFIX}{s.name} {_b64(s.key_id + s.sig)}\n" for s in signatures)
    return f"{text}\n{lines}"


def sign_note(text: str, name: str, identity: Identity) -> str:
    """``text`` signed by ``identity`` under the key name ``name``."""
    _check_text(text)
    _check_name(name)
    out = text + "\n" + _signature_line(text, name, identity)
    if len(out.encode()) > MAX_NOTE_BYTES:
        raise NoteError(f"a note may be {MAX_NOTE_BYTES} bytes at most")
    return out


def add_signature(note: str, name: str, identity: Identity) -> str:
    """``note`` with one more signature, by ``identity`` as ``name``, over the same text (a
    witness's co-signature). A signature already there by the same key is replaced. Checks
    nothing about the others: verify the note first."""
    parsed = parse_note(note)
    _check_name(name)
    kid = key_id(name, identity.public_bytes)
    kept = [s for s in parsed.signatures if (s.name, s.key_id) != (name, kid)]
    out = _format(parsed.text, kept) + _signature_line(parsed.text, name, identity)
    if len(out.encode()) > MAX_NOTE_BYTES or len(kept) + 1 > MAX_SIGNATURES:
        raise NoteError(f"a note may carry {MAX_SIGNATURES} signatures in {MAX_NOTE_BYTES} bytes")
    return out


def parse_note(raw: str | bytes) -> Note:
    """Split a signed note into its text and signatures, checking only the format."""
    if len(raw) > MAX_NOTE_BYTES:
        raise NoteError(f"note is over {MAX_NOTE_BYTES} bytes")
    try:
        msg = raw.decode() if isinstance(raw, bytes) else raw
        size = len(msg.encode())
    except UnicodeError:
        raise NoteError("note is not valid UTF-8") from None
    if size > MAX_NOTE_BYTES:
        raise NoteError(f"note is over {MAX_NOTE_BYTES} bytes")
    if _CONTROL.search(msg):
        raise NoteError("note contains control characters other than newline")
    split = msg.rfind("\n\n")  # the signatures follow the last blank line
    if split < 0:
        raise NoteError("note has no blank line before its signatures")
    text, block = msg[: split + 1], msg[split + 2 :]
    if not block:
        raise NoteError("note has no signatures")
    if not block.endswith("\n"):
        raise NoteError("note does not end with a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"note has {len(lines)} signatures, at most {MAX_SIGNATURES} are read")
    signatures = []
    for n, line in enumerate(lines, 1):
        if not line.startswith(_SIG_PREFIX):
            raise NoteError(f"signature line {n} does not start with an em dash and a space")
        name, _, b64 = line[len(_SIG_PREFIX) :].partition(" ")
        if not valid_name(name):
            raise NoteError(f"signature line {n} has an invalid key name {name!r}")
        raw_sig = _b64decode(b64, f"signature line {n}")
        if len(raw_sig) < 5:
            raise NoteError(f"signature line {n} is too short for a key ID and a signature")
        signatures.append(Signature(name=name, key_id=raw_sig[:4], sig=raw_sig[4:]))
    return Note(text=text, signatures=signatures)


def _known_keys(
    verifiers: Mapping[str, bytes] | Iterable[str],
) -> dict[tuple[str, bytes], bytes]:
    if isinstance(verifiers, str):
        raise TypeError("verifiers is a mapping name -> public key or a list of verifier keys")
    if isinstance(verifiers, Mapping):
        keys = [VerifierKey(n, key_id(n, k), k) for n, k in verifiers.items()]
        for vk in keys:
            _check_name(vk.name)
            if len(vk.public_key) != 32:
                raise NoteError(f"the Ed25519 public key of {vk.name} must be 32 bytes")
    else:
        keys = [parse_verifier_key(v) for v in verifiers]
    known: dict[tuple[str, bytes], bytes] = {}
    for vk in keys:
        if known.setdefault((vk.name, vk.key_id), vk.public_key) != vk.public_key:
            raise NoteError(f"two verifier keys are both {vk.name}+{vk.key_id.hex()}")
    return known


def verify_note(raw: str | bytes, verifiers: Mapping[str, bytes] | Iterable[str]) -> Note:
    """Parse ``raw`` and check the signatures of the keys in ``verifiers``: a mapping from key
    name to 32-byte Ed25519 public key, or an iterable of verifier keys (``verifier_key``).

    Signatures by other keys (another name, or the same name with another key ID) are ignored.
    Raises ``NoteError`` if a known key's signature is bad or if no known key signed; returns
    the note with ``verified`` naming the keys that did, in the note's order.
    """
    known = _known_keys(verifiers)
    note = parse_note(raw)
    message = note.text.encode()
    verified: list[str] = []
    for s in note.signatures:
        public_key = known.get((s.name, s.key_id))
        if public_key is None:
            continue
        try:
            verify_signature(public_key.hex(), message, s.sig)
        except SignatureError:
            raise NoteError(f"bad signature by known key {s.name}+{s.key_id.hex()}") from None
        if s.name not in verified:
            verified.append(s.name)
    if not verified:
        signers = ", ".join(f"{s.name}+{s.key_id.hex()}" for s in note.signatures)
        raise NoteError(f"no signature by a known key (signed by {signers})")
    return dataclasses.replace(note, verified=verified)


def format_checkpoint(cp: Checkpoint) -> str:
    """The note text of ``cp``: origin, size, base64(root), extensions, one per line."""
    if (
        not isinstance(cp.origin, str)
        or not cp.origin
        or cp.origin != cp.origin.strip()
        or "\n" in cp.origin
    ):
        raise NoteError(f"checkpoint origin {cp.origin!r} must be one non-empty trimmed line")
    if type(cp.size) is not int or cp.size < 0:
        raise NoteError(f"checkpoint size must be an int >= 0, got {cp.size!r}")
    if not isinstance(cp.root, bytes) or len(cp.root) != 32:
        raise NoteError("checkpoint root must be a 32-byte hash")
    for ext in cp.extensions:
        if not isinstance(ext, str) or not ext or "\n" in ext:
            raise NoteError(f"checkpoint extension {ext!r} must be one non-empty line")
    text = "".join(f"{line}\n" for line in [cp.origin, str(cp.size), _b64(cp.root), *cp.extensions])
    _check_text(text)
    return text


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint's note text (``Note.text``, after ``verify_note``), strictly."""
    _check_text(text)
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise NoteError("a checkpoint has an origin, a size and a root hash line")
    origin, size, root, *extensions = lines
    if not origin or origin != origin.strip():
        raise NoteError(f"checkpoint origin {origin[:40]!r} is empty or has spaces at the ends")
    if not _SIZE.fullmatch(size) or len(size) > 20 or int(size) >= 1 << 64:
        raise NoteError(f"checkpoint size {size[:40]!r} is not a decimal without leading zeros")
    root_hash = _b64decode(root, "checkpoint root hash")
    if len(root_hash) != 32:
        raise NoteError(f"checkpoint root hash is {len(root_hash)} bytes, expected 32")
    if any(not ext for ext in extensions):
        raise NoteError("checkpoint extension lines must be non-empty")
    return Checkpoint(origin=origin, size=int(size), root=root_hash, extensions=extensions)
