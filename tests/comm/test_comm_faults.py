"""Failures with real processes: kill -9, SIGSTOP and a cut link mid-collective, a joiner that
receives the shared state, and a master restart. Survivors must raise within 5 s, retry with the
survivors, and end with bit-identical, exact results."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import numpy as np
import pytest

from cotrain.comm import CommConfig, Fault, FaultPlan
from cotrain.demo.peer import PeerProgramConfig, make_input
from cotrain.launch.procs import Proc, start_master, start_peer

SECRET = "fault-secret"
NUMEL = 1 << 20  # 4 MiB fp32; with 64 KiB chunks each stream sends several chunks per step
SEED = 11


def config(port: int, index: int, **kw) -> PeerProgramConfig:
    comm = CommConfig(
        master_port=port,
        chunk_kb=64,
        streams=2,
        heartbeat_interval_s=0.25,
        stall_timeout_s=30.0,
        master_reconnect_timeout_s=30.0,
    )
    base = dict(comm=comm, index=index, numel=NUMEL, seed=SEED, op="sum", world=4, rounds=4)
    base.update(kw)
    return PeerProgramConfig(**base)


def collect(proc: Proc, timeout_s: float = 60.0) -> list[dict]:
    events = []
    while True:
        ev = proc.next_event(timeout_s)
        events.append(ev)
        if ev["event"] == "done":
            return events


def check_round(out_dir: Path, rnd: int, contributors: list[int], holders: list[int]) -> None:
    """Every holder has the same bytes, equal (to fp32 rounding) to the contributors' sum."""
    results = [np.load(out_dir / f"r{rnd}_p{i}.npy") for i in holders]
    for r in results[1:]:
        assert np.array_equal(r, results[0]), f"round {rnd}: peers differ"
    expect = sum(make_input(SEED, i, rnd, NUMEL).astype(np.float64) for i in contributors)
    assert np.allclose(results[0], expect, rtol=0, atol=1e-4)


@pytest.fixture
def master():
    proc, port = start_master(SECRET, args=["heartbeat_timeout_s=3.0"])
    yield port
    proc.stop()


def run_fault(port: int, tmp_path: Path, kind: str) -> None:
    victim = 3
    plan = FaultPlan(faults=[Fault(kind=kind, at_collective=1, after_chunks=2)])  # type: ignore[arg-type]
    procs = [
        start_peer(
            config(port, i, out_dir=str(tmp_path), faults=plan if i == victim else FaultPlan()),
            SECRET,
        )
        for i in range(4)
    ]
    try:
        survivors = [0, 1, 2]
        for i in survivors:
            events = collect(procs[i])
            failed = [e for e in events if e["event"] == "failed"]
            assert failed, f"peer {i} never saw the failure"
            assert failed[0]["round"] == 1
            assert failed[0]["seconds"] < 5.0, f"detection took {failed[0]['seconds']:.2f}s"
            rounds = {e["round"]: e for e in events if e["event"] == "round"}
            assert sorted(rounds) == [0, 1, 2, 3]
            assert rounds[0]["world"] == 4 and rounds[1]["world"] == 3
        check_round(tmp_path, 0, [0, 1, 2, 3], [*survivors, victim])
        for rnd in (1, 2, 3):
            check_round(tmp_path, rnd, survivors, survivors)
    finally:
        if procs[victim].popen.poll() is None:
            procs[victim].popen.send_signal(signal.SIGKILL)
        for p in procs:
            p.stop()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("attempt", range(3))
def test_kill_9_mid_collective(master: int, tmp_path: Path, attempt: int) -> None:
    run_fault(master, tmp_path, "kill")


@pytest.mark.timeout(90)
def test_sigstop_mid_collective(master: int, tmp_path: Path) -> None:
    run_fault(master, tmp_path, "stall")


@pytest.mark.timeout(90)
def test_cut_link_mid_collective(master: int, tmp_path: Path) -> None:
    run_fault(master, tmp_path, "cut")


@pytest.mark.timeout(90)
def test_joiner_receives_shared_state(master: int, tmp_path: Path) -> None:
    many = 100_000  # the first peers run until stopped; the joiner is checked over 10 rounds
    procs = [
        start_peer(config(master, i, world=3, rounds=many, numel=4096), SECRET) for i in range(3)
    ]
    try:
        procs[0].wait_for("round", 30, round=5)
        joiner = start_peer(config(master, 3, join=True, rounds=many, numel=4096), SECRET)
        procs.append(joiner)
        rounds = [joiner.wait_for("round", 30) for _ in range(10)]
        first = rounds[0]["round"]
        assert first >= 5, "the joiner must learn the current round from the shared state"
        assert all(e["world"] == 4 for e in rounds)
        assert [e["round"] for e in rounds] == list(range(first, first + 10))
        seen: dict[int, str] = {}
        while rounds[-1]["round"] not in seen:
            ev = procs[0].wait_for("round", 30)
            seen[ev["round"]] = ev["digest"]
        for e in rounds:
            assert e["digest"] == seen[e["round"]], "joiner and peers must agree bit for bit"
    finally:
        for p in procs:
            p.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(120)
