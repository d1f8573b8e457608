"""The ``local`` provider's contract: its offer, a launched ``cotrain node`` process, its
status from another provider object (another CLI call), and terminate leaving no process."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from cotrain.core.pids import alive
from cotrain.market.local import LocalProvider
from cotrain.market.offers import OfferQuery
from cotrain.market.provider import LaunchSpec, ProviderError


@pytest.mark.timeout(120)
def test_local_offer_launch_status_terminate(tmp_path: Path) -> None:
    # a coordinator that accepts connections and never answers: the node waits on it
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"

    async def main() -> None:
        p = LocalProvider(tmp_path / "local")
        [offer] = await p.offers(OfferQuery())
        assert offer.provider == "local" and offer.usd_per_hour == 0 and offer.vcpus
        assert await p.offers(OfferQuery(gpu="H100")) == [] or offer.gpu.startswith("H100")
        waiting = await p.launch(offer, LaunchSpec(coordinator=url, task="t1"))
        # a node whose coordinator refuses it (no such task at a closed port): it exits
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{closed.getsockname()[1]}"
        closed.close()
        failing = await p.launch(offer, LaunchSpec(coordinator=gone, task="t1"))
        assert {waiting.instance_id, failing.instance_id} == {"local-1", "local-2"}
        other = LocalProvider(tmp_path / "local")  # what another `cotrain market` call sees
        deadline = time.monotonic() + 60
        while (await other.status(failing.instance_id)).state != "exited":
            assert time.monotonic() < deadline, tmp_path / "local" / "local-2" / "node.err"
            await asyncio.sleep(0.2)
        err = (tmp_path / "local" / "local-2" / "node.err").read_text()
        assert "cannot reach the coordinator" in err, err
        assert (await other.status(waiting.instance_id)).state == "running"
        pid = int((await other.status(waiting.instance_id)).detail.split()[1])
        await other.terminate(waiting.instance_id, grace_s=20)
        assert not alive(pid)
        states = {i.instance_id: i.state for i in await p.instances()}
        assert states == {"local-1": "terminated", "local-2": "exited"}
        with pytest.raises(ProviderError, match="no local instance"):
            await p.status("local-9")

    async def cleanup() -> None:  # nothing outlives the test, whatever failed
        p = LocalProvider(tmp_path / "local")
        for inst in await p.instances():
            if inst.state == "running":
                await p.terminate(inst.instance_id, grace_s=5)

    try:
        asyncio.run(main())
    finally:
        silent.close()
        asyncio.run(cleanup())
