"""C2SP signed notes and checkpoints: the Go reference vectors, round trips, co-signatures,
tampering, and every malformed shape the parsers must refuse."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cotrain.core.identity import Identity
from cotrain.protocol import note as note_module
from cotrain.protocol.merkle import MemoryTree, leaf_hash, verify_consistency, verify_inclusion
from cotrain.protocol.note import (
    MAX_NOTE_BYTES,
    Checkpoint,
    NoteError,
    Signature,
    add_signature,
    format_checkpoint,
    key_id,
    parse_checkpoint,
    parse_note,
    parse_verifier_key,
    sign_note,
    verifier_key,
    verify_note,
)

EM = "\u2014"

# golang.org/x/mod/sumdb/note's tests: Peter's signer key (0x01 || Ed25519 seed), verifier keys,
# and the signatures Go produces over GO_TEXT.
PETER_SEED = base64.b64decode("AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz")[1:]
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    f"{EM} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqf"
    "qdngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    f"{EM} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwn"
    "WLox33WWd1RvMc+QQ=\n"
)
# The example.com/foo note other signed-note implementations test against.
FOO_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
FOO_NOTE = (
    f"This is an example message.\n\n{EM} example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfX"
    "ppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
)


def identity(seed: int) -> Identity:
    """A fixed key per seed, so every run signs the same bytes."""
    return Identity(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"%d" % seed).digest()))


LOG, WITNESS, STRANGER = identity(1), identity(2), identity(3)
TEXT = "example.com/log\n3\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"


def test_public_names_are_pinned() -> None:
    assert sorted(note_module.__all__) == sorted(
        [
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
    )
    assert issubclass(NoteError, ValueError)


def test_go_reference_vectors() -> None:
    peter = Identity(Ed25519PrivateKey.from_private_bytes(PETER_SEED))
    assert key_id("PeterNeumann", peter.public_bytes) == bytes.fromhex("c74f20a3")
    assert verifier_key("PeterNeumann", peter.public_bytes) == PETER_VKEY
    vk = parse_verifier_key(PETER_VKEY)
    assert (vk.name, vk.key_id, vk.public_key) == (
        "PeterNeumann",
        bytes.fromhex("c74f20a3"),
        peter.public_bytes,
    )
    # Ed25519 is deterministic: the same key signs the same text into Go's exact bytes.
    assert sign_note(GO_TEXT, "PeterNeumann", peter) == GO_TEXT + "\n" + PETER_SIG

    both = GO_TEXT + "\n" + PETER_SIG + ENOCH_SIG
    n = verify_note(both, [PETER_VKEY, ENOCH_VKEY])
    assert n.text == GO_TEXT
    assert n.verified == ["PeterNeumann", "EnochRoot"]
    assert n.signatures[1] == Signature(
        name="EnochRoot",
        key_id=bytes.fromhex("af0cfe78"),
        sig=base64.b64decode(ENOCH_SIG.split()[-1])[4:],
    )
    assert verify_note(both, [PETER_VKEY]).verified == ["PeterNeumann"]  # Enoch's is ignored
    assert verify_note(FOO_NOTE, [FOO_VKEY]).verified == ["example.com/foo"]


def test_sign_parse_verify_round_trip() -> None:
    signed = sign_note(TEXT, "example.com/log", LOG)
    assert signed.startswith(TEXT + "\n" + EM + " example.com/log ")
    assert signed.endswith("\n")
    parsed = parse_note(signed)
    assert parsed.text == TEXT
    assert parsed.verified == []
    [sig] = parsed.signatures
    assert sig.key_id == key_id("example.com/log", LOG.public_bytes)
    assert len(sig.sig) == 64
    by_map = verify_note(signed, {"example.com/log": LOG.public_bytes})
    by_vkey = verify_note(signed.encode(), [verifier_key("example.com/log", LOG.public_bytes)])
    assert by_map == by_vkey
    assert by_map.verified == ["example.com/log"]


def test_key_id_is_the_specified_hash() -> None:
    pub = LOG.public_bytes
    want = hashlib.sha256(b"example.com/log" + b"\x0a" + b"\x01" + pub).digest()[:4]
    assert key_id("example.com/log", pub) == want
    assert key_id("example.com/other", pub) != want
    vkey = verifier_key("example.com/log", pub)
    assert vkey == "example.com/log+" + want.hex() + "+" + base64.b64encode(b"\x01" + pub).decode()


def test_witness_co_signature() -> None:
    signed = sign_note(TEXT, "example.com/log", LOG)
    cosigned = add_signature(signed, "witness.example/w1", WITNESS)
    assert cosigned.startswith(signed)  # appended, the log's signature untouched
    keys = {"example.com/log": LOG.public_bytes, "witness.example/w1": WITNESS.public_bytes}
    assert verify_note(cosigned, keys).verified == ["example.com/log", "witness.example/w1"]
    assert verify_note(cosigned, {"witness.example/w1": WITNESS.public_bytes}).verified == [
        "witness.example/w1"
    ]
    # signing again with the same key replaces the signature instead of repeating it
    again = add_signature(cosigned, "witness.example/w1", WITNESS)
    assert len(parse_note(again).signatures) == 2
    assert verify_note(again, keys).verified == ["example.com/log", "witness.example/w1"]


def test_tampered_text_or_signature_is_refused() -> None:
    signed = sign_note(TEXT, "example.com/log", LOG)
    keys = {"example.com/log": LOG.public_bytes}
    with pytest.raises(NoteError, match=r"bad signature by known key example\.com/log"):
        verify_note(signed.replace("\n3\n", "\n4\n"), keys)
    sig = parse_note(signed).signatures[0]
    forged = sig.key_id + bytes([sig.sig[0] ^ 1]) + sig.sig[1:]
    line = f"{EM} example.com/log {base64.b64encode(forged).decode()}\n"
    with pytest.raises(NoteError, match="bad signature"):
        verify_note(TEXT + "\n" + line, keys)
    # a bad signature from a known key sinks the note even if another known key signed it
    cosigned = add_signature(TEXT + "\n" + line, "witness.example/w1", WITNESS)
    with pytest.raises(NoteError, match="bad signature"):
        verify_note(cosigned, {**keys, "witness.example/w1": WITNESS.public_bytes})
    # a signature too short for Ed25519 from a known key is a bad signature too
    short = f"{EM} example.com/log {base64.b64encode(sig.key_id + b'x').decode()}\n"
    with pytest.raises(NoteError, match="bad signature"):
        verify_note(TEXT + "\n" + short, keys)


def test_unknown_keys_are_ignored() -> None:
    signed = add_signature(sign_note(TEXT, "example.com/log", LOG), "stranger.example", STRANGER)
    assert verify_note(signed, {"example.com/log": LOG.public_bytes}).verified == [
        "example.com/log"
    ]
    # same name, another key: another key ID, so an unknown key, not a bad signature
    impostor = sign_note(TEXT, "example.com/log", STRANGER)
    with pytest.raises(NoteError, match="no signature by a known key"):
        verify_note(impostor, {"example.com/log": LOG.public_bytes})
    with pytest.raises(NoteError, match="no signature by a known key"):
        verify_note(signed, {})


def test_verifier_keys_are_checked() -> None:
    good = verifier_key("example.com/log", LOG.public_bytes)
    name, kid, b64 = good.split("+", 2)
    other = base64.b64encode(b"\x01" + WITNESS.public_bytes).decode()
    for bad in (
        "",
        name,
        f"{name}+{kid}",
        f"{name}+{kid}+",
        f"{name}+z{kid[1:]}+{b64}",
        f"{name}+{kid[:6]}+{b64}",
        f"{name}+{kid}+{other}",  # the ID of another key
        f"{name}+{kid}+{b64[:-4]}",
        f"{name}+{kid}+" + base64.b64encode(b"\x02" + LOG.public_bytes).decode(),
        f"bad name+{kid}+{b64}",
    ):
        with pytest.raises(NoteError):
            parse_verifier_key(bad)
    for bad_name in ("", "a b", "a+b", "tab\tname"):
        with pytest.raises(NoteError):
            verifier_key(bad_name, LOG.public_bytes)
    with pytest.raises(NoteError):
        verifier_key("example.com/log", LOG.public_bytes[:31])
    with pytest.raises(TypeError):
        verify_note(sign_note(TEXT, "example.com/log", LOG), good)  # one string, not a list
    with pytest.raises(NoteError, match="32 bytes"):
        verify_note(sign_note(TEXT, "example.com/log", LOG), {"example.com/log": b"short"})


def _line(name: str, raw: bytes) -> str:
    return f"{EM} {name} {base64.b64encode(raw).decode()}\n"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("", "no blank line"),
        ("\n", "no blank line"),
        (TEXT + _line("a", b"12345"), "no blank line"),
        (TEXT + "\n", "no signatures"),
        (TEXT + "\n" + _line("a", b"12345")[:-1], "does not end with a newline"),
        (TEXT + "\n" + _line("a", b"12345") + "\n", "no signatures"),
        (TEXT + "\n" + "- a " + base64.b64encode(b"12345").decode() + "\n", "em dash"),
        (TEXT + "\n" + f"{EM}a MTIzNDU=\n", "em dash"),
        (TEXT + "\n" + f"{EM} a MTIzNDU\n", "not base64"),
        (TEXT + "\n" + f"{EM} a MTIz*DU=\n", "not base64"),
        (TEXT + "\n" + f"{EM} a MTIzNDV=\n", "not canonical"),
        (TEXT + "\n" + f"{EM} a MTIz NDU=\n", "not base64"),
        (TEXT + "\n" + f"{EM} a \n", "too short"),
        (TEXT + "\n" + _line("a", b"1234"), "too short"),
        (TEXT + "\n" + _line("a+b", b"12345"), "invalid key name"),
        (TEXT + "\n" + _line("", b"12345"), "invalid key name"),
        (TEXT + "\n" + f"{EM} a\u00a0b MTIzNDU=\n", "invalid key name"),
        ("a\rb\n\n" + _line("a", b"12345"), "control characters"),
        ("a\tb\n\n" + _line("a", b"12345"), "control characters"),
        (TEXT + "\n" + _line("a", b"12345") * 101, "at most 100"),
        ("x" * MAX_NOTE_BYTES + "\n\n" + _line("a", b"12345"), "over"),
        ("\u00e9" * (MAX_NOTE_BYTES // 2) + "\n\n" + _line("a", b"12345"), "over"),
        (b"\xff\n\n" + _line("a", b"12345").encode(), "UTF-8"),
        ("\ud800\n\n" + _line("a", b"12345"), "UTF-8"),
    ],
)
def test_malformed_notes_are_refused(raw: str | bytes, why: str) -> None:
    with pytest.raises(NoteError, match=why):
        parse_note(raw)
    with pytest.raises(NoteError):
        verify_note(raw, {"a": LOG.public_bytes})


def test_the_signatures_follow_the_last_blank_line() -> None:
    text = "first paragraph\n\nsecond paragraph\n\n"  # text may hold (and end in) blank lines
    signed = sign_note(text, "example.com/log", LOG)
    assert verify_note(signed, {"example.com/log": LOG.public_bytes}).text == text
    assert parse_note("\n\n" + _line("a", b"12345")).text == "\n"
    sixteen = TEXT + "\n" + _line("a", b"12345") * 16  # the spec's minimum to accept
    assert len(parse_note(sixteen).signatures) == 16


@pytest.mark.parametrize("text", ["", "no newline", "a\x00b\n", "a\rb\n"])
def test_signing_refuses_malformed_text(text: str) -> None:
    with pytest.raises(NoteError):
        sign_note(text, "example.com/log", LOG)


@pytest.mark.parametrize("name", ["", "a b", "a+b", "a\nb", "a\u2003b"])
def test_signing_refuses_malformed_names(name: str) -> None:
    with pytest.raises(NoteError):
        sign_note(TEXT, name, LOG)
    with pytest.raises(NoteError):
        add_signature(sign_note(TEXT, "example.com/log", LOG), name, WITNESS)


def test_checkpoint_round_trip() -> None:
    root = hashlib.sha256(b"root").digest()
    for cp in (
        Checkpoint(origin="example.com/log", size=0, root=root),
        Checkpoint(origin="example.com/log", size=20852163, root=root),
        Checkpoint(origin="log with spaces inside", size=2**64 - 1, root=root, extensions=["x y"]),
        Checkpoint(origin="example.com/log", size=7, root=root, extensions=["a", "b+c"]),
    ):
        text = format_checkpoint(cp)
        assert parse_checkpoint(text) == cp
        assert text.split("\n")[:3] == [cp.origin, str(cp.size), base64.b64encode(root).decode()]
    spec_example = (
        "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    )
    cp = parse_checkpoint(spec_example)
    assert (cp.origin, cp.size, cp.extensions) == ("example.com/behind-the-sofa", 20852163, [])
    assert format_checkpoint(cp) == spec_example


ROOT_B64 = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    "text",
    [
        "",
        f"o\n1\n{ROOT_B64}",  # no final newline
        "o\n1\n",  # no root
        f"\n1\n{ROOT_B64}\n",  # empty origin
        f" o\n1\n{ROOT_B64}\n",
        f"o \n1\n{ROOT_B64}\n",
        f"o\n01\n{ROOT_B64}\n",  # leading zero
        f"o\n00\n{ROOT_B64}\n",
        f"o\n+1\n{ROOT_B64}\n",
        f"o\n-1\n{ROOT_B64}\n",
        f"o\n 1\n{ROOT_B64}\n",
        f"o\n1_0\n{ROOT_B64}\n",
        f"o\n\u0663\n{ROOT_B64}\n",  # an Arabic-Indic three
        f"o\n{2**64}\n{ROOT_B64}\n",
        f"o\n{'9' * 5000}\n{ROOT_B64}\n",
        f"o\n\n{ROOT_B64}\n",
        "o\n1\n" + base64.b64encode(bytes(31)).decode() + "\n",
        "o\n1\n" + base64.b64encode(bytes(33)).decode() + "\n",
        "o\n1\n" + ROOT_B64[:-1] + "\n",
        "o\n1\n" + ROOT_B64[:-2] + "B=\n",  # non-canonical trailing bits
        f"o\n1\n{ROOT_B64}\n\n",  # an empty extension line
        f"o\n1\n{ROOT_B64}\next\n\n",
        f"o\n1\n{ROOT_B64}\na\rb\n",
    ],
)
def test_malformed_checkpoints_are_refused(text: str) -> None:
    with pytest.raises(NoteError):
        parse_checkpoint(text)


@pytest.mark.parametrize(
    "cp",
    [
        Checkpoint(origin="", size=1, root=bytes(32)),
        Checkpoint(origin=" o", size=1, root=bytes(32)),
        Checkpoint(origin="a\nb", size=1, root=bytes(32)),
        Checkpoint(origin="o", size=-1, root=bytes(32)),
        Checkpoint(origin="o", size=True, root=bytes(32)),
        Checkpoint(origin="o", size=1, root=bytes(31)),
        Checkpoint(origin="o", size=1, root=bytes(32), extensions=[""]),
        Checkpoint(origin="o", size=1, root=bytes(32), extensions=["a\nb"]),
        Checkpoint(origin="o\x00", size=1, root=bytes(32)),
    ],
)
def test_checkpoints_that_cannot_be_written(cp: Checkpoint) -> None:
    with pytest.raises(NoteError):
        format_checkpoint(cp)


def test_a_witness_checks_a_log_end_to_end() -> None:
    """A log signs checkpoints of its tree; a witness verifies, checks consistency, co-signs."""
    tree = MemoryTree([leaf_hash(b"entry %d" % i) for i in range(5)])
    log_keys = {"example.com/log": LOG.public_bytes}

    def publish() -> str:
        cp = Checkpoint(origin="example.com/log", size=tree.size, root=tree.root())
        return sign_note(format_checkpoint(cp), "example.com/log", LOG)

    old = parse_checkpoint(verify_note(publish(), log_keys).text)
    for i in range(5, 12):
        tree.append(leaf_hash(b"entry %d" % i))
    signed = publish()
    new = parse_checkpoint(verify_note(signed, log_keys).text)
    verify_consistency(
        old.size, new.size, old.root, new.root, tree.consistency_proof(old.size, new.size)
    )
    verify_inclusion(leaf_hash(b"entry 7"), 7, new.size, tree.inclusion_proof(7), new.root)
    cosigned = add_signature(signed, "witness.example/w1", WITNESS)
    both = {**log_keys, "witness.example/w1": WITNESS.public_bytes}
    assert verify_note(cosigned, both).verified == ["example.com/log", "witness.example/w1"]
