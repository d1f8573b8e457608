"""In-process harness for comm tests: a real master (asyncio, in a thread) and real peers
(Communicators with their own sockets), all on loopback with port 0."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from cotrain.comm import CommConfig, Communicator, FaultPlan, Master, MasterConfig
from cotrain.comm.auth import Credentials, client_handshake
from cotrain.core.identity import Identity

SECRET = "test-secret"
T = TypeVar("T")


class MasterThread:
    """A master in its own event loop thread; ``stop()`` closes it (a crash, as peers see it)."""

    def __init__(self, port: int = 0, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        kwargs.setdefault("secret", SECRET)
        self.master = Master(MasterConfig(port=port, **kwargs))
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.master.start(), self.loop).result(10)

    def call(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.master.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def peer_config(port: int, **kwargs: Any) -> CommConfig:
    base: dict[str, Any] = dict(
        master_port=port,
        secret=SECRET,
        heartbeat_interval_s=0.2,
        connect_timeout_s=5.0,
        request_timeout_s=30.0,
        chunk_kb=16,
    )
    base.update(kwargs)
    return CommConfig(**base)


def handshake(
    sock: socket.socket,
    secret: str | None = SECRET,
    *,
    identity: Identity | None = None,
    expect_key: str | None = None,
) -> Identity:
    """Authenticate a raw socket as a client (a fresh key unless given); returns the key."""
    ident = identity or Identity.generate()
    creds = Credentials(ident, secret.encode() if secret else None)
    client_handshake(sock, creds, expect_key=expect_key, timeout_s=5.0)
    return ident


def parallel(fns: list[Callable[[], T]], timeout_s: float = 60.0) -> list[T]:
    """Run one callable per peer concurrently; re-raise the first error."""
    with ThreadPoolExecutor(len(fns)) as ex:
        futs = [ex.submit(f) for f in fns]
        return [f.result(timeout=timeout_s) for f in futs]


def parallel_outcomes(fns: list[Callable[[], Any]], timeout_s: float = 60.0) -> list[Any]:
    """Like ``parallel`` but returns exceptions instead of raising them."""
    with ThreadPoolExecutor(len(fns)) as ex:
        futs = [ex.submit(f) for f in fns]
        out = []
        for f in futs:
            try:
                out.append(f.result(timeout=timeout_s))
            except Exception as e:
                out.append(e)
        return out


@contextmanager
def peers(
    n: int,
    *,
    faults: dict[int, FaultPlan] | None = None,
    per_peer: Callable[[int], dict[str, Any]] | None = None,
    heartbeat_timeout_s: float = 2.0,
    **cfg: Any,
) -> Iterator[tuple[MasterThread, list[Communicator]]]:
    """A master and ``n`` peers ``p0``.. that have not connected yet; all closed afterwards.
    ``faults`` maps a peer's index to the faults it injects, ``per_peer(i)`` gives settings
    for peer ``i`` only; ``heartbeat_timeout_s`` goes to the master, the rest to every peer."""
    master = MasterThread(heartbeat_timeout_s=heartbeat_timeout_s)
    faults = faults or {}
    comms = [
        Communicator(
            peer_config(master.port, **cfg, **(per_peer(i) if per_peer else {})),
            name=f"p{i}",
            faults=faults.get(i),
        )
        for i in range(n)
    ]
    try:
        yield master, comms
    finally:
        for c in comms:
            c.close()
        master.stop()


@contextmanager
def cluster(
    n: int, *, faults: dict[int, FaultPlan] | None = None, **cfg: Any
) -> Iterator[tuple[MasterThread, list[Communicator]]]:
    """``peers``, connected and in one ring."""
    with peers(n, faults=faults, **cfg) as (master, comms):
        for c in comms:
            c.connect()
        parallel([lambda c=c: c.wait_for_world(n, timeout_s=30) for c in comms])
        yield master, comms
