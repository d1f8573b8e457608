"""A coordinator process killed with SIGKILL mid-load keeps every write it acknowledged.

``cotrain coordinator`` runs as a real process on a SQLite file (and on a PostgreSQL database,
where the ``db_url`` fixture can start one). Client coroutines (one per node, submitting signed
work; one per validator, judging it and now and then claiming its fees) load it; every write
answered 200 is recorded with its seq. At a seeded moment (after a random
number of acknowledgements, with other writes in flight) it is killed with SIGKILL, then
restarted on the same files: every acknowledged write must be at its seq, byte for byte its
signed request; a request acknowledged before the kill and sent again is refused as a replay;
new writes continue the chain; ``audit.fetch`` + ``audit.audit`` pass. Three rounds on the same
files. Then SIGTERM stops a coordinator cleanly (exit 0, its summary on stderr) and SIGINT with
exit code 130.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from proc_harness import processes_with

from cotrain.core.identity import Identity
from cotrain.protocol import audit, auth
from cotrain.protocol.client import Client
from cotrain.protocol.errors import AuthError, ProtocolError
from cotrain.protocol.ledger import Entry

pytestmark = pytest.mark.timeout(400)  # ~10 s each on an idle machine; much more on a busy one

TAG = "COTRAIN_CRASH_TEST_TAG"
NODES = 4
VALIDATORS = 2
ROUNDS = 3
SEED = 20240613
WAIT_S = 150.0
"""Deadline of every wait (generous: the machine may be busy)."""


@dataclass
class Proc:
    proc: asyncio.subprocess.Process
    url: str
    key: str
    stdout: Path
    stderr: Path

    def output(self) -> str:
        return (
            f"--- stdout\n{self.stdout.read_text(errors='replace')[-2000:]}\n"
            f"--- stderr\n{self.stderr.read_text(errors='replace')[-4000:]}"
        )


async def _wait_exit(proc: asyncio.subprocess.Process, timeout_s: float) -> int:
    return await asyncio.wait_for(proc.wait(), timeout_s)


@contextlib.asynccontextmanager
async def coordinator(tmp: Path, tag: str, name: str, db: str | None = None) -> AsyncIterator[Proc]:
    """``python -m cotrain coordinator`` on ``db`` (default: a SQLite file in ``tmp``) with the
    key in ``tmp``; killed if still running when the block ends."""
    out, err = tmp / f"{name}.out", tmp / f"{name}.err"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTRAIN_")}
    env.update({TAG: tag, "PYTHONUNBUFFERED": "1"})
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "cotrain", "coordinator", "--port", "0"),
            *("--db", db or str(tmp / "coord.db"), "--key", str(tmp / "coord.pem")),
            *("--checkpoint_every", "50", "--unhealthy_after_s", "600", "--dead_after_s", "1200"),
            # a wide clock window: the requests sent again after a restart are refused by the
            # nonces it remembers, not by their age, however slowly this machine runs
            *("--window_s", "3600", "--write_timeout_s", "120"),
            stdout=fo,
            stderr=fe,
            env=env,
        )
    try:
        deadline = time.monotonic() + WAIT_S
        ready: dict[str, Any] | None = None
        while ready is None:  # poll its stdout for the ready line
            for line in out.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    obj = json.loads(line)
                    if isinstance(obj, dict) and obj.get("event") == "ready":
                        ready = obj
            if ready is not None:
                break
            if proc.returncode is not None or time.monotonic() > deadline:
                p = Proc(proc, "", "", out, err)
                raise AssertionError(f"no ready line (exit {proc.returncode})\n{p.output()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.05)
        assert ready["role"] == "coordinator" and ready["pid"] == proc.pid, ready
        yield Proc(proc, ready["url"], ready["key"], out, err)
    finally:
        if proc.returncode is None:
            proc.kill()
            await _wait_exit(proc, WAIT_S)


def _work_key() -> str:
    return hashlib.sha256(os.urandom(16)).hexdigest()


@dataclass
class World:
    ids: dict[str, Identity]
    task: str
    acked: dict[int, auth.SignedRequest] = field(default_factory=dict)
    """seq -> the signed request the coordinator answered 200 with that seq."""


async def _setup(url: str) -> World:
    ids = {"init": Identity.generate()}
    ids.update({f"n{i}": Identity.generate() for i in range(NODES)})
    ids.update({f"v{i}": Identity.generate() for i in range(VALIDATORS)})
    for name, ident in ids.items():
        role = {"i": "initiator", "n": "node", "v": "validator"}[name[0]]
        async with Client(url, ident, timeout_s=WAIT_S) as c:
            await c.register([role], name)
    async with Client(url, ids["init"], timeout_s=WAIT_S) as c:
        task = (
            await c.write(
                "/v1/tasks",
                {
                    "name": "crash",
                    "kind": "diloco",
                    "budget": 10**12,
                    "rate_per_unit": 3,
                    "validator_fee": 2,
                    "lock_s": 3600,  # verdicts never come too late in this test
                    "admission": "open",
                    "validators": [ids[f"v{i}"].public_hex for i in range(VALIDATORS)],
                    "quorum": VALIDATORS,
                },
            )
        )["task"]
        await c.write(f"/v1/tasks/{task}/open", {})
    for i in range(NODES):
        async with Client(url, ids[f"n{i}"], timeout_s=WAIT_S) as c:
            await c.write(f"/v1/tasks/{task}/join", {})
    return World(ids, task)


class Killed(Exception):
    """The coordinator was killed: the client stops."""


async def _load(p: Proc, w: World, kill_after: int) -> int:
    """Load the coordinator and SIGKILL it at the ``kill_after``-th acknowledgement, with the
    other clients' writes in flight; the number acknowledged in this round."""
    killed = asyncio.Event()
    acks = 0
    errors: list[BaseException] = []
    to_v0: asyncio.Queue[str] = asyncio.Queue()
    to_v1: asyncio.Queue[str] = asyncio.Queue()

    def ack(seq: int, req: auth.SignedRequest) -> None:
        nonlocal acks
        assert seq not in w.acked, f"seq {seq} acknowledged twice"
        w.acked[seq] = req
        acks += 1
        if acks >= kill_after and not killed.is_set():
            killed.set()
            p.proc.send_signal(signal.SIGKILL)

    async def send(c: Client, req: auth.SignedRequest) -> None:
        if killed.is_set():
            raise Killed
        try:
            got = await c.send(req)
        except (aiohttp.ClientError, ProtocolError, TimeoutError) as e:
            if killed.is_set():
                raise Killed from None
            errors.append(e)
            raise
        ack(got["seq"], req)  # an answer that came after the kill was still an answer

    async def node(name: str) -> None:
        async with Client(p.url, w.ids[name], timeout_s=WAIT_S) as c:
            while True:
                key = _work_key()
                body = {"work_key": key, "kind": "units", "units": 1 + len(w.acked) % 50, "step": 1}
                await send(c, auth.sign(w.ids[name], "POST", f"/v1/tasks/{w.task}/work", body))
                to_v0.put_nowait(key)

    async def validator(name: str, inbox: asyncio.Queue[str], then: asyncio.Queue[str]) -> None:
        async with Client(p.url, w.ids[name], timeout_s=WAIT_S) as c:
            judged = 0
            while True:
                key = await inbox.get()
                body = {"work_key": key, "verdict": "accept"}
                path = f"/v1/tasks/{w.task}/verdicts"
                await send(c, auth.sign(w.ids[name], "POST", path, body))
                then.put_nowait(key)
                judged += 1
                if judged % 5 == 0:  # fees of 2 a verdict: always enough to claim 1
                    claim = auth.sign(w.ids[name], "POST", "/v1/claims", {"amount": 1})
                    await send(c, claim)

    tasks = [asyncio.create_task(node(f"n{i}")) for i in range(NODES)]
    tasks.append(asyncio.create_task(validator("v0", to_v0, to_v1)))
    tasks.append(asyncio.create_task(validator("v1", to_v1, asyncio.Queue())))
    try:
        await asyncio.wait_for(killed.wait(), WAIT_S)
        done, _ = await asyncio.wait(tasks, timeout=WAIT_S)
        assert len(done) == len(tasks), "clients did not stop after the kill"
        for t in tasks:
            exc = t.exception()
            assert exc is None or isinstance(exc, Killed), (exc, errors)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert await _wait_exit(p.proc, WAIT_S) == -signal.SIGKILL
    return acks


