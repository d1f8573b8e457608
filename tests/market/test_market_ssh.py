"""The ``ssh`` provider against real ``sshd`` servers on loopback: offers probed over SSH, a
launch that installs cotrain into a venv on the host (wheel over SFTP, pip), benchmarks it and
starts ``cotrain node``; status from another provider object; terminate leaves no process; a
host that fails its install, its benchmark or its host-key check is a one-line error and
leaves nothing running. The hosts file's mistakes are one line each."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from sshd_harness import SshServer, kill_under, processes_under, require_sshd

from cotrain.market.offers import OfferQuery
from cotrain.market.provider import LaunchSpec, ProviderError
from cotrain.market.ssh import SshProvider, load_hosts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sshd logs in as root here")


@pytest.fixture
def coordinator() -> Iterator[str]:
    """Answers /v1/status (the probe's round trip); holds every other request unanswered."""

    async def status(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def hold(_: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response()

    app = web.Application()
    app.router.add_get("/v1/status", status)
    app.router.add_route("*", "/{tail:.*}", hold)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    loop.run_until_complete(runner.setup())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    loop.run_until_complete(web.SockSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


@pytest.mark.timeout(240)
def test_ssh_offers_launch_status_terminate(tmp_path: Path, coordinator: str) -> None:
    require_sshd()
    good = SshServer.start(tmp_path, "good")
    gone = SshServer.start(tmp_path, "gone")
    gone.stop()  # listed, unreachable
    lines: list[str] = []
    hosts = [
        good.ssh_host(tmp_path, usd_per_hour=0.5, region="lab"),
        gone.ssh_host(tmp_path),
        good.ssh_host(tmp_path, name="badpip", pip_args=["--no-index", "--find-links", "/nope"]),
        good.ssh_host(tmp_path, name="oldpy", python="/nonexistent/python3"),
    ]
    hosts[2] = hosts[2].model_copy(update={"pip_args": [*hosts[2].pip_args, "no-such-pkg-x"]})

    async def main() -> None:
        p = SshProvider(hosts, tmp_path / "state", progress=lines.append)
        offers = {o.offer_id: o for o in await p.offers(OfferQuery(in_stock=False))}
        assert offers["good"].stock == "available" and offers["gone"].stock == "none"
        o = offers["good"]
        assert (o.gpu, o.billing, o.usd_per_hour, o.region) == ("cpu", "on_demand", 0.5, "lab")
        assert o.vcpus and o.ram_gb
        assert [x.offer_id for x in await p.offers(OfferQuery(region="lab"))] == ["good"]
        spec = LaunchSpec(coordinator=coordinator, task="t1", invite="cd" * 16)
        inst = await p.launch(o, spec)
        assert (inst.state, inst.host, inst.usd_per_hour) == ("running", "127.0.0.1", 0.5)
        assert "GFLOP/s" in inst.detail
        inst_gflops = float(inst.detail.split(", ")[1].split()[0])
        assert any("installing cotrain" in x for x in lines), lines
        assert any("benchmarking" in x for x in lines), lines
        venv = Path(hosts[0].workdir) / "venv"
        assert (venv / "bin" / "cotrain").exists()
        other = SshProvider(hosts, tmp_path / "state")  # another `cotrain market` call
        assert (await other.status(inst.instance_id)).state == "running"
        busy = {x.offer_id: x.stock for x in await other.offers(OfferQuery(in_stock=False))}
        assert busy["good"] == "none"  # one node per host
        with pytest.raises(ProviderError, match="already runs"):
            await other.launch(o, spec)
        assert processes_under(Path(hosts[0].workdir)), "no node process on the host"
        await other.terminate(inst.instance_id, grace_s=10)
        assert processes_under(Path(hosts[0].workdir)) == []
        assert (await p.status(inst.instance_id)).state == "terminated"
        remeasured = {x.offer_id: x for x in await p.offers(OfferQuery(in_stock=False))}
        assert remeasured["good"].measured_gflops == pytest.approx(inst_gflops, abs=0.5)

        # failures: one line naming the host and the step, nothing left running
        bad = await p.offers(OfferQuery(in_stock=False))
        by = {x.offer_id: x for x in bad}
        with pytest.raises(ProviderError, match="badpip: installing cotrain failed"):
            await p.launch(by["badpip"], spec)
        with pytest.raises(ProviderError, match="gone: cannot connect"):
            await p.launch(by["gone"], spec)
        with pytest.raises(ProviderError, match="oldpy: /nonexistent/python3 failed"):
            await p.launch(by["oldpy"], spec)
        with pytest.raises(ProviderError, match=r"good: the benchmark measured .* below"):
            await SshProvider(hosts, tmp_path / "state", min_gflops=1e9).launch(o, spec)
        states = {i.instance_id: i.state for i in await p.instances()}
        assert sorted(states.values()) == ["failed"] * 4 + ["terminated"], states
        assert processes_under(Path(hosts[0].workdir)) == []

    try:
        asyncio.run(asyncio.wait_for(main(), 200))
    finally:
        good.stop()
        kill_under(tmp_path)


@pytest.mark.timeout(60)
def test_a_changed_host_key_is_refused(tmp_path: Path) -> None:
    require_sshd()
    a = SshServer.start(tmp_path, "a")
    b = SshServer.start(tmp_path, "b")
    try:
        h = a.ssh_host(tmp_path)
        (tmp_path / "known_hosts-a").write_text(
            b.known_hosts_line().replace(f":{b.port}]", f":{a.port}]")
        )

        async def main() -> None:
            p = SshProvider([h], tmp_path / "state")
            [o] = await p.offers(OfferQuery(in_stock=False))
            assert o.stock == "none"
            with pytest.raises(ProviderError, match="a: cannot connect: Host key is not trusted"):
                await p.launch(o, LaunchSpec(coordinator="http://x:1", task="t"))

        asyncio.run(main())
    finally:
        a.stop()
        b.stop()


def test_hosts_file_mistakes_are_one_line(tmp_path: Path) -> None:
    f = tmp_path / "hosts.toml"
    assert load_hosts(f) == []
    f.write_text('[[host]]\nname = "a"\naddress = "10.0.0.1"\nusd_per_hour = 1.5\n')
    [h] = load_hosts(f)
    assert (h.name, h.port, h.python, h.usd_per_hour) == ("a", 22, "python3", 1.5)
    for text, want in [
        ('[[host]]\nname = "a b"\naddress = "x"\n', "host 1: name: String should match"),
        ('[[host]]\nname = "a"\n', "host 1: address: Field required"),
        ('[[host]]\nname = "a"\naddress = "x"\nprot = 22\n', "host 1: prot: Extra inputs"),
        ('[hosts]\nname = "a"\n', "unknown table 'hosts'"),
        ('[[host]]\nname = "a"\naddress = "x"\n[[host]]\nname = "a"\naddress = "y"\n', "two"),
        ("[[host]\n", "hosts.toml"),
    ]:
        f.write_text(text)
        with pytest.raises(ProviderError, match=want) as e:
            load_hosts(f)
        assert "\n" not in str(e.value)
