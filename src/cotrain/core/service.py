"""One lifecycle for every long-running role (master, shardcast origin and relay, train, peer,
launch): how it says it is ready, how it stops, what it prints and how it exits.

    with Service("master") as svc:        # from here SIGINT and SIGTERM stop the role
        port = ...start serving...
        svc.ready(host=host, port=port)    # {"event": "ready", "role": "master", ...} on stdout
        svc.summary = lambda: f"{n} peers served"
        await svc.stopped()                # async roles wait here; sync roles just run
    sys.exit(svc.exit_code)                # stderr: "master stopped after 12.3 s (SIGTERM): ..."

* Ready: one JSON line on stdout, ``{"event": "ready", "role": ROLE, "pid": PID, ...}``,
  printed once the role serves (servers: bound and listening, with the real port).
* Stop: the first SIGINT or SIGTERM stops the role gracefully. A synchronous role (train,
  peer, launch) gets ``KeyboardInterrupt`` in its main thread, as Ctrl-C gives it; an async
  role's ``await svc.stopped()`` returns. A second signal ends the process at once.
* Summary: one line on stderr when the role ends, stopped or finished:
  ``ROLE stopped after T s (SIGINT): SUMMARY`` or ``ROLE finished after T s: SUMMARY``.
  A role that fails with an exception prints nothing here (the CLI prints the error).
* Exit code: 130 after SIGINT (the shell's convention for Ctrl-C), 0 after SIGTERM (a
  supervisor asked for a clean stop, and got one) or a normal end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Service:
    """The lifecycle of one long-running role; a context manager around its whole run."""

    def __init__(self, role: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.role = role
        self.summary: str | Callable[[], str] = ""
        """What the stop line says after the time: text, or a function called at the end."""
        self.stop_signal: int | None = None
        """The signal that stopped the role (None: it ended by itself)."""
        self.exit_code = 0
        self._clock = clock
        self._started = 0.0
        self._previous: dict[int, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    # ---- the context ---------------------------------------------------------------------------

    def __enter__(self) -> Service:
        self._started = self._clock()
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if kind is not None and not issubclass(kind, KeyboardInterrupt):
            return False  # a failure: the caller reports it
        if kind is not None and self.stop_signal is None:
            self.stop_signal = signal.SIGINT  # Ctrl-C before our handler was in place
        elapsed = self._clock() - self._started
        summary = self.summary() if callable(self.summary) else self.summary
        if self.stop_signal is None:
            line = f"{self.role} finished after {elapsed:.1f} s"
        else:
            name = signal.Signals(self.stop_signal).name
            line = f"{self.role} stopped after {elapsed:.1f} s ({name})"
        print(f"{line}: {summary}" if summary else line, file=sys.stderr, flush=True)
        self.exit_code = 130 if self.stop_signal == signal.SIGINT else 0
        return True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_signal is not None:  # the second signal: no more waiting
            os._exit(130 if signum == signal.SIGINT else 143)
        self.stop_signal = signum
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        else:
            raise KeyboardInterrupt

    # ---- what a role calls -----------------------------------------------------------------

    def ready(self, **fields: Any) -> None:
        """Announce that the role serves: one JSON line on stdout. Called in an event loop, from
        here on a signal sets what ``stopped()`` waits for (nothing is interrupted)."""
        self._attach()
        line = json.dumps({"event": "ready", "role": self.role, "pid": os.getpid(), **fields})
        sys.stdout.write(line + "\n")  # one write: no other thread's line lands inside it
        sys.stdout.flush()

    async def stopped(self) -> None:
        """Wait (in the role's event loop) until SIGINT or SIGTERM."""
        self._attach()
        assert self._stop is not None
        await self._stop.wait()

    def _attach(self) -> None:
        if self._stop is not None:
            return
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a synchronous role: signals raise KeyboardInterrupt
        self._stop = asyncio.Event()
        if self.stop_signal is not None:
            self._stop.set()

    @property
    def elapsed_s(self) -> float:
        return self._clock() - self._started
