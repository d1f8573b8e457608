"""Ring order from a measured bandwidth matrix.

A ring all-reduce moves the same bytes over every link at once, so its time is set by the slowest
link: we pick the ring that maximises the minimum link bandwidth (a bottleneck travelling-salesman
problem over an asymmetric matrix), breaking ties by the larger sum of 1/bandwidth saved. Exact
search over all rings for up to 9 peers; beyond that, a greedy tour improved by 2-opt moves.
"""

from __future__ import annotations

import itertools

Bandwidth = dict[tuple[str, str], float]


def ring_score(order: list[str], bw: Bandwidth) -> tuple[float, float]:
    """(slowest link, -sum of 1/bw): larger is better."""
    if len(order) < 2:
        return (float("inf"), 0.0)
    links = [bw.get((a, b), 0.0) for a, b in zip(order, order[1:] + order[:1], strict=True)]
    return (min(links), -sum(1.0 / max(x, 1e-9) for x in links))


def best_ring(peers: list[str], bw: Bandwidth) -> list[str]:
    """A ring order over ``peers`` maximising the slowest link; starts with ``peers[0]``."""
    if len(peers) <= 3:
        if len(peers) == 3:
            a, b, c = peers
            return max([[a, b, c], [a, c, b]], key=lambda o: ring_score(o, bw))
        return list(peers)
    first, rest = peers[0], peers[1:]
    if len(peers) <= 9:
        best = max(
            ([first, *perm] for perm in itertools.permutations(rest)),
            key=lambda o: ring_score(o, bw),
        )
        return best
    return _two_opt(_greedy(peers, bw), bw)


def _greedy(peers: list[str], bw: Bandwidth) -> list[str]:
    order = [peers[0]]
    left = set(peers[1:])
    while left:
        nxt = max(sorted(left), key=lambda p: bw.get((order[-1], p), 0.0))
        order.append(nxt)
        left.remove(nxt)
    return order


def _two_opt(order: list[str], bw: Bandwidth) -> list[str]:
    improved = True
    best = ring_score(order, bw)
    while improved:
        improved = False
        for i in range(1, len(order) - 1):
            for j in range(i + 1, len(order)):
                cand = order[:i] + order[i : j + 1][::-1] + order[j + 1 :]
                score = ring_score(cand, bw)
                if score > best:
                    order, best, improved = cand, score, True
    return order
