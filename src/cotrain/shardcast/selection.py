"""Choosing a server for each shard: measured throughput and success, with some exploration.

Each server keeps moving averages (weight ``ALPHA``) of the rate one transfer achieved and of
its success. A choice scores ``rate × success / (1 + transfers in flight)``, so load spreads
over servers in proportion to what they deliver; servers never measured score as the best one
seen, so every server gets tried; and a fraction ``exploration`` of choices is uniform among
healthy servers, so a server that got faster is noticed. A server caught serving corrupt bytes
or forged manifests is banned for the rest of the fetch and listed in ``report()``. Relays,
which run for months, keep a ``BanList`` instead: bans that expire, longer for repeat offenders.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from cotrain.core.clock import SYSTEM_CLOCK, Clock

ALPHA = 0.3
_BASE_COOLDOWN_S = 0.25
_MAX_COOLDOWN_S = 5.0


@dataclass
class ServerStats:
    """What one client has learnt about one server."""

    url: str
    rate_bps: float | None = None
    success: float = 1.0
    inflight: int = 0
    failures_in_row: int = 0
    cooldown_until: float = 0.0
    bytes_ok: int = 0
    banned: str | None = None
    faults: list[str] = field(default_factory=list)


class ServerSelector:
    """Per-fetch view of the servers; single-threaded (one asyncio loop) by design."""

    def __init__(
        self,
        urls: list[str],
        *,
        exploration: float = 0.1,
        seed: int | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not urls:
            raise ValueError("need at least one server URL")
        self.stats = {u: ServerStats(u) for u in dict.fromkeys(urls)}
        self.exploration = exploration
        self._rng = random.Random(seed)
        self._clock = clock

    def healthy(self) -> list[str]:
        return [u for u, s in self.stats.items() if s.banned is None]

    def choose(self, avoid: frozenset[str] | set[str] = frozenset()) -> str | None:
        """The server for the next transfer, or None when every healthy one is to be avoided.

        Servers in ``avoid`` (or cooling down after a failure) are used only when nothing else
        is left, so a lone server is retried rather than given up on.
        """
        now = self._clock.monotonic()
        healthy = self.healthy()
        if not healthy:
            return None
        pool = [u for u in healthy if u not in avoid and self.stats[u].cooldown_until <= now]
        if not pool:
            pool = [u for u in healthy if u not in avoid]
        if not pool:
            return None
        if len(pool) > 1 and self._rng.random() < self.exploration:
            return self._rng.choice(pool)
        known = [s.rate_bps for s in self.stats.values() if s.rate_bps is not None]
        optimistic = max(known) if known else 1.0

        def score(u: str) -> float:
            s = self.stats[u]
            rate = s.rate_bps if s.rate_bps is not None else optimistic
            return rate * max(s.success, 0.01) / (1 + s.inflight)

        best = max(score(u) for u in pool)
        return self._rng.choice([u for u in pool if score(u) >= best * 0.999])

    def started(self, url: str) -> None:
        self.stats[url].inflight += 1

    def finished(self, url: str) -> None:
        self.stats[url].inflight -= 1

    def record_success(self, url: str, nbytes: int, seconds: float) -> None:
        s = self.stats[url]
        rate = nbytes / max(seconds, 1e-6)
        s.rate_bps = rate if s.rate_bps is None else ALPHA * rate + (1 - ALPHA) * s.rate_bps
        s.success = ALPHA + (1 - ALPHA) * s.success
        s.failures_in_row = 0
        s.cooldown_until = 0.0
        s.bytes_ok += nbytes

    def record_failure(self, url: str, reason: str) -> None:
        """A transfer failed (refused, reset, stalled): lower its success, cool it down a bit."""
        s = self.stats[url]
        s.success = (1 - ALPHA) * s.success
        s.failures_in_row += 1
        cooldown = min(_MAX_COOLDOWN_S, _BASE_COOLDOWN_S * 2 ** (s.failures_in_row - 1))
        s.cooldown_until = self._clock.monotonic() + cooldown
        s.faults.append(reason)
        del s.faults[:-20]

    def drop(self, url: str) -> None:
        """Leave a server out of this fetch without blame (it never answered, say)."""
        if len(self.stats) > 1:
            self.stats.pop(url, None)

    def ban(self, url: str, reason: str) -> None:
        """The server lied (corrupt bytes, forged manifest): never use it again in this fetch."""
        s = self.stats[url]
        if s.banned is None:
            s.banned = reason
        s.faults.append(reason)

    def report(self) -> dict[str, str]:
        """Banned servers and why."""
        return {u: s.banned for u, s in self.stats.items() if s.banned is not None}


@dataclass
class _Ban:
    reason: str
    until: float
    length_s: float


class BanList:
    """Servers caught lying, each avoided for a while (a relay's memory of its upstreams).

    The first ban lasts ``base_s``; a server banned again while it is banned or soon after
    gets twice its previous ban, up to ``max_s``. A server that behaves for ``max_s`` after
    its ban ended is forgiven entirely. So a relay neither trusts a liar again at once nor
    forgets an upstream that was bad once (or was framed, or has been repaired) forever.
    """

    def __init__(self, *, base_s: float, max_s: float, clock: Clock = SYSTEM_CLOCK) -> None:
        self.base_s, self.max_s = base_s, max(base_s, max_s)
        self._clock = clock
        self._bans: dict[str, _Ban] = {}

    def ban(self, url: str, reason: str) -> None:
        now = self._clock.monotonic()
        old = self._bans.get(url)
        length = self.base_s
        if old is not None and now < old.until + self.max_s:
            length = min(self.max_s, old.length_s * 2)
        self._bans[url] = _Ban(reason, now + length, length)

    def active(self) -> dict[str, str]:
        """The servers banned now, and why."""
        now = self._clock.monotonic()
        for url in [u for u, b in self._bans.items() if now >= b.until + self.max_s]:
            del self._bans[url]  # forgiven
        return {u: b.reason for u, b in self._bans.items() if now < b.until}

    def __contains__(self, url: object) -> bool:
        ban = self._bans.get(url) if isinstance(url, str) else None
        return ban is not None and self._clock.monotonic() < ban.until
