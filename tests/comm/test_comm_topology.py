"""Ring order from measured bandwidth: the solver, and probing + reordering on live peers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from comm_harness import cluster, parallel

from cotrain.comm.topology import best_ring, ring_score


def test_best_ring_maximises_the_slowest_link() -> None:
    peers = ["a", "b", "c", "d", "e"]
    bw = {(x, y): 100.0 for x in peers for y in peers if x != y}
    # a slow pair in both directions must not be ring neighbours
    for x, y in [("a", "b"), ("b", "a"), ("c", "d"), ("d", "c")]:
        bw[(x, y)] = 1.0
    order = best_ring(peers, bw)
    assert order[0] == "a" and sorted(order) == sorted(peers)
    assert ring_score(order, bw)[0] == 100.0
    brute = max(ring_score(["a", *p], bw) for p in itertools.permutations(peers[1:]))
    assert ring_score(order, bw) == brute


def test_large_worlds_use_the_heuristic_and_stay_valid() -> None:
    rng = np.random.default_rng(0)
    peers = [f"p{i}" for i in range(14)]
    bw = {(x, y): float(rng.uniform(1, 100)) for x in peers for y in peers if x != y}
    order = best_ring(peers, bw)
    assert sorted(order) == sorted(peers)
    assert ring_score(order, bw) >= ring_score(peers, bw)


@pytest.mark.timeout(60)
def test_optimize_topology_probes_and_reorders_consistently() -> None:
    with cluster(4) as (_, comms):
        before = comms[0].epoch
        rings = parallel([lambda c=c: c.optimize_topology(probe_mb=0.25) for c in comms])
        assert all(r == rings[0] for r in rings)
        assert sorted(rings[0]) == sorted(c.peer_id for c in comms)
        assert all(c.epoch == before + 1 for c in comms)
        xs = [np.full(1000, 1.0, np.float32) for _ in comms]
        parallel(
            [lambda c=c, x=x: c.all_reduce(x, op="sum") for c, x in zip(comms, xs, strict=True)]
        )
        assert all(np.all(x == 4) for x in xs)
