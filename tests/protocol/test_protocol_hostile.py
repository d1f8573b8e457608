"""Hostile input: more than 10^4 bad requests against a live coordinator, many at a time.

Every one must get a 4xx with a JSON ``error`` (never a 500, never a hang), and afterwards the
ledger and the published state must be as they were. The requests are made from real signed
ones (``auth``) and then broken: malformed, oversized and non-canonical bodies, missing and
malformed headers, bad signatures, another key, replayed nonces, clocks far off (the answer
says by how much), unknown paths and methods, wrong fields and types, huge integers, deep
nesting, random bytes in headers (over a raw socket), tasks that do not exist, bad query
arguments, writes by keys without the role.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from protocol_harness import config, running

from cotrain.core.identity import Identity
from cotrain.core.signed import canonical
from cotrain.protocol import auth
from cotrain.protocol.client import Client
from cotrain.protocol.errors import RateLimited

N_REQUESTS = 10_000
WINDOW_S = 600.0
"""Wide enough that requests signed before the whole fuzz are still inside it at its end."""
QUIET = {
    "window_s": WINDOW_S,
    "rate_per_key": 1e9,  # the fuzz sends thousands a second from a few keys: no 429s here
    "burst_per_key": 1e9,
    "unhealthy_after_s": 3600.0,
    "dead_after_s": 7200.0,
}
CLOCK = re.compile(r"request time is ([+-]\d+\.\d) s from the coordinator's clock")


@dataclass
class Bad:
    """One bad request and what its answer must be."""

    kind: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""
    status: frozenset[int] | None = None
    """The statuses allowed (None: any 4xx)."""
    message: str | None = None
    """A piece of the error message."""
    ts_ms: int | None = None
    """For a clock that is off: the signed time (the answer must say the skew)."""
    raw_headers: bytes | None = None
    """Send over a raw socket with these header lines (bytes aiohttp would not send)."""


@dataclass
class World:
    url: str
    init: Identity
    node: Identity
    val: Identity
    witness: Identity
    stranger: Identity
    """Never registered."""
    task: str
    work: str
    """A work key in the task, not judged."""
    setup: list[auth.SignedRequest]
    """The writes that made this world (replaying any of them must be refused)."""


class Maker:
    """Signs and breaks requests, from one seeded random source."""

    def __init__(self, w: World, seed: int) -> None:
        self.w = w
        self.rng = random.Random(seed)

    def nonce(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def sign_raw(
        self,
        who: Identity,
        method: str,
        path: str,
        raw: bytes,
        *,
        ts_ms: int | None = None,
        nonce: str | None = None,
    ) -> dict[str, str]:
        ts = int(time.time() * 1000) if ts_ms is None else ts_ms
        n = nonce or self.nonce()
        digest = hashlib.sha256(raw).hexdigest()
        sig = who.sign(auth.statement(method, path, digest, ts, n)).hex()
        return {
            auth.H_KEY: who.public_hex,
            auth.H_TIME: str(ts),
            auth.H_NONCE: n,
            auth.H_SIG: sig,
            "Content-Type": "application/json",
        }

    def signed(
        self, who: Identity, path: str, body: dict[str, Any], **kw: Any
    ) -> tuple[dict[str, str], bytes]:
        raw = canonical(body)
        return self.sign_raw(who, "POST", path, raw, **kw), raw

    # ---- what a good request looks like -------------------------------------------------------

    def good(self) -> tuple[Identity, str, dict[str, Any]]:
        """A well-formed write (whether the state would take it or not does not matter here,
        the breakage comes before)."""
        w, t = self.w, self.w.task
        return self.rng.choice(
            [
                (w.node, "/v1/identities", {"name": "n", "roles": ["node"]}),
                (
                    w.init,
                    "/v1/tasks",
                    {"name": "x", "kind": "rl", "budget": 10, "rate_per_unit": 1},
                ),
                (w.init, f"/v1/tasks/{t}/invites", {"ttl_s": 60}),
                (w.node, f"/v1/tasks/{t}/work", self.work_body()),
                (w.val, f"/v1/tasks/{t}/verdicts", {"verdict": "accept", "work_key": w.work}),
                (w.node, "/v1/claims", {"amount": 1}),
                (w.init, f"/v1/tasks/{t}/pause", {}),
            ]
        )

    def work_body(self) -> dict[str, Any]:
        key = f"{self.rng.getrandbits(256):064x}"
        return {"kind": "units", "units": 1, "work_key": key}

    # ---- the categories ---------------------------------------------------------------------

    def malformed_json(self) -> Bad:
        who, path, body = self.good()
        good = canonical(body)
        raw = self.rng.choice(
            [
                good[: self.rng.randint(0, len(good) - 1)],
                good + b"}",
                good + b" x",
                b"",
                b"{",
                b'{"a":}',
                b'{"a":NaN}',
                b'{"a":Infinity}',
                b'{"a":-Infinity}',
                b"\xff\xfe{}",
                b'{"a":"\xc3\x28"}',
                bytes(self.rng.getrandbits(8) for _ in range(self.rng.randint(1, 64))),
                b"nul\x00l",
                b"[1,2,",
                b'{"a":1,}',
                b"{'a':1}",
            ]
        )
        return Bad("malformed", "POST", path, self.sign_raw(who, "POST", path, raw), raw, _400)

    def oversized(self) -> Bad:
        who, path, _ = self.good()
        size = self.rng.randint(64 * 1024 + 1, 160 * 1024)
        raw = b'{"name":"' + b"x" * size + b'"}'
        headers = (
            self.sign_raw(who, "POST", path, raw) if self.rng.random() < 0.5 else _plain_json()
        )
        return Bad("oversized", "POST", path, headers, raw, frozenset({413}), "64 KB limit")

    def non_canonical(self) -> Bad:
        who, path, body = self.good()
        if not body:
            body = {"a": 1}
        good = canonical(body)
        for _ in range(20):
            style = self.rng.randrange(7)
            if style == 0:
                raw = json.dumps(body).encode()  # ", " and ": "
            elif style == 1:
                raw = json.dumps(body, indent=self.rng.randint(0, 3)).encode()
            elif style == 2:
                items = list(body.items())[::-1]
                raw = (
                    "{"
                    + ",".join(
                        f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in items
                    )
                    + "}"
                ).encode()
            elif style == 3:  # the first letter of the first key as a \\u escape
                raw = b'{"\\u%04x' % good[2] + good[3:]
            elif style == 4:
                raw = good + self.rng.choice([b" ", b"\n", b"\t", b"\r\n"])
            elif style == 5:
                k = next(iter(body))
                raw = b"{" + json.dumps(k).encode() + b":0," + good[1:]  # a key twice
            else:
                raw = re.sub(rb":(\d+)", rb":\1.0", good, count=1)  # 1 as 1.0
                if raw == good:
                    raw = b" " + good
            if raw != good:
                break
        return Bad(
            "non-canonical",
            "POST",
            path,
            self.sign_raw(who, "POST", path, raw),
            raw,
            _400,
            "canonical JSON",
        )

    def unsigned(self) -> Bad:
        who, path, body = self.good()
        headers, raw = self.signed(who, path, body)
        names = [auth.H_KEY, auth.H_TIME, auth.H_NONCE, auth.H_SIG]
        for name in self.rng.sample(names, self.rng.randint(1, 4)):
            del headers[name]
        return Bad("unsigned", "POST", path, headers, raw, _401, "unsigned request")

    def bad_header(self) -> Bad:
        who, path, body = self.good()
        headers, raw = self.signed(who, path, body)
        name, junk, msg = self.rng.choice(
            [
                (auth.H_KEY, headers[auth.H_KEY].upper(), "64 lowercase hex"),
                (auth.H_KEY, headers[auth.H_KEY][:-1], "64 lowercase hex"),
                (auth.H_KEY, "z" * 64, "64 lowercase hex"),
                (auth.H_TIME, "-5", "unix milliseconds"),
                (auth.H_TIME, "1e12", "unix milliseconds"),
                (auth.H_TIME, "9" * 16, "unix milliseconds"),
                (auth.H_TIME, "", "unix milliseconds"),
                (auth.H_NONCE, headers[auth.H_NONCE] + "0", "32 lowercase hex"),
                (auth.H_NONCE, "g" * 32, "32 lowercase hex"),
                (auth.H_SIG, headers[auth.H_SIG][:-2], "128 lowercase hex"),
                (auth.H_SIG, headers[auth.H_SIG].upper(), "128 lowercase hex"),
            ]
        )
        headers[name] = junk
        return Bad("bad-header", "POST", path, headers, raw, _401, msg)

    def bad_signature(self) -> Bad:
        who, path, body = self.good()
        headers, raw = self.signed(who, path, body)
        how = self.rng.randrange(4)
        if how == 0:  # one hex digit changed
            sig = headers[auth.H_SIG]
            i = self.rng.randrange(len(sig))
            headers[auth.H_SIG] = sig[:i] + ("0" if sig[i] != "0" else "1") + sig[i + 1 :]
        elif how == 1:  # a signature over another path
            elsewhere = "/v1/identities" if path == "/v1/claims" else "/v1/claims"
            other = self.sign_raw(who, "POST", elsewhere, raw, nonce=headers[auth.H_NONCE])
            headers[auth.H_SIG] = other[auth.H_SIG]
        elif how == 2:  # the body changed after signing
            raw = canonical({**body, "zz": 1})
        else:  # the time changed after signing
            headers[auth.H_TIME] = str(int(headers[auth.H_TIME]) + 1)
        return Bad("bad-signature", "POST", path, headers, raw, _401, "bad signature")

    def wrong_key(self) -> Bad:
        who, path, body = self.good()
        headers, raw = self.signed(who, path, body)
        other = self.rng.choice([self.w.stranger, self.w.init, self.w.val, self.w.witness])
        if other.public_hex == headers[auth.H_KEY]:
            other = self.w.stranger
        headers[auth.H_KEY] = other.public_hex
        return Bad("wrong-key", "POST", path, headers, raw, _401, "bad signature")

    def clock_off(self) -> Bad:
        who, path, body = self.good()
        now = int(time.time() * 1000)
        off_ms = self.rng.choice(
            [
                int(WINDOW_S * 1000) + self.rng.randint(120_000, 10 * 86_400_000),
                -int(WINDOW_S * 1000) - self.rng.randint(120_000, 10 * 86_400_000),
                -now,  # 1970
            ]
        )
        ts = now + off_ms
        headers, raw = self.signed(who, path, body, ts_ms=ts)
        return Bad("clock", "POST", path, headers, raw, _401, "set this machine's clock", ts)

    def refused_by_rules(self) -> tuple[auth.SignedRequest, Bad]:
        """A well-signed write the state refuses (so it leaves a nonce and nothing else)."""
        w, t = self.w, self.w.task
        who, path, body, status = self.rng.choice(
            [
                (w.stranger, f"/v1/tasks/{t}/join", {}, 403),
                (w.node, f"/v1/tasks/{t}/open", {}, 403),
                (w.node, "/v1/claims", {"amount": 1 + self.rng.randrange(10**6)}, 409),
                (w.val, f"/v1/tasks/{t}/verdicts", {"work_key": "ab" * 32, "verdict": "drop"}, 404),
                (
                    w.stranger,
                    "/v1/tasks",
                    {"name": "s", "kind": "rl", "budget": 1, "rate_per_unit": 1},
                    403,
                ),
                (w.node, f"/v1/tasks/{t}/join", {}, 409),
            ]
        )
        req = auth.sign(who, "POST", path, body, nonce=self.nonce())
        return req, Bad(
            "refused", "POST", path, auth.headers(req), canonical(body), frozenset({status})
        )

    def unknown_path(self) -> Bad:
        w = self.w
        if self.rng.random() < 0.6:
            path = self.rng.choice(
                [
                    "/v1/nothing",
                    "/v2/tasks",
                    f"/v1/tasks/{w.task}/explode",
                    "/v1/tasks/x1/open",
                    "/v1/tasks/t/open",
                    f"/v1/tasks/t{'9' * 16}/open",
                    "/v1/genesis",
                    f"/v1/tasks/{w.task}/members/{w.node.public_hex}",
                    "/v1/identities/extra",
                    "/" + "a" * self.rng.randint(1, 2000),
                    "/v1/state",
                    "/",
                ]
            )
            headers, raw = self.signed(w.init, path, {})
            return Bad("unknown-path", "POST", path, headers, raw, _404, "no write")
        method = self.rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
        path = self.rng.choice(
            # "/" is the dashboard (GET); /ui/ serves only its three files
            ["/v1/nothing", "/ui/coord.pem", "/v1/claims", "/v1/tasks/t1/verdicts", "/x" * 50]
        )
        return Bad("unknown-path", method, path, {}, b"", frozenset({404, 405}))

    def wrong_fields(self) -> Bad:
        w, t = self.w, self.w.task
        who, path, body, types = self.rng.choice(
            [
                (
                    w.node,
                    "/v1/identities",
                    {"name": "n", "roles": ["node"], "specs": {}},
                    _REGISTER,
                ),
                (
                    w.init,
                    "/v1/tasks",
                    {"name": "x", "kind": "rl", "budget": 10, "rate_per_unit": 1},
                    _PUBLISH,
                ),
                (w.init, f"/v1/tasks/{t}/invites", {"ttl_s": 60}, {"node": "key?", "ttl_s": "int"}),
                (w.node, f"/v1/tasks/{t}/join", {}, {"invite": "hex32?"}),
                (w.node, f"/v1/tasks/{t}/work", self.work_body(), _WORK),
                (
                    w.val,
                    f"/v1/tasks/{t}/verdicts",
                    {"verdict": "accept", "work_key": w.work},
                    _VERDICT,
                ),
                (w.node, "/v1/claims", {"amount": 1}, {"amount": "int"}),
                (w.init, f"/v1/tasks/{t}/{self.rng.choice(['open', 'pause', 'cancel'])}", {}, {}),
                (w.node, f"/v1/tasks/{t}/heartbeat", {}, {}),
                (w.witness, "/v1/log/cosign", {"note": "x"}, {"note": "str"}),
            ]
        )
        body = dict(body)
        how = self.rng.randrange(3) if types else 0
        if how == 0:  # a field nobody knows
            body[self.rng.choice(["zz", "extra", "admin", "budget2", "__proto__"])] = 1
        elif how == 1:  # a field of the wrong type
            name = self.rng.choice(sorted(types))
            body[name] = self.rng.choice(_WRONG[types[name]])
        else:  # a value out of range, or a required field missing
            name = self.rng.choice(sorted(types))
            bad = _OUT_OF_RANGE.get(types[name])
            if bad is not None and self.rng.random() < 0.7:
                body[name] = self.rng.choice(bad)
            elif name in body and not types[name].endswith("?") and name not in _DEFAULTED:
                del body[name]
            else:
                body["zz"] = 1
        headers, raw = self.signed(who, path, body)
        return Bad("wrong-fields", "POST", path, headers, raw, _400)

    def huge_numbers(self) -> Bad:
        who = self.w.node
        path = "/v1/claims"
        digits = self.rng.choice(
            [
                str(2**53),
                str(-(2**53)),
                "1" + "0" * self.rng.randint(16, 39),
                "9" * self.rng.randint(41, 5000),
                "-" + "9" * self.rng.randint(41, 5000),
                "1e400",
                "-1e400",
                "1" + "0" * 400 + ".5",
            ]
        )
        raw = b'{"amount":' + digits.encode() + b"}"
        return Bad("huge-number", "POST", path, self.sign_raw(who, "POST", path, raw), raw, _400)

    def deep(self) -> Bad:
        who, path = self.w.node, f"/v1/tasks/{self.w.task}/work"
        depth = self.rng.choice([33, 40, 100, 1000, 20_000])
        opener, closer = self.rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        nested = opener * depth + b"1" + closer * depth
        raw = (
            b'{"kind":"units","meta":{"x":'
            + nested
            + b'},"units":1,"work_key":"'
            + b"ab" * 32
            + b'"}'
        )
        headers = self.sign_raw(who, "POST", path, raw)
        return Bad("deep", "POST", path, headers, raw, frozenset({400, 413}))

    def header_bytes(self) -> Bad:
        who, path, body = self.good()
        headers, raw = self.signed(who, path, body)
        name = self.rng.choice([auth.H_KEY, auth.H_TIME, auth.H_NONCE, auth.H_SIG])
        # bytes allowed in a field value (visible ASCII and obs-text), so the request reaches
        # the coordinator, which must refuse it itself
        alphabet = [*range(0x21, 0x7F), *range(0x80, 0x100)]
        junk = bytes(self.rng.choice(alphabet) for _ in range(self.rng.randint(1, 200)))
        lines = b"".join(
            (k.encode() + b": " + (junk if k == name else v.encode()) + b"\r\n")
            for k, v in headers.items()
        )
        return Bad("header-bytes", "POST", path, {}, raw, _401, None, None, lines)

    def no_such_task(self) -> Bad:
        w = self.w
        t = f"t{self.rng.randint(10**6, 10**14)}"
        if self.rng.random() < 0.25:
            sub = self.rng.choice(["", "/shares", "/work"])
            return Bad("no-task", "GET", f"/v1/tasks/{t}{sub}", {}, b"", _404, "no task")
        who, verb, body = self.rng.choice(
            [
                (w.init, "open", {}),
                (w.init, "pause", {}),
                (w.init, "finalize", {}),
                (w.init, "cancel", {}),
                (w.init, "invites", {}),
                (w.node, "join", {}),
                (w.node, "leave", {}),
                (w.node, "work", self.work_body()),
                (w.val, "verdicts", {"verdict": "accept", "work_key": w.work}),
            ]
        )
        path = f"/v1/tasks/{t}/{verb}"
        headers, raw = self.signed(who, path, body)
        return Bad("no-task", "POST", path, headers, raw, _404, f"no task {t}")

    def bad_query(self) -> Bad:
        t = self.w.task
        path, status = self.rng.choice(
            [
                ("/v1/log/entries?start=abc", 400),
                ("/v1/log/entries?start=-1", 400),
                (f"/v1/log/entries?start={'9' * 20}", 400),
                ("/v1/log/entries?start=0&end=x", 400),
                ("/v1/log/proof/inclusion?index=x&size=1", 400),
                ("/v1/log/proof/inclusion?index=-1&size=1", 400),
                ("/v1/log/proof/inclusion?index=5&size=2", 400),
                (f"/v1/log/proof/inclusion?index=0&size={10**12}", 404),
                ("/v1/log/proof/consistency?old=2&new=1", 400),
                ("/v1/log/proof/consistency?old=-3&new=1", 400),
                (f"/v1/log/proof/consistency?old=1&new={10**12}", 404),
                ("/v1/log/checkpoint?size=abc", 400),
                (f"/v1/log/checkpoint?size={10**12}", 404),
                ("/v1/log/checkpoints?after=1.5", 400),
                ("/v1/accounts/not-a-key", 400),
                ("/v1/accounts/" + "A" * 64, 400),
                ("/v1/identities/" + "0" * 64, 404),
                (f"/v1/tasks/{t}/work?node=bad", 400),
                (f"/v1/tasks/{t}/work?after=x", 400),
                (f"/v1/tasks/{t}/work?limit=1e3", 400),
            ]
        )
        return Bad("bad-query", "GET", path, {}, b"", frozenset({status}))

    def no_role(self) -> Bad:
        w, t = self.w, self.w.task
        who, path, body, status = self.rng.choice(
            [
                (
                    w.node,
                    "/v1/tasks",
                    {"name": "n", "kind": "rl", "budget": 1, "rate_per_unit": 1},
                    403,
                ),
                (w.node, f"/v1/tasks/{t}/finalize", {}, 403),
                (w.node, f"/v1/tasks/{t}/invites", {}, 403),
                (w.node, f"/v1/tasks/{t}/verdicts", {"verdict": "accept", "work_key": w.work}, 403),
                (
                    w.init,
                    f"/v1/tasks/{t}/verdicts",
                    {"verdict": "hard_reject", "work_key": w.work},
                    403,
                ),
                (w.init, f"/v1/tasks/{t}/work", self.work_body(), 403),
                (w.stranger, f"/v1/tasks/{t}/heartbeat", {}, 403),
                (w.val, f"/v1/tasks/{t}/leave", {}, 403),
                (w.node, "/v1/log/cosign", {"note": "x"}, 403),
            ]
        )
        headers, raw = self.signed(who, path, body)
        return Bad("no-role", "POST", path, headers, raw, frozenset({status}))


_400, _401, _404 = frozenset({400}), frozenset({401}), frozenset({404})
_REGISTER = {"name": "str", "roles": "list", "specs": "dict"}
_PUBLISH = {
    "name": "str",
    "kind": "enum",
    "budget": "int",
    "rate_per_unit": "int",
    "validator_fee": "int",
    "lock_s": "int",
    "admission": "enum",
    "validators": "list",
    "quorum": "int?",
    "weights": "dict",
    "max_units": "int",
    "spec": "dict",
}
_WORK = {"work_key": "key", "kind": "str", "units": "int", "step": "int", "meta": "dict"}
_VERDICT = {"work_key": "key", "verdict": "enum", "reason": "text", "evidence": "key?"}
_DEFAULTED = {"specs", "validator_fee", "lock_s", "admission", "validators", "weights"}
_DEFAULTED |= {"max_units", "spec", "step", "meta", "reason", "ttl_s"}
_WRONG: dict[str, list[Any]] = {
    "int": ["5", 1.5, True, None, [], {}],
    "int?": ["5", 1.5, True, [], {}],
    "str": [5, 1.5, True, None, [], {}],
    "text": [5, True, None, [], {}],
    "enum": [5, None, [], "nonsense", "ACCEPT"],
    "key": [5, None, "x" * 64, "AB" * 32, "ab" * 31],
    "key?": [5, "x" * 64, "AB" * 32],
    "hex32?": [5, "x" * 32, "ab" * 17],
    "list": ["x", 5, {}, None],
    "dict": ["x", 5, [], None],
}
_OUT_OF_RANGE: dict[str, list[Any]] = {
    "int": [-1, -(2**53) + 1],
    "int?": [0, -1, 65],
    "str": ["", " spaces at the ends ", "x" * 400],
    "text": ["x" * 301],
}


def _plain_json() -> dict[str, str]:
    return {"Content-Type": "application/json"}


# ---- sending ---------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes
    content_type: str
    t_before: float
    t_after: float


async def send(session: aiohttp.ClientSession, url: str, bad: Bad) -> Answer:
    t_before = time.time()
    if bad.raw_headers is not None:
        status, ctype, body = await _send_raw(url, bad)
    else:
        async with session.request(
            bad.method, url + bad.path, data=bad.body or None, headers=bad.headers
        ) as resp:
            status, ctype, body = (
                resp.status,
                resp.headers.get("Content-Type", ""),
                await resp.read(),
            )
    return Answer(status, body, ctype, t_before, time.time())


async def _send_raw(url: str, bad: Bad) -> tuple[int, str, bytes]:
    """An HTTP/1.1 request written by hand (aiohttp's client refuses bytes like these)."""
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        assert bad.raw_headers is not None
        writer.write(
            f"{bad.method} {bad.path} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: close\r\n"
            f"Content-Length: {len(bad.body)}\r\n".encode()
            + bad.raw_headers
            + b"\r\n"
            + bad.body
        )
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    ctype = next(
        (ln.split(":", 1)[1].strip() for ln in lines[1:] if ln.lower().startswith("content-type:")),
        "",
    )
    if any(ln.lower() == "transfer-encoding: chunked" for ln in lines[1:]):
        body = _unchunk(body)
    return status, ctype, body


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        n = int(size_line.split(b";")[0], 16)
        if n == 0:
            break
        out += rest[:n]
        data = rest[n + 2 :]
    return out


def check(bad: Bad, ans: Answer) -> str | None:
    """What is wrong with the answer to ``bad`` (None: it is right)."""
    where = f"{bad.kind} {bad.method} {bad.path[:60]}"
    if not 400 <= ans.status < 500:
        return f"{where}: status {ans.status}: {ans.body[:200]!r}"
    if bad.status is not None and ans.status not in bad.status:
        return f"{where}: status {ans.status}, expected {sorted(bad.status)}: {ans.body[:200]!r}"
    if bad.method == "HEAD":
        return None  # a HEAD answer has no body
    if not ans.content_type.startswith("application/json"):
        return f"{where}: content type {ans.content_type!r}: {ans.body[:200]!r}"
    try:
        obj = json.loads(ans.body)
    except ValueError:
        return f"{where}: not JSON: {ans.body[:200]!r}"
    if not isinstance(obj, dict) or not isinstance(obj.get("error"), str) or not obj["error"]:
        return f"{where}: no error message: {obj!r}"
    if bad.message is not None and bad.message not in obj["error"]:
        return f"{where}: {obj['error']!r} does not say {bad.message!r}"
    if bad.ts_ms is not None:
        m = CLOCK.search(obj["error"])
        if m is None:
            return f"{where}: {obj['error']!r} does not say how far off the clock is"
        skew = float(m.group(1))
        lo = (bad.ts_ms / 1000 - ans.t_after) - 0.1
        hi = (bad.ts_ms / 1000 - ans.t_before) + 0.1
        if not lo <= skew <= hi:
            return f"{where}: says the clock is off by {skew} s, it is off by {lo:.1f}..{hi:.1f}"
    return None


async def blast(url: str, bads: list[Bad], *, concurrency: int = 64) -> list[str]:
    """Send all of ``bads``, ``concurrency`` at a time; the problems found."""
    sem = asyncio.Semaphore(concurrency)
    problems: list[str] = []
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(bad: Bad) -> None:
            async with sem:
                try:
                    ans = await send(session, url, bad)
                except (aiohttp.ClientError, TimeoutError, OSError) as e:
                    problems.append(f"{bad.kind} {bad.method} {bad.path[:60]}: {e!r}")
                    return
            problem = check(bad, ans)
            if problem is not None:
                problems.append(problem)

        await asyncio.gather(*(one(b) for b in bads))
    return problems


# ---- the world and the test -----------------------------------------------------------------


async def make_world(url: str) -> World:
    ids = {name: Identity.generate() for name in ("init", "node", "val", "witness", "stranger")}
    setup: list[auth.SignedRequest] = []
    async with Client(url) as c:

        async def write(who: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
            req = auth.sign(ids[who], "POST", path, body)
            setup.append(req)
            return await c.send(req)

        for name, role in (("init", "initiator"), ("node", "node"), ("val", "validator")):
            await write(name, "/v1/identities", {"roles": [role], "name": name})
        await write("witness", "/v1/identities", {"roles": ["witness"], "name": "witness"})
        publish = {
            "name": "fuzzed",
            "kind": "rl",
            "budget": 1000,
            "rate_per_unit": 1,
            "admission": "open",
            "validators": [ids["val"].public_hex],
            "weights": {"units": 1},
        }
        t = (await write("init", "/v1/tasks", publish))["task"]
        await write("init", f"/v1/tasks/{t}/open", {})
        await write("node", f"/v1/tasks/{t}/join", {})
        work = "cd" * 32
        await write("node", f"/v1/tasks/{t}/work", {"work_key": work, "kind": "units", "units": 3})
        await write("node", f"/v1/tasks/{t}/heartbeat", {})
        deadline = time.monotonic() + 30
        while (await c.get(f"/v1/tasks/{t}"))["members"][0]["status"] != "healthy":
            assert time.monotonic() < deadline, "the node never became healthy"
            await asyncio.sleep(0.02)
    return World(
        url, ids["init"], ids["node"], ids["val"], ids["witness"], ids["stranger"], t, work, setup
    )


PLAN: list[tuple[str, int]] = [  # category -> how many
    ("malformed_json", 1000),
    ("oversized", 40),
    ("non_canonical", 1000),
    ("unsigned", 600),
    ("bad_header", 800),
    ("bad_signature", 1000),
    ("wrong_key", 600),
    ("clock_off", 800),
    ("unknown_path", 800),
    ("wrong_fields", 1500),
    ("huge_numbers", 500),
    ("deep", 300),
    ("header_bytes", 400),
    ("no_such_task", 600),
    ("bad_query", 400),
    ("no_role", 400),
]
REPLAYS = 400


async def snapshot(url: str) -> tuple[dict[str, Any], bytes]:
    async with Client(url) as c:
        state = await c.get("/v1/state")
        return state, b"".join(await c.entries(0, state["size"]))


@pytest.mark.timeout(300)
def test_ten_thousand_bad_requests_change_nothing(
    tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    asyncio.run(_fuzz(tmp_path, db_url))
    crashes = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not crashes, [r.getMessage() for r in crashes[:5]]


async def _fuzz(tmp_path: Path, db_url: str) -> None:
    async with running(config(tmp_path, db_url, **QUIET)) as (url, coord):
        w = await make_world(url)
        before = await snapshot(url)
        mk = Maker(w, seed=1729)
        bads: list[Bad] = []
        for name, n in PLAN:
            make: Callable[[], Bad] = getattr(mk, name)
            bads.extend(make() for _ in range(n))
        firsts = [mk.refused_by_rules() for _ in range(REPLAYS)]
        bads.extend(b for _, b in firsts)
        mk.rng.shuffle(bads)
        # the second time, each of those (and each write that built the world) is a replay
        replays = [
            Bad("replay", "POST", r.path, auth.headers(r), canonical(r.body), _401, "replayed")
            for r in [*(r for r, _ in firsts), *w.setup]
        ]
        total = len(bads) + len(replays)
        assert total >= N_REQUESTS
        t0 = time.monotonic()
        problems = await blast(url, bads)
        problems += await blast(url, replays)
        elapsed = time.monotonic() - t0
        kinds = sorted({p.split(":")[0] for p in problems})
        assert not problems, f"{len(problems)} of {total} wrong ({kinds}), e.g.:\n" + "\n".join(
            problems[:15]
        )
        after = await snapshot(url)
        assert after[0] == before[0]  # the published state
        assert after[1] == before[1]  # the ledger, byte for byte
        assert coord.failed_commits == 0
        print(f"{total} bad requests in {elapsed:.1f} s ({total / elapsed:.0f}/s)")


def test_rate_limit_answers_429(tmp_path: Path, db_url: str) -> None:
    async def main() -> None:
        cfg = config(tmp_path, db_url, rate_per_key=0.001, burst_per_key=3)
        async with running(cfg) as (url, coord):
            async with Client(url, Identity.generate()) as c:
                for i in range(3):
                    await c.register(["node"], f"n{i}")
                size = coord.state.size
                with pytest.raises(RateLimited, match=r"over its rate limit \(0.001 requests/s\)"):
                    await c.register(["node"], "n4")
                assert coord.state.size == size
            async with Client(url, Identity.generate()) as other:  # another key is not limited
                await other.register(["node"], "m")

    asyncio.run(main())
