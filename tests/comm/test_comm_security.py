"""Bad input never crashes or wedges the master or a peer: wrong secrets, garbage, oversized and
malformed frames, half-open connections; peers that disagree get typed errors on all sides."""

from __future__ import annotations

import socket
import struct
import subprocess

import numpy as np
import pytest
from comm_harness import MasterThread, cluster, handshake, parallel, parallel_outcomes, peer_config

from cotrain.comm import (
    AuthError,
    CommConfig,
    Communicator,
    MasterUnreachableError,
    MismatchError,
    RevisionError,
    TLSConfig,
)
from cotrain.comm.frames import MAGIC, VERSION, pack_json, recv_json


def _raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


@pytest.mark.timeout(60)
def test_wrong_secret_is_refused_by_master_and_peers() -> None:
    with cluster(2) as (master, comms):
        bad = Communicator(CommConfig(master_port=master.port, secret="wrong", connect_timeout_s=2))
        with pytest.raises((AuthError, MasterUnreachableError)):
            bad.connect(timeout_s=2)
        bad.close()
        # straight to a peer's data port, with the wrong secret
        port = comms[0].data_port
        s = _raw(port)
        with pytest.raises(AuthError):
            handshake(s, "wrong")
        s.close()
        # the run is unaffected
        xs = [np.ones(1000, np.float32) for _ in comms]
        parallel(
            [lambda c=c, x=x: c.all_reduce(x, op="sum") for c, x in zip(comms, xs, strict=True)]
        )
        assert all(np.all(x == 2) for x in xs)


@pytest.mark.timeout(60)
def test_garbage_oversized_and_half_open_connections_do_not_wedge_anything() -> None:
    with cluster(2, heartbeat_timeout_s=2.0) as (master, comms):
        targets = [master.port, comms[0].data_port]
        idle = []
        for port in targets:
            # port scan: connect and leave at once
            _raw(port).close()
            # garbage instead of a handshake
            s = _raw(port)
            s.sendall(b"\x00GET / HTTP/1.1\r\n\r\n" * 100)
            s.close()
            # half-open: connect and say nothing (held open during the collective below)
            idle.append(_raw(port))
            # authenticated, then an oversized frame header
            s = _raw(port)
            handshake(s)
            s.sendall(struct.pack("!2sBBI", MAGIC, VERSION, 1, 1 << 31))
            s.settimeout(5)
            assert s.recv(1) == b""  # dropped
            s.close()
            # authenticated, then a frame that is not JSON, then wrong magic
            for payload in (
                struct.pack("!2sBBI", MAGIC, VERSION, 1, 5) + b"\xff\xfe{{{",
                b"XX" + b"\x01\x01\x00\x00\x00\x02{}",
            ):
                s = _raw(port)
                handshake(s)
                s.sendall(payload)
                s.settimeout(5)
                assert s.recv(1) == b""
                s.close()
        # a schema-invalid hello to the master
        s = _raw(master.port)
        handshake(s)
        s.sendall(pack_json({"type": "hello", "peer_id": "x" * 500, "host": "h", "port": 0}))
        s.settimeout(5)
        assert s.recv(1) == b""
        s.close()
        # everything still works with the half-open sockets still open
        xs = [np.full(5000, 3.0, np.float32) for _ in comms]
        parallel(
            [lambda c=c, x=x: c.all_reduce(x, op="sum") for c, x in zip(comms, xs, strict=True)]
        )
        assert all(np.all(x == 6) for x in xs)
        for s in idle:
            s.close()


@pytest.mark.timeout(60)
def test_mismatched_shapes_dtypes_ops_raise_on_every_peer_and_leave_inputs() -> None:
    with cluster(3) as (_, comms):
        cases = [
            [np.ones(10, np.float32), np.ones(10, np.float32), np.ones(11, np.float32)],
            [np.ones(10, np.float32), np.ones(10, np.float16), np.ones(10, np.float32)],
        ]
        for xs in cases:
            before = [x.copy() for x in xs]
            outcomes = parallel_outcomes(
                [lambda c=c, x=x: c.all_reduce(x, op="sum") for c, x in zip(comms, xs, strict=True)]
            )
            assert all(isinstance(o, MismatchError) for o in outcomes), outcomes
            assert all(np.array_equal(a, b) for a, b in zip(xs, before, strict=True))
        ops = ["sum", "sum", "max"]
        outcomes = parallel_outcomes(
            [
                lambda c=c, op=op: c.all_reduce(np.ones(4, np.float32), op=op)
                for c, op in zip(comms, ops, strict=True)
            ]
        )
        assert all(isinstance(o, MismatchError) for o in outcomes)
        # mismatches do not break the ring
        xs = [np.ones(100, np.float32) for _ in comms]
        parallel(
            [lambda c=c, x=x: c.all_reduce(x, op="sum") for c, x in zip(comms, xs, strict=True)]
        )
        assert all(np.all(x == 3) for x in xs)