async def _check_after_restart(p: Proc, w: World) -> set[str]:
    """Every acknowledged write at its seq; acknowledged requests replayed are refused; new
    writes continue the chain; the audit passes."""
    async with Client(p.url, timeout_s=WAIT_S) as c:
        size = (await c.get("/v1/status"))["size"]
        assert size > max(w.acked), (size, max(w.acked))
        entries = await c.entries(0, size)
    for seq, req in sorted(w.acked.items()):
        e = Entry.decode(entries[seq])
        assert e.seq == seq and e.req == req, f"acknowledged write {seq} is not in the ledger"
    # the last acknowledged requests of each kind, sent again: refused as replays
    last: dict[str, auth.SignedRequest] = {}
    for _, req in sorted(w.acked.items()):
        last[req.path.rsplit("/", 1)[-1]] = req
    assert {"work", "verdicts"} <= set(last), sorted(last)
    for req in sorted(last.values(), key=lambda r: r.path != "/v1/claims"):  # claims first
        async with Client(p.url, timeout_s=WAIT_S) as c:
            with pytest.raises(AuthError, match="replayed request"):
                await c.send(req)
    # the chain goes on
    async with Client(p.url, w.ids["n0"], timeout_s=WAIT_S) as c:
        body = {"work_key": _work_key(), "kind": "units", "units": 1}
        req = auth.sign(w.ids["n0"], "POST", f"/v1/tasks/{w.task}/work", body)
        got = await c.send(req)
        assert got["seq"] == size, (got, size)
        w.acked[got["seq"]] = req
    ledger = await audit.fetch(p.url, timeout_s=WAIT_S)
    report = audit.audit(ledger, key=p.key)
    assert report.size >= size + 1 and report.checkpoints >= 1, report
    assert report.state["size"] == report.size
    return set(last)


