"""The signed envelope and the hostile-JSON parser every network input goes through."""

from __future__ import annotations

import json

import pytest

from cotrain.core import jsonsafe
from cotrain.core.identity import Identity
from cotrain.core.signed import Envelope, EnvelopeError

DOMAIN = "cotrain.test/1"


def test_envelope_round_trips_and_is_canonical() -> None:
    ident = Identity.generate()
    env = Envelope.seal(ident, DOMAIN, {"b": 1, "a": [1, 2, "x"], "c": {"z": 0.5, "y": None}})
    raw = env.to_bytes()
    # RFC 8785: keys sorted, no whitespace
    assert raw.startswith(b'{"body":{"a":[1,2,"x"],"b":1,"c":{"y":null,"z":0.5}}')
    back = Envelope.from_bytes(raw, domain=DOMAIN, signers={ident.public_hex})
    assert back == env
    # re-serialising the body differently (whitespace, key order) does not matter
    obj = json.loads(raw)
    obj["body"] = json.loads(json.dumps(obj["body"], indent=3, sort_keys=False))
    Envelope.from_json(obj, domain=DOMAIN)


def test_envelope_refuses_tampering_other_domains_and_foreign_signers() -> None:
    ident, other = Identity.generate(), Identity.generate()
    env = Envelope.seal(ident, DOMAIN, {"version": 3})
    obj = env.to_json()
    with pytest.raises(EnvelopeError, match="forged"):
        Envelope.from_json({**obj, "body": {"version": 4}}, domain=DOMAIN)
    with pytest.raises(EnvelopeError, match="expected"):
        Envelope.from_json(obj, domain="cotrain.other/1")
    with pytest.raises(EnvelopeError, match="do not accept"):
        Envelope.from_json(obj, domain=DOMAIN, signers={other.public_hex})
    # a signature moved onto another key's name
    with pytest.raises(EnvelopeError, match="forged"):
        Envelope.from_json({**obj, "signer": other.public_hex}, domain=DOMAIN)
    # the domain is inside the signed bytes: same body, same key, other domain -> other signature
    assert Envelope.seal(ident, "cotrain.other/1", {"version": 3}).signature != env.signature


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50 + b"1" + b"}" * 50,
        b'{"n": ' + b"9" * 5000 + b"}",
        b'{"n": Infinity}',
        b'{"n": NaN}',
        b'{"n": 1e999}',
        b'{"n": -1e999}',
        b"",
        b"{",
        b'"just a string"',
        b"[]",
        b'{"domain": 1, "signer": [], "body": "x", "signature": null}',
        b'{"domain": "cotrain.test/1", "signer": "' + b"0" * 64 + b'", "body": {}, '
        b'"signature": "' + b"0" * 128 + b'"}',
    ],
)
def test_hostile_bytes_give_one_typed_error(raw: bytes) -> None:
    with pytest.raises(EnvelopeError):
        Envelope.from_bytes(raw, domain=DOMAIN)


def test_jsonsafe_bounds() -> None:
    assert jsonsafe.loads(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}
    with pytest.raises(jsonsafe.MalformedJSON, match="exceeds"):
        jsonsafe.loads(b"[1]" + b" " * 100, max_bytes=10)
    with pytest.raises(jsonsafe.MalformedJSON, match="deeper"):
        jsonsafe.loads(b"[[[[1]]]]", max_depth=3)
    with pytest.raises(jsonsafe.MalformedJSON, match="object"):
        jsonsafe.loads_object(b"[1]")
    with pytest.raises(EnvelopeError, match="canonical"):
        Envelope.seal(Identity.generate(), DOMAIN, {"too_big": 2**60})