@pytest.mark.timeout(60)
def test_shared_state_majority_wins_and_revision_must_step_by_one() -> None:
    with cluster(3) as (_, comms):
        states = [
            {"w": np.full(100, 1.0, np.float32), "step": np.array([7], np.int64)} for _ in comms
        ]
        states[2]["w"][:] = 9.0  # the odd one out
        results = parallel(
            [
                lambda c=c, s=s, w=w: c.sync_shared_state(s, revision=1, weight=w)
                for c, s, w in zip(comms, states, [1.0, 2.0, 4.0], strict=True)
            ]
        )
        assert [r.fetched for r in results] == [False, False, True]
        assert [r.total_weight for r in results] == [3.0, 3.0, 3.0]  # the fetcher counts zero
        assert np.all(states[2]["w"] == 1.0) and results[2].bytes_received == 400
        assert all(c.revision == 1 for c in comms)
        outcomes = parallel_outcomes(
            [
                lambda c=c, s=s: c.sync_shared_state(s, revision=3)
                for c, s in zip(comms, states, strict=True)
            ]
        )
        assert all(isinstance(o, RevisionError) for o in outcomes), outcomes
        results = parallel(
            [
                lambda c=c, s=s: c.sync_shared_state(s, revision=2)
                for c, s in zip(comms, states, strict=True)
            ]
        )
        assert all(r.revision == 2 and not r.fetched for r in results)


def _self_signed(tmp_path) -> TLSConfig:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=cotrain-test",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return TLSConfig(cert_file=str(cert), key_file=str(key), ca_file=str(cert))


@pytest.mark.timeout(60)
def test_tls_everywhere(tmp_path) -> None:
    tls = _self_signed(tmp_path)
    master = MasterThread(tls=tls)
    comms = [Communicator(peer_config(master.port, tls=tls), name=f"t{i}") for i in range(2)]
    try:
        for c in comms:
            c.connect()
        parallel([lambda c=c: c.wait_for_world(2, timeout_s=20) for c in comms])
        xs = [np.full(10_000, 2.0, np.float32) for _ in comms]
        parallel(
            [lambda c=c, x=x: c.all_reduce(x, op="sum") for c, x in zip(comms, xs, strict=True)]
        )
        assert all(np.all(x == 4) for x in xs)
        plain = Communicator(peer_config(master.port, connect_timeout_s=2))
        with pytest.raises((MasterUnreachableError, OSError, AuthError)):
            plain.connect(timeout_s=2)
        plain.close()
    finally:
        for c in comms:
            c.close()
        master.stop()


@pytest.mark.timeout(30)
def test_frames_reject_garbage_directly() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"NOPE\x00\x00\x00\x00")
        from cotrain.comm.errors import ProtocolError

        with pytest.raises(ProtocolError, match="magic"):
            recv_json(b, 1024)


@pytest.mark.timeout(60)
def test_a_failed_collective_restores_every_input_exactly() -> None:
    from cotrain.comm import Fault, FaultPlan, PeerFailedError

    cut = FaultPlan(faults=[Fault(kind="cut", at_collective=0, after_chunks=3)])
    with cluster(3, faults={2: cut}, heartbeat_timeout_s=1.5, chunk_kb=8, stall_timeout_s=4.0) as (
        _,
        comms,
    ):
        for dtype in (np.float32,):
            xs = [np.random.default_rng(i).standard_normal(300_000).astype(dtype) for i in range(3)]
            before = [x.copy() for x in xs]
            outcomes = parallel_outcomes(
                [lambda c=c, x=x: c.all_reduce(x, op="sum") for c, x in zip(comms, xs, strict=True)]
            )
            assert all(isinstance(o, PeerFailedError) for o in outcomes), outcomes
            for x, b in zip(xs, before, strict=True):
                assert np.array_equal(x, b), "a failed all-reduce must leave the input as it was"


@pytest.mark.timeout(60)
def test_joiners_never_outvote_the_peers_that_hold_the_state() -> None:
    with cluster(1) as (master, comms):
        old = comms[0]
        state = {"w": np.full(64, 5.0, np.float32)}
        old.sync_shared_state(state, revision=0)
        old.sync_shared_state(state, revision=1)
        new = [Communicator(peer_config(master.port), name=f"j{i}") for i in range(2)]
        try:
            for c in new:
                c.connect()
            everyone = [old, *new]
            parallel([lambda c=c: c.wait_for_world(3, timeout_s=20) for c in everyone])
            states = [state] + [{"w": np.zeros(64, np.float32)} for _ in new]
            results = parallel(
                [
                    lambda c=c, s=s: c.sync_shared_state(s, revision=0 if c in new else 2)
                    for c, s in zip(everyone, states, strict=True)
                ]
            )
            assert [r.fetched for r in results] == [False, True, True]
            assert all(r.revision == 2 for r in results)
            assert all(np.all(s["w"] == 5.0) for s in states)
        finally:
            for c in new:
                c.close()
