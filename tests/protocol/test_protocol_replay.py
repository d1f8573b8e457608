"""The replay cache: a nonce is refused while its request could pass the time check, and is
forgotten after, so memory follows the request rate times the window."""

from __future__ import annotations

import pytest

from cotrain.protocol.auth import Replay
from cotrain.protocol.errors import AuthError

W = 60_000
KEY = "ab" * 32


def test_a_nonce_is_refused_again_until_its_request_could_no_longer_pass() -> None:
    r = Replay(W)
    t0 = 1_000_000_000
    r.check(KEY, "n1", t0, t0)
    r.check("cd" * 32, "n1", t0, t0)  # the same nonce of another key is another request
    for now in (t0, t0 + 1, t0 + W - 1, t0 + W):
        with pytest.raises(AuthError, match="replayed"):
            r.check(KEY, "n1", t0, now)
    with pytest.raises(AuthError, match="outside the 60 s window"):
        r.check(KEY, "n1", t0, t0 + W + 1)  # from here the time check refuses it
    # a request signed ahead of our clock is kept until its own time + the window
    ahead = t0 + W
    r.check(KEY, "n2", ahead, t0)
    with pytest.raises(AuthError, match="replayed"):
        r.check(KEY, "n2", ahead, ahead + W - 1)


def test_memory_follows_the_window_not_the_run() -> None:
    r = Replay(W)
    t = 5_000_000_000
    for i in range(200_000):  # 1,000 requests a second for 200 s
        now = t + i
        r.check(KEY, f"n{i}", now, now)
        assert len(r) <= W + 2_000, (i, len(r))
    assert len(r) >= W
    # nothing for a long while (a clock jump): all of it goes at the next request
    r.check(KEY, "late", t + 10**7, t + 10**7)
    assert len(r) == 1


def test_remembered_nonces_are_refused_after_a_restart() -> None:
    r = Replay(W)
    t = 2_000_000_000
    r.remember(KEY, "acked", t)
    with pytest.raises(AuthError, match="replayed"):
        r.check(KEY, "acked", t + W, t + 2 * W - 1)
