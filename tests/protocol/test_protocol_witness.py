"""``cotrain witness`` against a real coordinator: it co-signs checkpoints that extend the one it
signed last (``cotrain audit`` counts the signatures), and refuses, with exit code 1 and the
evidence, a checkpoint that does not: a root changed under a signed size, a log that shrank, a
checkpoint not signed by the pinned coordinator key."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from protocol_harness import config, identities, running

from cotrain.protocol import audit
from cotrain.protocol.client import Client

ENV = {k: v for k, v in os.environ.items() if not k.startswith("COTRAIN_")}


async def _witness(url: str, key: str, tmp: Path, *extra: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "cotrain", "witness", "--coordinator", url),
        *("--coordinator_key", key, "--key", str(tmp / "w.pem"), "--name", "w1"),
        *("--state", str(tmp / "w-state.json"), "--once", *extra),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=ENV,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return int(proc.returncode or 0), out.decode(), err.decode()


async def _checkpointed(c: Client, size: int) -> None:
    """Until the newest checkpoint covers ``size`` entries."""
    for _ in range(300):
        st = await c.get("/v1/status")
        if st["checkpoint"] >= size:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no checkpoint of {size} entries")


@pytest.mark.timeout(240)
def test_witness_cosigns_what_extends_and_refuses_a_fork(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = config(tmp_path, checkpoint_every=2, checkpoint_interval_s=0.2)
        async with running(cfg) as (url, coord):
            ids = await identities(url, a=["node"], b=["node"], c=["node"])
            c = ids["a"][1]
            await _checkpointed(c, (await c.get("/v1/status"))["size"])
            rc, out, err = await _witness(url, coord.key, tmp_path)
            assert rc == 0, out + err
            first = json.loads((tmp_path / "w-state.json").read_text())
            assert f"co-signed checkpoint {first['size']}" in out

            # the log grows: the next checkpoint is co-signed after its consistency proof
            more = await identities(url, d=["node"], e=["initiator"])
            await _checkpointed(c, (await c.get("/v1/status"))["size"])
            rc, out, err = await _witness(url, coord.key, tmp_path)
            assert rc == 0, out + err
            second = json.loads((tmp_path / "w-state.json").read_text())
            assert second["size"] > first["size"], (first, second)
            text = (await c.get_bytes("/v1/log/checkpoint")).decode()
            assert "— w1 " in text  # the witness's line is on the published checkpoint

            # the audit verifies and counts the co-signatures of registered witnesses
            report = audit.audit(await audit.fetch(url, timeout_s=60), key=coord.key)
            assert report.cosignatures >= 2

            # nothing new: nothing signed, exit 0
            rc, out, err = await _witness(url, coord.key, tmp_path)
            assert rc == 0 and "co-signed" not in out, out + err

            # a different root for the size it signed (the coordinator showed it another
            # history before): a fork, exit 1, nothing signed
            forked = dict(second, root="ab" * 32)
            (tmp_path / "w-state.json").write_text(json.dumps(forked))
            rc, out, err = await _witness(url, coord.key, tmp_path)
            assert rc == 1 and "two roots" in err, out + err

            # a size the log no longer has: it shrank
            (tmp_path / "w-state.json").write_text(json.dumps(dict(second, size=10**6)))
            rc, out, err = await _witness(url, coord.key, tmp_path)
            assert rc == 1 and "shrank" in err, out + err

            # an older signed size whose root is not this log's prefix: the proof fails
            (tmp_path / "w-state.json").write_text(json.dumps(dict(first, root="cd" * 32)))
            more.update(await identities(url, f=["node"]))
            await _checkpointed(c, (await c.get("/v1/status"))["size"])
            rc, out, err = await _witness(url, coord.key, tmp_path)
            assert rc == 1 and "does not extend" in err, out + err

            # a checkpoint not signed by the key it pins: refused
            (tmp_path / "w-state.json").unlink()
            rc, out, err = await _witness(url, "ee" * 32, tmp_path)
            assert rc == 1 and "does not verify" in err, out + err
            rc, out, err = await _witness(url, "not-hex", tmp_path)
            assert rc == 2 and "coordinator_key" in err, out + err
            for _, client in [*ids.values(), *more.values()]:
                await client.close()

    asyncio.run(main())


def test_witness_needs_the_coordinator_key(tmp_path: Path) -> None:
    import subprocess

    cp = subprocess.run(
        [sys.executable, "-m", "cotrain", "witness", "--key", str(tmp_path / "w.pem")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert cp.returncode == 2 and "--coordinator_key is required" in cp.stderr, cp.stderr
    assert "Traceback" not in cp.stderr
