"""Votes only when needed: the master announces joiners, a member that skipped a vote while
another voted is told to vote, and sequence numbers stay in step afterwards."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from comm_harness import SECRET, cluster, parallel, peer_config, peers

from cotrain.comm import Communicator, TopologyChangedError
from cotrain.comm import communicator as communicator_mod
from cotrain.comm import messages as m
from cotrain.comm.communicator import REVOTE_S
from cotrain.comm.errors import RETRYABLE, CommError
from cotrain.core.clock import Deadline
from cotrain.demo.peer import PeerProgramConfig
from cotrain.launch.procs import start_peer


def _until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Wait (bounded) for a condition another thread or process makes true."""
    deadline = Deadline.after(timeout_s)
    while not check():
        deadline.check(what)
        threading.Event().wait(0.01)


@pytest.mark.timeout(60)
def test_members_vote_when_the_master_announces_a_joiner() -> None:
    with cluster(2) as (master, comms):
        assert not any(c.vote_wanted for c in comms)
        state = [{"w": np.ones(8, np.float32)} for _ in comms]
        parallel(
            [
                lambda c=c, s=s: c.sync_shared_state(s, revision=0)
                for c, s in zip(comms, state, strict=True)
            ]
        )
        joiner = Communicator(peer_config(master.port), name="j")
        try:
            joiner.connect()
            assert joiner.vote_wanted  # not in the ring yet
            admitted = threading.Thread(target=joiner.update_topology, daemon=True)
            admitted.start()
            _until(lambda: all(c.vote_wanted for c in comms), "the joining announcement")
            parallel([c.update_topology for c in comms])
            admitted.join(10)
            assert [c.world_size for c in (*comms, joiner)] == [3, 3, 3]
            assert not any(c.vote_wanted for c in (*comms, joiner))
        finally:
            joiner.close()


@pytest.mark.timeout(60)
def test_a_member_that_skipped_the_vote_is_told_to_vote_and_stays_in_step() -> None:
    with cluster(2, request_timeout_s=10.0) as (master, comms):
        a, b = comms
        voted = threading.Thread(target=a.update_topology, daemon=True)
        voted.start()
        _until(lambda: master.call(lambda: a.peer_id in master.master._votes), "p0's vote")
        state = {"w": np.ones(8, np.float32)}
        with pytest.raises(TopologyChangedError):
            b.sync_shared_state(state, revision=0)  # its phase number 0 is spent
        b.update_topology()
        voted.join(10)
        # both start again from phase 0 of the epoch: the collectives match up
        x = [np.full(4, float(i + 1), np.float32) for i in range(2)]
        parallel(
            [lambda c=c, t=t: c.all_reduce(t, op="sum") for c, t in zip(comms, x, strict=True)]
        )
        assert all(np.all(t == 3.0) for t in x)


