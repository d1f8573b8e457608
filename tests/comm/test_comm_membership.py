"""Votes only when needed: the master announces joiners, a member that skipped a vote while
another voted is told to vote, and sequence numbers stay in step afterwards."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest
from comm_harness import cluster, parallel, peer_config

from cotrain.comm import Communicator, TopologyChangedError
from cotrain.core.clock import Deadline


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