def test_kill_9_mid_load_loses_no_acknowledged_write(tmp_path: Path, db_url: str) -> None:
    tag = uuid.uuid4().hex
    rng = random.Random(SEED)
    kill_after = [rng.randint(30, 300) for _ in range(ROUNDS)]  # acknowledgements in each round
    replayed: set[str] = set()

    async def main() -> list[int]:
        acks = []
        async with coordinator(tmp_path, tag, "start", db_url) as p:
            w = await _setup(p.url)
            key = p.key
            acks.append(await _load(p, w, kill_after[0]))
        for r in range(1, ROUNDS + 1):
            async with coordinator(tmp_path, tag, f"restart{r}", db_url) as p:
                assert p.key == key
                replayed.update(await _check_after_restart(p, w))
                if r < ROUNDS:
                    acks.append(await _load(p, w, kill_after[r]))
        return acks

    try:
        acks = asyncio.run(main())
        # each kill came at its acknowledgement; answers already on their way still arrive
        on_time = all(a >= k for a, k in zip(acks, kill_after, strict=True))
        assert on_time, (acks, kill_after)
        assert replayed == {"work", "verdicts", "claims"}, replayed
    finally:
        assert processes_with(f"{TAG}={tag}") == []


async def _stop_with(tmp: Path, sig: int) -> tuple[int, str]:
    tag = uuid.uuid4().hex
    async with coordinator(tmp, tag, f"sig{sig}") as p:
        async with Client(p.url, Identity.generate(), timeout_s=WAIT_S) as c:
            await c.register(["node"], "someone")
        p.proc.send_signal(sig)
        code = await _wait_exit(p.proc, WAIT_S)
        stderr = p.stderr.read_text(errors="replace")
    assert processes_with(f"{TAG}={tag}") == []
    return code, stderr


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    code, stderr = asyncio.run(_stop_with(tmp_path, signal.SIGTERM))
    assert code == 0, stderr
    assert "coordinator stopped after" in stderr and "(SIGTERM): 2 entries" in stderr, stderr


def test_sigint_exits_130(tmp_path: Path) -> None:
    code, stderr = asyncio.run(_stop_with(tmp_path, signal.SIGINT))
    assert code == 130, stderr
    assert "(SIGINT): 2 entries" in stderr, stderr