class _Front:
    """A TCP port in front of (or instead of) a peer's data server; ``_take`` handles each
    connection it accepts. ``close`` ends the accept loop and every connection kept."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._open: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.accepted += 1
            self._take(conn)

    def _take(self, conn: socket.socket) -> None:
        self._open.append(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        self.sock.close()
        for s in self._open:
            s.close()


class _FlakyFront(_Front):
    """It resets the first connection it gets, as a link that drops one attempt, and forwards
    every later one to ``target`` (set once known)."""

    target: int | None = None

    def _take(self, conn: socket.socket) -> None:
        if self.accepted == 1 or self.target is None:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # a reset
            return
        up = socket.create_connection(("127.0.0.1", self.target), timeout=5)
        self._open += [conn, up]
        for src, dst in ((conn, up), (up, conn)):
            threading.Thread(target=_pipe, args=(src, dst), daemon=True).start()


class _Silent(_Front):
    """It accepts connections and never answers: a host that took the SYN but whose peer
    process is gone or stuck, so a dial to it waits for its timeout (the base behaviour)."""


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _connected(c: Communicator, n: int) -> bool:
    """``c`` is in a ring of ``n`` whose connections are made (``world_size`` counts a ring
    from the moment its topology arrives)."""
    return c.world_size == n and c._ms.links is not None


def _ring_of_two_again(
    comms: list[Communicator],
    epoch: int,
    since: float,
    within_s: float,
    waits: list[dict[str, BaseException | None]],
) -> None:
    """The first two of ``comms`` (those left) form a ring of two in an epoch after ``epoch``,
    within ``within_s`` of ``since``, and still wait for more peers."""
    _until(
        lambda: all(c.epoch > epoch and c.world_size == 2 for c in comms[:2]),
        "the two left to form a ring of two",
        30,
    )
    assert time.monotonic() - since < within_s
    assert not any(waits[:2])  # both still wait for a fourth


def _waiting(c: Communicator, n: int, timeout_s: float) -> dict[str, BaseException | None]:
    """Run ``c.wait_for_world(n)`` in a thread; the dict gets ``"ended"`` (None or the error
    it raised) once the wait is over."""
    out: dict[str, BaseException | None] = {}

    def wait() -> None:
        try:
            c.wait_for_world(n, timeout_s=timeout_s)
            out["ended"] = None
        except BaseException as e:  # what the waiting thread saw
            out["ended"] = e

    threading.Thread(target=wait, daemon=True).start()
    return out


@pytest.mark.timeout(60)
def test_a_ring_that_fails_to_connect_is_formed_again_without_waiting_out_the_timeout() -> None:
    # One ring connection to peer 2 is reset. Its dialer fails at once and tells the master,
    # which aborts the epoch: the peer waiting for that neighbour stops waiting (instead of
    # for connect_timeout_s), and wait_for_world votes again rather than giving up.
    front = _FlakyFront()
    connect_timeout_s = 20.0
    fronted = lambda i: {"advertise_port": front.port} if i == 2 else {}  # noqa: E731
    try:
        with peers(3, per_peer=fronted, connect_timeout_s=connect_timeout_s) as (_, comms):
            for c in comms:
                c.connect()
            front.target = comms[2].data_port
            x = [np.full(64, i + 1, np.float32) for i in range(3)]

            def join_and_reduce(c: Communicator, t: np.ndarray) -> None:
                c.wait_for_world(3, timeout_s=40)
                for _ in range(5):  # as a training loop does: a peer may have formed its part
                    try:  # of the ring before the abort reached it, and learns of it here
                        c.all_reduce(t, op="sum")
                        return
                    except RETRYABLE:
                        c.update_topology(timeout_s=30)

            t0 = time.monotonic()
            parallel(
                [lambda c=c, t=t: join_and_reduce(c, t) for c, t in zip(comms, x, strict=True)]
            )
            took = time.monotonic() - t0
            assert front.accepted > 1  # the reset happened, and the ring still formed
            assert took < connect_timeout_s / 2, took
            assert len({c.epoch for c in comms}) == 1 and all(c.world_size == 3 for c in comms)
            assert all(np.all(t == 6) for t in x)
    finally:
        front.close()


@pytest.mark.timeout(60)
def test_waiting_for_the_world_votes_again_when_a_joiner_comes_not_in_a_loop() -> None:
    votes: list[float] = []
    with peers(3) as (_, comms):
        for c in comms[:2]:
            c.connect()
            link = c._ms.link
            send = link.send

            def counting(msg: object, send: Callable[[object], int] = send) -> int:
                if isinstance(msg, m.Vote):
                    votes.append(time.monotonic())
                return send(msg)

            link.send = counting  # type: ignore[method-assign]
        waits = [_waiting(c, 3, 40) for c in comms[:2]]
        _until(lambda: all(c.world_size == 2 for c in comms[:2]), "a ring of two")
        idle_from = time.monotonic()
        threading.Event().wait(3.0)  # the window whose votes are counted, not a synchronisation
        idle = [v for v in votes if v >= idle_from]
        assert len(idle) <= 2 * (3.0 / REVOTE_S + 1), f"{len(idle)} votes in 3 s of waiting"
        comms[2].connect()
        joined = time.monotonic()
        comms[2].wait_for_world(3, timeout_s=30)
        _until(lambda: all("ended" in w for w in waits), "the two to see the third", 30)
        assert all(w["ended"] is None for w in waits), waits
        assert time.monotonic() - joined < 10
        assert all(c.world_size == 3 for c in comms)


@pytest.mark.timeout(60)
def test_closing_a_peer_ends_its_wait_for_the_world_at_once() -> None:
    with peers(1) as (_, (comm,)):
        comm.connect()
        wait = _waiting(comm, 2, 30)
        _until(lambda: comm.world_size == 1, "a ring of one")
        closed = time.monotonic()
        comm.close()
        _until(lambda: "ended" in wait, "the wait to end", 10)
        assert time.monotonic() - closed < 5
        assert isinstance(wait["ended"], CommError), wait  # not a TimeoutExpired 30 s later


@pytest.mark.timeout(60)
def test_a_short_ring_that_loses_a_member_votes_again_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # While waiting for a fourth peer, one of three is killed: the master aborts the epoch and
    # the two left vote for the next one at once, not after REVOTE_S (made long here to tell).
    monkeypatch.setattr(communicator_mod, "REVOTE_S", 20.0)
    with peers(2) as (master, comms):
        for c in comms:
            c.connect()
        waits = [_waiting(c, 4, 40) for c in comms]  # never: a fourth does not come
        comm = peer_config(master.port, heartbeat_interval_s=0.25)
        victim = start_peer(PeerProgramConfig(comm=comm, index=2, world=4, rounds=1), SECRET)
        try:
            _until(lambda: all(c.world_size == 3 for c in comms), "a ring of three", 30)
            epoch = comms[0].epoch
            killed = time.monotonic()
            victim.popen.send_signal(signal.SIGKILL)
            _ring_of_two_again(comms, epoch, killed, 10, waits)
        finally:
            victim.stop()


@pytest.mark.timeout(60)
def test_a_short_ring_that_a_member_leaves_cleanly_votes_again_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As above, but the member says bye: the master aborts the epoch all the same.
    monkeypatch.setattr(communicator_mod, "REVOTE_S", 20.0)
    with peers(3) as (_, comms):
        for c in comms:
            c.connect()
        waits = [_waiting(c, 4, 40) for c in comms]
        _until(lambda: all(_connected(c, 3) for c in comms), "a ring of three", 30)
        epoch = comms[0].epoch
        left = time.monotonic()
        comms[2].close()
        _ring_of_two_again(comms, epoch, left, 10, waits)


@pytest.mark.timeout(60)
def test_a_member_that_leaves_while_the_ring_forms_is_not_dialled_until_the_timeout() -> None:
    # p2 advertises a port that accepts and never answers, so whoever dials it waits; p2 then
    # leaves cleanly. Nothing is in flight, so the master aborts the epoch and the dial ends.
    connect_timeout_s = 20.0
    hole = _Silent()
    silent = lambda i: {"advertise_port": hole.port} if i == 2 else {}  # noqa: E731
    try:
        with peers(3, per_peer=silent, connect_timeout_s=connect_timeout_s) as (_, comms):
            # p0 and p1 first, so that the ring that dials p2 is the ring of three
            waits = []
            for c in comms[:2]:
                c.connect()
                waits.append(_waiting(c, 4, 50))
            _until(lambda: all(_connected(c, 2) for c in comms[:2]), "a ring of two", 30)
            comms[2].connect()
            waits.append(_waiting(comms[2], 4, 50))
            _until(lambda: hole.accepted > 0, "a dial to the silent port", 30)
            _until(lambda: all(c.world_size == 3 for c in comms), "a ring of three")
            epoch = max(c.epoch for c in comms)
            left = time.monotonic()
            comms[2].close()
            _ring_of_two_again(comms, epoch, left, connect_timeout_s / 2, waits)
    finally:
        hole.close()


@pytest.mark.timeout(60)
def test_a_dial_to_a_member_that_dies_ends_when_the_master_aborts() -> None:
    # The third member advertises a port that accepts and never answers, so the member before
    # it in the ring dials for up to connect_timeout_s. It is killed meanwhile: the master
    # aborts the epoch and the dial is given up at once, so the two left form a ring of two
    # long before the dial would have timed out.
    connect_timeout_s = 20.0
    hole = _Silent()
    try:
        with peers(2, connect_timeout_s=connect_timeout_s) as (master, comms):
            for c in comms:
                c.connect()
            waits = [_waiting(c, 4, 50) for c in comms]  # never: a fourth does not come
            _until(lambda: all(_connected(c, 2) for c in comms), "a ring of two", 30)
            comm = peer_config(
                master.port,
                heartbeat_interval_s=0.25,
                connect_timeout_s=connect_timeout_s,
                advertise_port=hole.port,
            )
            victim = start_peer(PeerProgramConfig(comm=comm, index=2, world=4, rounds=1), SECRET)
            try:
                _until(lambda: hole.accepted > 0, "a dial to the silent port", 30)
                _until(lambda: all(c.world_size == 3 for c in comms), "a ring of three")
                epoch = max(c.epoch for c in comms)
                killed = time.monotonic()
                victim.popen.send_signal(signal.SIGKILL)
                _ring_of_two_again(comms, epoch, killed, connect_timeout_s / 2, waits)
            finally:
                victim.stop()
    finally:
        hole.close()
