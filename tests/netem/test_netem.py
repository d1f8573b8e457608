"""cotrain.netem: emulated WAN links (namespaces, tbf rate, nftables loss, delay proxy)."""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest

import cotrain.netem as netem
from cotrain.core.config import load_config
from cotrain.core.errors import ConfigError
from cotrain.netem import (
    DelayProxy,
    Host,
    ProxyError,
    WanConfig,
    WanNetwork,
    netns_unavailable_reason,
)
from cotrain.netem.announce import read_json_line
from cotrain.netem.delay_proxy import child_env
from cotrain.netem.netns import call_in_netns, list_netns, netns_pids

PROBE = [sys.executable, "-m", "cotrain.netem.probe"]


def _wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` (for events we cannot be told about, e.g. a non-child's death)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _server(host: Host | None, *args: str, nice: int = 0) -> tuple[subprocess.Popen[bytes], int]:
    """Start a probe server inside ``host`` (or here, on loopback); return it and its port."""
    argv = [*PROBE, "--nice", str(nice), *args]
    if host is None:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=child_env())
    else:
        proc = host.popen(argv, stdout=subprocess.PIPE)
    return proc, int(read_json_line(proc, 10.0, f"probe {args[0]}")["port"])


def _send_to_sink(
    sender: Host | None, sink: subprocess.Popen[bytes], address: str, n_bytes: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send ``n_bytes`` to ``address`` (a sink, maybe behind a proxy); return both reports."""
    argv = [*PROBE, "--nice", "-10", "send", "--to", address, "--bytes", str(n_bytes)]
    if sender is None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=child_env())
    else:
        done = sender.run(argv, timeout_s=60)
    assert done.returncode == 0, done.stderr
    assert sink.stdout is not None
    received = json.loads(sink.stdout.readline())
    sink.wait(timeout=10)
    return json.loads(done.stdout), received


def _goodput(rate_mbit: float) -> float:
    """TCP payload rate of a link: 1448 payload bytes per 1514-byte frame (tbf counts frames)."""
    return rate_mbit * 1448 / 1514


def _transfer_mbit(net: WanNetwork, src: int, dst: int, n_bytes: int) -> float:
    """Goodput of one TCP transfer, measured by the sink. Both ends run at nice -10: we
    measure the link, not how busy the shared machine is."""
    sink, port = _server(net.hosts[dst], "sink", nice=-10)
    sent, received = _send_to_sink(net.hosts[src], sink, f"{net.hosts[dst].ip}:{port}", n_bytes)
    assert (
        received["bytes"] == n_bytes
        and received["flows"][0]["sha256"] == sent["flows"][0]["sha256"]
    )
    return float(received["mbit_s"])


def _rtt_ms(client: Host | None, address: str, count: int = 15) -> dict[str, Any]:
    """Round trips of 64 bytes through an echo server: ``min_ms``, ``median_ms``, ``rtts_ms``.

    Client and echo server run at nice -10 (as does the proxy), so that other work on a shared
    machine does not read as network latency.
    """
    argv = [*PROBE, "--nice", "-10", "rtt", "--to", address, "--count", str(count)]
    if client is None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=child_env())
    else:
        done = client.run(argv, timeout_s=30)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def _assert_rtt_near(report: dict[str, Any], expected_ms: float) -> None:
    # Never below the added delay, and the best sample close to it. Scheduling noise only ever
    # adds (four processes per round trip, on a shared 2-core machine), so the minimum is the
    # estimate to check; the median is ~1 ms above it when the machine is quiet.
    assert expected_ms <= report["min_ms"] <= expected_ms + 8.0, report


# ---- without namespaces -------------------------------------------------------------------


def test_public_names_are_pinned() -> None:
    assert set(netem.__all__) == {
        "DelayProxy", "DropCounts", "Host", "LinkSettings", "NetemCommandError", "NetemError",
        "NetnsUnavailable", "ProxyError", "WanConfig", "WanNetwork", "cleanup_leftovers",
        "netns_unavailable_reason",
    }  # fmt: skip


def test_unavailable_reason_names_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = netns_unavailable_reason()
    assert reason is not None and "root" in reason
    with pytest.raises(netem.NetnsUnavailable, match="root"):
        WanNetwork(n_hosts=2)


def test_bad_network_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="n_hosts"):
        WanNetwork(n_hosts=0)
    with pytest.raises(ValueError, match="loss_pct"):
        WanNetwork(n_hosts=2, loss_pct=120.0)
    with pytest.raises(ValueError, match="rate_mbit"):
        WanNetwork(n_hosts=2, rate_mbit=-5.0)
    with pytest.raises(ValueError, match="segmentation='mtu'"):
        WanNetwork(n_hosts=2, loss_pct=1.0, segmentation="gso")


def test_wan_config_loads_from_overrides() -> None:
    config = load_config(WanConfig, None, ["--n_hosts=3", "--rate_mbit=50", "--loss_pct=0.5"])
    assert (config.n_hosts, config.rate_mbit, config.loss_pct) == (3, 50.0, 0.5)
    assert config.segmentation == "mtu"
    with pytest.raises(ConfigError, match="n_hosts"):
        load_config(WanConfig, None, ["--n_hosts=0"])


@pytest.mark.timeout(30)
def test_proxy_on_loopback_delays_and_carries_bytes_intact() -> None:
    echo, echo_port = _server(None, "echo", nice=-10)
    sink, sink_port = _server(None, "sink")
    try:
        with DelayProxy.start(None, ("127.0.0.1", echo_port), delay_ms=15) as proxy:
            _assert_rtt_near(_rtt_ms(None, f"127.0.0.1:{proxy.port}"), 30.0)
        with DelayProxy.start(None, ("127.0.0.1", sink_port), delay_ms=5) as proxy:
            sent, received = _send_to_sink(None, sink, f"127.0.0.1:{proxy.port}", 30_000_000)
            assert received["bytes"] == 30_000_000
            assert received["flows"][0]["sha256"] == sent["flows"][0]["sha256"]
        assert not proxy.running
    finally:
        echo.kill()
        sink.kill()
        echo.wait(5)
        sink.wait(5)


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.timeout(30)
def test_proxy_pushes_back_instead_of_buffering_without_bound() -> None:
    # The target accepts but never reads: a proxy without backpressure would swallow all 200 MB.
    with socket.create_server(("127.0.0.1", 0)) as server:
        target = ("127.0.0.1", server.getsockname()[1])
        with DelayProxy.start(None, target, delay_ms=2, max_buffer_kb=1024) as proxy:
            rss_before = _rss_kb(proxy.process.pid)
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as conn:
                stalled, _ = server.accept()
                conn.settimeout(1.0)
                block = b"\0" * (1 << 20)
                sent = 0
                with stalled, pytest.raises(TimeoutError):
                    while sent < 200 << 20:
                        sent += conn.send(block)
            growth_kb = _rss_kb(proxy.process.pid) - rss_before
    # What got in sits in socket buffers (a few MB each) plus the proxy's bounded queue.
    assert sent < 40 << 20, sent
    assert growth_kb < 16 * 1024, growth_kb


@pytest.mark.timeout(30)
def test_proxy_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="delay_ms"):
        DelayProxy.start(None, ("127.0.0.1", 9), delay_ms=-1)
    with DelayProxy.start(None, ("127.0.0.1", 9), delay_ms=1) as first:
        with pytest.raises(ProxyError, match="in use"):
            DelayProxy.start(None, ("127.0.0.1", 9), delay_ms=1, listen_port=first.port)
        # A dead target: the proxy accepts, fails upstream and resets the client connection.
        with socket.create_connection(("127.0.0.1", first.port), timeout=10) as conn:
            conn.settimeout(10)
            with pytest.raises(ConnectionResetError):
                conn.recv(1)
        assert first.running


# ---- inside namespaces ----------------------------------------------------------------------


@pytest.fixture
def net() -> Any:
    with WanNetwork(n_hosts=2, rate_mbit=100.0) as network:
        yield network


@pytest.mark.netns
@pytest.mark.timeout(30)
def test_hosts_see_each_other_and_their_own_loopback(net: WanNetwork) -> None:
    h0, h1 = net.hosts
    assert (h0.ip, h1.ip) == ("10.213.0.2", "10.213.0.3")
    assert len({h0.name, h1.name, net.switch}) == 3
    listener = h0.listen()
    port = listener.getsockname()[1]
    with listener, h1.connect((h0.ip, port), timeout_s=5) as c1, h0.connect(("127.0.0.1", port)):
        accepted, peer = listener.accept()
        with accepted:
            assert peer[0] == h1.ip
            c1.sendall(b"ping")
            assert accepted.recv(4) == b"ping"
    # The root namespace cannot reach the hosts: nothing leaks out of the emulated WAN.
    with pytest.raises(OSError):
        socket.create_connection((h0.ip, port), timeout=0.3)
    # Another network gets fresh names: parallel runs cannot collide.
    with WanNetwork(n_hosts=1, rate_mbit=None, segmentation="gso") as other:
        assert other.hosts[0].name not in {h0.name, h1.name}
        with pytest.raises(ValueError, match="segmentation='mtu'"):
            other.set_loss(0, 1.0)
    with pytest.raises(ValueError, match="host_index"):
        net.set_rate(2, 10.0)


@pytest.mark.netns
@pytest.mark.timeout(30)
def test_rtt_through_proxy_is_twice_the_delay(net: WanNetwork) -> None:
    h0, h1 = net.hosts
    _, echo_port = _server(h0, "echo", nice=-10)
    assert _rtt_ms(h1, f"{h0.ip}:{echo_port}")["min_ms"] < 5.0
    proxy = h0.start_delay_proxy(target=("127.0.0.1", echo_port), delay_ms=25)
    _assert_rtt_near(_rtt_ms(h1, f"{h0.ip}:{proxy.port}"), 50.0)
    proxy.stop()
    assert not proxy.running


@pytest.mark.netns
@pytest.mark.timeout(40)
def test_link_delay_adds_latency_to_tcp_between_hosts() -> None:
    with WanNetwork(n_hosts=3, rate_mbit=100.0, delay_ms=10.0) as network:
        h0, h1, h2 = network.hosts
        network.set_delay(1, 15.0)
        assert network.link(1).delay_ms == 15.0
        _, echo_port = _server(h0, "echo", nice=-10)
        _assert_rtt_near(_rtt_ms(h1, f"{h0.ip}:{echo_port}"), 2 * (10.0 + 15.0))
        _assert_rtt_near(_rtt_ms(h2, f"{h0.ip}:{echo_port}"), 2 * (10.0 + 10.0))
        assert _rtt_ms(h0, f"127.0.0.1:{echo_port}")["min_ms"] < 5.0  # lo is not a link
        # A refused connection: accepted by the agent, then reset after the round trip.
        with h1.connect((h0.ip, 9), timeout_s=5) as refused, pytest.raises(ConnectionResetError):
            refused.recv(1)
        with h0.listen() as listener, h1.connect((h0.ip, listener.getsockname()[1])) as client:
            server, peer = listener.accept()
            with server:
                assert peer[0] == h1.ip  # servers see the real client host

                def ping_ms() -> float:
                    start = time.monotonic()
                    client.sendall(b"?")
                    assert server.recv(1) == b"?"
                    server.sendall(b"!")
                    assert client.recv(1) == b"!"
                    return (time.monotonic() - start) * 1000

                assert 50.0 <= min(ping_ms() for _ in range(5)) <= 58.0
                # A live connection follows every change, effective when set_delay returns.
                network.set_delay(0, 0.0)
                network.set_delay(1, 0.0)
                assert min(ping_ms() for _ in range(5)) < 5.0
                network.set_delay(1, 30.0)
                assert 60.0 <= min(ping_ms() for _ in range(5)) <= 68.0


@pytest.mark.netns
@pytest.mark.timeout(40)
def test_throughput_matches_the_rate(net: WanNetwork) -> None:
    # 20 MB at 100 Mbit/s: ~1.7 s. Goodput is 95.6% of the line rate (Ethernet/IP/TCP headers).
    mbit = _transfer_mbit(net, src=1, dst=0, n_bytes=20_000_000)
    assert 0.9 * _goodput(100.0) <= mbit <= 1.05 * _goodput(100.0), mbit


@pytest.mark.netns
@pytest.mark.timeout(40)
def test_proxies_carry_concurrent_flows_at_the_link_rate() -> None:
    # Two 100 Mbit/s flows, each through its own 20 ms proxy, at once on this 2-core machine.
    with WanNetwork(n_hosts=4, rate_mbit=100.0) as network:
        runs = []
        for dst, src in (
            (network.hosts[0], network.hosts[1]),
            (network.hosts[2], network.hosts[3]),
        ):
            # The probes run at the proxies' priority: we measure the proxies, not the scheduler.
            sink, port = _server(dst, "sink", nice=-10)
            proxy = dst.start_delay_proxy(target=("127.0.0.1", port), delay_ms=20)
            address = f"{dst.ip}:{proxy.port}"
            argv = [*PROBE, "--nice", "-10", "send", "--to", address, "--bytes", "12000000"]
            sender = src.popen(argv, stdout=subprocess.DEVNULL)
            runs.append((sink, sender))
        for sink, sender in runs:
            assert sender.wait(timeout=30) == 0
            assert sink.stdout is not None
            report = json.loads(sink.stdout.readline())
            assert report["bytes"] == 12_000_000
            # ~96 when the machine is quiet; the floor leaves room for other engineers' load.
            assert 0.7 * _goodput(100.0) <= report["mbit_s"] <= 1.05 * _goodput(100.0), report


@pytest.mark.netns
@pytest.mark.timeout(40)
def test_rate_limits_both_directions_and_changes_at_run_time(net: WanNetwork) -> None:
    net.set_rate(0, 30.0)
    assert net.link(0).rate_mbit == 30.0
    download = _transfer_mbit(net, src=1, dst=0, n_bytes=6_000_000)
    upload = _transfer_mbit(net, src=0, dst=1, n_bytes=6_000_000)
    for mbit in (download, upload):
        assert 0.9 * _goodput(30.0) <= mbit <= 1.05 * _goodput(30.0), (download, upload)


@pytest.mark.netns
@pytest.mark.timeout(40)
def test_loss_drops_packets_but_tcp_completes(net: WanNetwork) -> None:
    net.set_loss(1, 2.0)
    assert net.drop_counts(1).total == 0
    _transfer_mbit(net, src=1, dst=0, n_bytes=8_000_000)  # checks size and hash
    drops = net.drop_counts(1)
    # ~5,500 data packets out and ~2,700 ACKs in, 2% of each dropped.
    assert drops.egress_packets > 20 and drops.ingress_packets > 5, drops
    net.set_loss(1, 0.0)
    _transfer_mbit(net, src=1, dst=0, n_bytes=2_000_000)
    assert net.drop_counts(1) == drops


@pytest.mark.netns
@pytest.mark.timeout(30)
def test_full_loss_cuts_the_link_on_the_wire_until_restored(net: WanNetwork) -> None:
    # On the wire: no sender hears of a drop. (A drop in the sending host's own output hook is
    # reported to its stack, EPERM, which no wire does: a listener whose SYN-ACK retransmission
    # is refused so forgets the half-open connection, while its client, whose ACK was lost,
    # waits on it as established.)
    h0, h1 = net.hosts
    with h0.listen() as listener, h1.listen() as listener1:
        net.set_loss(0, 100.0)
        with pytest.raises(TimeoutError):  # into host 0: the SYNs vanish
            h1.connect((h0.ip, listener.getsockname()[1]), timeout_s=0.5)
        assert net.drop_counts(0).ingress_packets >= 1
        udp = call_in_netns(h0.name, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        with udp:
            for _ in range(5):
                udp.sendto(b"lost", (h1.ip, 9))  # sent, as far as host 0 can tell
        with pytest.raises(TimeoutError):  # out of host 0: neither refused nor forbidden
            h0.connect((h1.ip, listener1.getsockname()[1]), timeout_s=0.5)
        assert net.drop_counts(0).egress_packets >= 6
        assert net.drop_counts(1).total == 0  # host 1's own link lost nothing
        net.set_loss(0, 0.0)
        with h1.connect((h0.ip, listener.getsockname()[1]), timeout_s=5):
            listener.accept()[0].close()


@pytest.mark.netns
@pytest.mark.timeout(30)
def test_close_removes_namespaces_and_processes() -> None:
    with pytest.raises(RuntimeError, match="boom"), WanNetwork(n_hosts=3) as network:
        names = {h.name for h in network.hosts} | {network.switch}
        assert names <= set(list_netns())
        sleeper = network.hosts[2].popen([sys.executable, "-c", "import time; time.sleep(60)"])
        proxy = network.hosts[1].start_delay_proxy(target=("127.0.0.1", 9), delay_ms=1)
        network.set_delay(0, 5.0)  # starts the delay agents
        raise RuntimeError("boom")
    assert not names & set(list_netns())
    assert sleeper.poll() is not None and not proxy.running
    network.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        network.set_loss(0, 1.0)


_ORPHAN = """
import json, sys
from cotrain.netem import WanNetwork
net = WanNetwork(n_hosts=2, delay_ms=5)  # two delay agents
proxy = net.hosts[0].start_delay_proxy(target=("127.0.0.1", 9), delay_ms=1)
names = [h.name for h in net.hosts] + [net.switch]
print(json.dumps({"names": names, "tag": net.tag}), flush=True)
sys.stdin.read()
"""


@pytest.mark.netns
@pytest.mark.timeout(30)
def test_killed_parent_leaves_leftovers_that_cleanup_removes() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    try:
        info = read_json_line(parent, 20.0, "the orphaning parent")
        names = set(info["names"])
        pids = [pid for name in names for pid in netns_pids(name)]
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    assert len(pids) == 3  # the proxy and two agents
    assert names <= set(list_netns())
    folders = glob.glob(os.path.join(tempfile.gettempdir(), f"{info['tag']}-*"))
    assert len(folders) == 1  # the agents' control sockets
    # The proxy and the agents notice their parent is gone and exit on their own.
    _wait_until(lambda: not any(map(_pid_alive, pids)), 5.0, "the orphaned proxies to exit")
    done = subprocess.run(
        [sys.executable, "-m", "cotrain.netem", "cleanup"],
        capture_output=True, text=True, timeout=30, env=child_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for leftover in [*names, *folders]:
        assert f"removed {leftover}" in done.stdout, done.stdout
    assert not names & set(list_netns())
    assert not os.path.exists(folders[0])