def test_master_restart_the_run_goes_on(tmp_path: Path) -> None:
    port = _free_port()
    m1, _ = start_master(SECRET, port=port)
    procs = [
        start_peer(config(port, i, world=3, rounds=30, numel=65536, out_dir=str(tmp_path)), SECRET)
        for i in range(3)
    ]
    m2 = None
    try:
        procs[0].wait_for("round", 30, round=4)
        m1.popen.send_signal(signal.SIGKILL)
        m1.popen.wait(10)
        m2, _ = start_master(SECRET, port=port)
        finals = []
        for i, p in enumerate(procs):
            events = collect(p, timeout_s=90)
            rounds = [e for e in events if e["event"] == "round"]
            first = 5 if i == 0 else 0  # rounds 0-4 of peer 0 were read above
            assert [e["round"] for e in rounds] == list(range(first, 30))
            assert all(e["world"] == 3 for e in rounds)
            finals.append(rounds[-1]["digest"])
        assert len(set(finals)) == 1
        r = [np.load(tmp_path / f"r29_p{i}.npy") for i in range(3)]
        expect = sum(make_input(SEED, i, 29, 65536).astype(np.float64) for i in range(3))
        assert np.allclose(r[0], expect, atol=1e-4)
    finally:
        for p in procs:
            p.stop()
        m1.stop()
        if m2 is not None:
            m2.stop()


@pytest.mark.timeout(150)
def test_a_peer_dropped_for_silence_rejoins_when_it_wakes(master: int) -> None:
    many = 100_000
    procs = [
        start_peer(config(master, i, world=3, rounds=many, numel=4096), SECRET) for i in range(3)
    ]
    try:
        procs[0].wait_for("round", 30, round=3)
        procs[2].popen.send_signal(signal.SIGSTOP)
        procs[0].wait_for("round", 30, world=2)  # dropped after the heartbeat timeout
        procs[2].popen.send_signal(signal.SIGCONT)
        try:
            back = procs[0].wait_for("round", 60, world=3)  # it reconnected and joined again
        except Exception:
            print("\n".join(procs[2].lines[-40:]))
            raise
        seen = procs[2].wait_for("round", 30, world=3)
        while seen["round"] < back["round"]:
            seen = procs[2].wait_for("round", 30)
        while back["round"] < seen["round"]:
            back = procs[0].wait_for("round", 30)
        assert seen["digest"] == back["digest"]
    finally:
        for p in procs:
            p.popen.send_signal(signal.SIGCONT)
            p.stop()


@pytest.mark.timeout(90)
def test_all_reduce_with_retry_finishes_with_the_survivors() -> None:
    from comm_harness import cluster, parallel_outcomes

    from cotrain.comm import all_reduce_with_retry
    from cotrain.core.errors import CotrainError

    cut = FaultPlan(faults=[Fault(kind="cut", at_collective=0, after_chunks=1)])
    with cluster(
        3,
        faults={2: cut},
        heartbeat_timeout_s=1.0,
        stall_timeout_s=4.0,
        master_reconnect_timeout_s=5.0,
    ) as (_, comms):
        inputs = [np.full(50_000, i + 1, dtype=np.float32) for i in range(3)]
        tensors = [x.copy() for x in inputs]
        out = parallel_outcomes(
            [
                lambda c=c, t=t: all_reduce_with_retry(
                    c, t, op="sum", attempts=3, rejoin_timeout_s=8
                )
                for c, t in zip(comms, tensors, strict=True)
            ],
            timeout_s=80,
        )
        assert isinstance(out[2], CotrainError), out[2]  # the cut peer gives up, in time
        np.testing.assert_array_equal(tensors[2], inputs[2])  # ... with its input restored
        for i in (0, 1):
            assert out[i].world_size == 2, out[i]
            np.testing.assert_array_equal(tensors[i], inputs[0] + inputs[1])


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("dtype", "buffer", "tol"),
    [("fp32", "torch", 1e-4), ("fp16", "numpy", 0.02), ("bf16", "numpy", 0.1)],
)
def test_scripted_peers_reduce_each_input_kind(
    master: int, tmp_path: Path, dtype: str, buffer: str, tol: float
) -> None:
    """The peer program's other inputs (a torch-allocated fp32 tensor, fp16 and bf16 tensors)
    are refilled in place every round and reduced to the same bytes everywhere."""
    procs = [
        start_peer(
            config(master, i, world=2, rounds=2, dtype=dtype, buffer=buffer, out_dir=str(tmp_path)),
            SECRET,
        )
        for i in range(2)
    ]
    try:
        for p in procs:
            assert collect(p)[-1]["event"] == "done"
    finally:
        for p in procs:
            p.stop()
    for rnd in range(2):
        a, b = (np.load(tmp_path / f"r{rnd}_p{i}.npy") for i in range(2))
        assert np.array_equal(a, b)
        expect = sum(make_input(SEED, i, rnd, NUMEL).astype(np.float64) for i in range(2))
        assert np.abs(a - expect).max() < tol


def test_a_link_closed_under_a_transfer_is_a_dead_peer_not_a_crash() -> None:
    """A fault handled on another thread can close a ring link just as a transfer sets its
    timeouts (seen once in the chaos run as EBADF); the transfer must fail as a lost peer,
    which the retry loop handles, not crash the process with an OSError."""
    from cotrain.comm.errors import PeerFailedError
    from cotrain.comm.ring import kernel_timeouts

    a, b = socket.socketpair()
    b.close()
    a.close()
    with pytest.raises(PeerFailedError, match="ring link closed"):
        kernel_timeouts(a, 5.0)
