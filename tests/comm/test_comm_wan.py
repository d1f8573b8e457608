"""cotrain.comm on an emulated WAN: 4 peers and a master, each host in its own network namespace.

Every host's link is shaped to 100 Mbit/s each way (tbf) and every server (each peer's data
server, the master) sits behind a delay proxy adding 20 ms each way, so a ring connection
crosses two shaped links and one proxy, as in ``bench/allreduce.py --wan``. Peers listen on
0.0.0.0:DATA_PORT of their host and advertise the proxy's address. Processes are real
(``cotrain master`` / ``cotrain peer``); every namespace is removed by ``WanNetwork.close()``.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cotrain.comm.config import CommConfig
from cotrain.comm.ring import bounds
from cotrain.demo.peer import PeerProgramConfig, base_input, make_input
from cotrain.launch.procs import Proc, start_master, start_peer
from cotrain.netem import WanNetwork
from cotrain.netem.netns import in_ns, list_netns

SECRET = "wan-test-secret"
WORLD = 4
RATE_MBIT = 100.0
DELAY_MS = 20.0
DATA_PORT = 47000  # the same in every host: each host is its own namespace
# The 5 emulated machines share this one's cores with whatever else runs (other tests): give
# master and peers the priority the delay proxies take, so the timing measures the protocol.
NICE = ["nice", "-n", "-10"]
SEED = 7
EVENT_TIMEOUT_S = 45.0

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@dataclass
class RingRun:
    """What the peers reported: per peer, its ``round`` events in order."""

    rounds: dict[int, list[dict[str, Any]]]  # peer index -> round events

    def slowest(self, rnd: int) -> float:
        """Seconds of round ``rnd``'s all-reduce on the slowest peer."""
        return max(events[rnd]["seconds"] for events in self.rounds.values())


@pytest.fixture
def wan() -> Iterator[WanNetwork]:
    """Hosts 0..3 for the peers, host 4 for the master; all namespaces gone afterwards."""
    net = WanNetwork(n_hosts=WORLD + 1, rate_mbit=RATE_MBIT)
    names = [net.switch] + [h.name for h in net.hosts]
    try:
        yield net
    finally:
        net.close()
    assert not set(names) & set(list_netns()), "a namespace of this test survived close()"


def _run_ring(net: WanNetwork, *, numel: int, rounds: int, out_dir: Path | None = None) -> RingRun:
    """Run ``rounds`` fp32 sum all-reduces of ``numel`` values over the WAN; stop everything."""
    mhost = net.hosts[WORLD]
    master, port = start_master(SECRET, host=mhost.ip, wrapper=NICE + in_ns(mhost.name, []))
    procs: list[Proc] = []
    try:
        # The proxies belong to their hosts: WanNetwork.close() stops them too.
        mproxy = mhost.start_delay_proxy(target=(mhost.ip, port), delay_ms=DELAY_MS)
        for i, host in enumerate(net.hosts[:WORLD]):
            proxy = host.start_delay_proxy(target=("127.0.0.1", DATA_PORT), delay_ms=DELAY_MS)
            comm = CommConfig(
                master_host=mhost.ip,
                master_port=mproxy.port,
                listen_host="0.0.0.0",
                listen_port=DATA_PORT,
                advertise_host=host.ip,
                advertise_port=proxy.port,
                # a lost SYN is sent again after 1 s, then 2 s, then 4 s: with 2% loss on every
                # link, one of the 4 x 4 ring streams (each a handshake through two lossy
                # links) now and then takes longer than the 10 s default to connect
                connect_timeout_s=30.0,
            )
            cfg = PeerProgramConfig(
                comm=comm,
                index=i,
                seed=SEED,
                numel=numel,
                rounds=rounds,
                world=WORLD,
                op="sum",
                barrier=True,  # time the all-reduce from a common start, as the benchmark does
                out_dir=str(out_dir) if out_dir is not None else None,
            )
            procs.append(start_peer(cfg, SECRET, wrapper=NICE + in_ns(host.name, [])))
        result: dict[int, list[dict[str, Any]]] = {}
        for i, proc in enumerate(procs):
            events = []
            while True:
                ev = proc.next_event(EVENT_TIMEOUT_S)
                assert ev["event"] != "failed", f"peer {i} failed: {ev}\n" + "\n".join(
                    proc.lines[-20:]
                )
                if ev["event"] == "round":
                    events.append(ev)
                if ev["event"] == "done":
                    break
            assert [ev["round"] for ev in events] == list(range(rounds))
            result[i] = events
        return RingRun(result)
    except BaseException:
        for proc in [*procs, master]:  # what every process said, to tell a stall from a fault
            print(f"--- {proc.name}\n" + "\n".join(proc.lines[-40:]))
        raise
    finally:
        for proc in procs:
            proc.stop()
        master.stop()


