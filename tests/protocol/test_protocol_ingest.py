"""Ingest processes in front of the sequencer: they check signatures, nobody else can mark a
write as checked, and one that dies is replaced."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import protocol_harness as ph
import pytest

from cotrain.core.identity import Identity
from cotrain.core.signed import canonical
from cotrain.protocol import auth
from cotrain.protocol.client import Client
from cotrain.protocol.ingest import VERIFIED


@pytest.mark.timeout(180)
def test_ingest_checks_signatures_and_is_replaced_when_it_dies(tmp_path: Path) -> None:
    async def main() -> None:
        async with ph.running(ph.config(tmp_path, ingest=1)) as (url, coord):
            ident = Identity.generate()
            async with Client(url, ident) as c:
                assert (await c.register(["node"], "n1"))["key"] == ident.public_hex
            # a forged write marked "checked" by the client itself: the mark is dropped, the
            # signature checked, the write refused; nothing is written
            size = coord.state.size
            req = auth.sign(
                ident, "POST", "/v1/identities", {"roles": ["node"], "name": "n2", "specs": {}}
            )
            forged = {**auth.headers(req), auth.H_SIG: "ab" * 64, VERIFIED: "1"}
            unsigned = {"Content-Type": "application/json", VERIFIED: "1"}
            async with aiohttp.ClientSession() as s:
                for headers in (forged, unsigned):
                    async with s.post(
                        url + req.path, data=canonical(req.body), headers=headers
                    ) as resp:
                        assert resp.status == 401, await resp.text()
                        assert "error" in await resp.json()
                async with s.get(url + "/v1/status") as resp:  # reads go through too
                    assert (await resp.json())["size"] == size
            assert coord.state.size == size
            # kill the ingest process: another takes its place on the same port
            front_pids = [p.pid for p in _front(coord)]
            os.kill(front_pids[0], signal.SIGKILL)
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with Client(url, ident) as c:
                        await c.register(["node", "validator"], "n1")
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            assert [p.pid for p in _front(coord)] != front_pids

    asyncio.run(main())


def _front(coord: object) -> list:
    return list(coord.front.procs)  # type: ignore[attr-defined]