def _assert_same_digests(run: RingRun) -> None:
    for rnd in range(len(run.rounds[0])):
        digests = {i: events[rnd]["digest"] for i, events in run.rounds.items()}
        assert len(set(digests.values())) == 1, f"round {rnd}: peers disagree: {digests}"


def _ring_sum(inputs: dict[int, np.ndarray], ring: list[str]) -> np.ndarray:
    """The exact fp32 sum the ring computes: block b is summed in ring order from rank b.

    Reduce-scatter step 0 sends block r from rank r; each next rank adds its own values, so
    block b is ((x[b] + x[b+1]) + x[b+2]) + x[b+3] with ranks mod N (see ``ring.py``).
    """
    n = len(ring)
    by_rank = [inputs[int(peer_id.removeprefix("p"))] for peer_id in ring]
    out = np.empty_like(by_rank[0])
    for b, (lo, hi) in enumerate(bounds(0, out.size, n)):
        acc = by_rank[b][lo:hi].copy()
        for k in range(1, n):
            acc += by_rank[(b + k) % n][lo:hi]
        out[lo:hi] = acc
    return out


@pytest.mark.timeout(60)
def test_four_peers_all_reduce_near_the_ring_bound(wan: WanNetwork) -> None:
    numel = 4 << 20  # 16 MiB of fp32: the ring bound is 2 s on 100 Mbit/s links
    rounds = 3  # one warm-up, two timed
    run = _run_ring(wan, numel=numel, rounds=rounds)
    _assert_same_digests(run)
    bound_s = 2 * (WORLD - 1) / WORLD * numel * 4 * 8 / (RATE_MBIT * 1e6)
    took_s = statistics.median(run.slowest(r) for r in range(1, rounds))
    # Below the bound would mean bytes bypassed the shaped links; 1.5x leaves room for TCP/IP
    # headers (~5%), the 20 ms hops, the agreement round trip to the master and a busy CPU.
    assert 0.95 * bound_s < took_s < 1.5 * bound_s, (took_s, bound_s)


@pytest.mark.timeout(90)
def test_four_peers_survive_two_percent_loss_with_exact_results(
    wan: WanNetwork, tmp_path: Path
) -> None:
    for i in range(len(wan.hosts)):  # every link, both ways: ring paths cross two lossy links
        wan.set_loss(i, 2.0)
    numel = 1 << 20  # 4 MiB of fp32
    rounds = 3
    run = _run_ring(wan, numel=numel, rounds=rounds, out_dir=tmp_path)
    dropped = sum(wan.drop_counts(i).total for i in range(len(wan.hosts)))
    assert dropped > 100, f"the loss rules dropped only {dropped} packets"
    _assert_same_digests(run)
    bases = {i: base_input(SEED, i, numel) for i in range(WORLD)}
    for rnd in range(rounds):
        results = [np.load(tmp_path / f"r{rnd}_p{i}.npy") for i in range(WORLD)]
        for i in range(1, WORLD):
            np.testing.assert_array_equal(results[i], results[0])  # bit-identical everywhere
        inputs = {i: make_input(SEED, i, rnd, numel, bases[i]) for i in range(WORLD)}
        np.testing.assert_array_equal(results[0], _ring_sum(inputs, run.rounds[0][rnd]["ring"]))
        reference = np.sum(np.stack(list(inputs.values())), axis=0, dtype=np.float64)
        np.testing.assert_allclose(results[0], reference, rtol=1e-5, atol=1e-5)
