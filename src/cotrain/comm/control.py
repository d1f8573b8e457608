"""A peer's connection to the master: hello/resume, heartbeats, an inbox of replies, reconnection.

One reader thread parses the master's messages. ``abort`` and ``kicked`` act at once (they close
the ring sockets so a collective in flight fails now, not at its timeout); ``joining`` raises
``joining_epoch`` (a vote is wanted); every other message goes to the inbox, where the caller
waiting for it picks it out by type, epoch and sequence.
If the master connection drops, a reconnect thread dials again (with our epoch, ring and
revision so a restarted master can rebuild its state) until ``master_reconnect_timeout_s``;
requests that were waiting fail with a retryable error because the new master never saw them,
except a collective's commit: the resume says which one this peer waits for, and the restarted
master answers it. The communicator learns of the reconnection before any message of the new
connection is read or sent: a topology the new master sends is then never followed by a late
"reconnected" mark that would make this peer alone rebuild a ring the others keep.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from cotrain.comm import messages as m
from cotrain.comm.auth import Credentials
from cotrain.comm.config import CommConfig
from cotrain.comm.errors import (
    CommError,
    KickedError,
    MasterUnreachableError,
    PeerFailedError,
    ProtocolError,
)
from cotrain.comm.frames import recv_json, send_json
from cotrain.comm.transport import close_quietly, dial
from cotrain.core.clock import Deadline
from cotrain.core.errors import TimeoutExpired

log = logging.getLogger("cotrain.comm")


class MasterLink:
    def __init__(
        self,
        config: CommConfig,
        creds: Credentials,
        hello: Callable[[], m.Hello],
        on_abort: Callable[[m.Abort], None],
        on_kicked: Callable[[str], None],
        on_reconnect: Callable[[bool], None],
        silenced: threading.Event,
    ) -> None:
        self.config = config
        self._creds = creds
        self._hello = hello
        self._on_abort = on_abort
        self._on_kicked = on_kicked
        self._on_reconnect = on_reconnect
        self._silenced = silenced  # fault injection "cut": we neither send nor react
        self._max_frame = config.max_frame_kb * 1024
        self.cond = threading.Condition()
        self._inbox: list[Any] = []
        self._send_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.generation = 0  # bumps at each (re)connection
        self.kicked: str | None = None
        self.dead: str | None = None  # master gone for good
        # the epoch in which the master last announced joiners (-1: none since our last vote)
        self.joining_epoch = -1
        self._closing = threading.Event()

    # ---- connection --------------------------------------------------------------------------

    def connect(self, timeout_s: float) -> m.Welcome:
        deadline = Deadline.after(timeout_s)
        last: Exception | None = None
        while not deadline.expired():
            try:
                return self._dial(deadline.remaining())
            except (OSError, ConnectionError) as e:  # master not up yet: retry until the deadline
                last = e
                self._closing.wait(0.1)
        raise MasterUnreachableError(
            f"no master at {self.config.master_host}:{self.config.master_port} "
            f"within {timeout_s:.0f}s ({last})"
        )

    def _dial(
        self, timeout_s: float, on_welcome: Callable[[m.Welcome], None] | None = None
    ) -> m.Welcome:
        sock = dial(
            self.config.master_host,
            self.config.master_port,
            self._creds,
            expect_key=self.config.master_key,
            timeout_s=max(0.1, min(timeout_s, self.config.connect_timeout_s)),
            tls=self.config.tls,
            hello=self._hello().dump(),
        )
        try:
            reply = m.parse_to_peer(recv_json(sock, self._max_frame))
        except BaseException:
            close_quietly(sock)
            raise
        if isinstance(reply, m.Kicked):
            close_quietly(sock)
            raise KickedError(f"master refused us: {reply.reason}")
        if not isinstance(reply, m.Welcome):
            close_quietly(sock)
            raise ProtocolError(f"expected welcome, got {reply.type}")
        if on_welcome is not None:
            on_welcome(reply)  # before the connection is used (see the module docstring)
        sock.settimeout(None)  # the reader blocks until the master speaks or the link drops
        with self.cond:
            self._sock = sock
            self.generation += 1
            self.kicked = None  # a new connection: a peer that was removed may join again
            self.cond.notify_all()
        threading.Thread(
            target=self._read, args=(sock,), name="cotrain-master-rx", daemon=True
        ).start()
        return reply

    def _read(self, sock: socket.socket) -> None:
        while True:
            try:
                msg = m.parse_to_peer(recv_json(sock, self._max_frame))
            except (OSError, ConnectionError, ProtocolError) as e:
                if self._closing.is_set() or self._sock is not sock:
                    return
                log.warning("lost the master: %s", e)
                self._lost(sock)
                return
            if self._silenced.is_set():
                continue
            if isinstance(msg, m.Abort):
                self._on_abort(msg)
                with self.cond:
                    self.cond.notify_all()
            elif isinstance(msg, m.Joining):
                with self.cond:
                    self.joining_epoch = max(self.joining_epoch, msg.epoch)
                    self.cond.notify_all()
            elif isinstance(msg, m.Kicked):
                with self.cond:
                    self.kicked = msg.reason
                    self.cond.notify_all()
                self._on_kicked(msg.reason)
            else:
                with self.cond:
                    self._inbox.append(msg)
                    self.cond.notify_all()

    def _lost(self, sock: socket.socket) -> None:
        with self.cond:
            if self._sock is sock:
                self._sock = None
            self.cond.notify_all()
        close_quietly(sock)
        threading.Thread(
            target=self._reconnect, name="cotrain-master-reconnect", daemon=True
        ).start()

    def _reconnect(self) -> None:
        deadline = Deadline.after(self.config.master_reconnect_timeout_s)
        while not self._closing.is_set() and not deadline.expired():
            try:
                welcome = self._dial(
                    deadline.remaining(), on_welcome=lambda w: self._on_reconnect(w.resumed)
                )
            except (OSError, ConnectionError, CommError) as e:
                log.debug("master reconnect failed: %s", e)
                self._closing.wait(0.2)
                continue
            log.info("reconnected to the master (resumed=%s)", welcome.resumed)
            return
        with self.cond:
            if not self._closing.is_set():
                self.dead = f"master unreachable for {self.config.master_reconnect_timeout_s:.0f}s"
            self.cond.notify_all()

    def close(self) -> None:
        self._closing.set()
        with self.cond:
            sock, self._sock = self._sock, None
            self.cond.notify_all()
        if sock is not None:
            try:
                with self._send_lock:
                    sock.settimeout(1.0)
                    send_json(sock, m.Bye().dump())
            except OSError:
                pass
            close_quietly(sock)

    # ---- requests ----------------------------------------------------------------------------

    def send(self, msg: m._Msg) -> int:
        """Send to the master; returns the connection generation it went out on."""
        if self._silenced.is_set():
            return self.generation
        with self.cond:
            # While reconnecting, wait for the master to come back (bounded) instead of failing.
            deadline = Deadline.after(self.config.master_reconnect_timeout_s)
            while self._sock is None and self.dead is None:
                if self._closing.is_set() or deadline.expired():
                    break
                self.cond.wait(min(deadline.remaining(), 0.25))
            sock, gen = self._sock, self.generation
        if sock is None:
            self._raise_state()
            raise PeerFailedError("not connected to the master (reconnecting); retry")
        try:
            with self._send_lock:
                send_json(sock, msg.dump())
        except OSError as e:
            raise PeerFailedError(f"lost the master while sending: {e}") from None
        return gen

    def _raise_state(self) -> None:
        if self.kicked is not None:
            raise KickedError(f"removed by the master: {self.kicked}; update_topology() rejoins")
        if self.dead is not None:
            raise MasterUnreachableError(self.dead)

    def wait_for(
        self,
        pred: Callable[[Any], bool],
        deadline: Deadline,
        *,
        generation: int,
        what: str,
        abort_check: Callable[[], str | None] | None = None,
        across_reconnect: bool = False,
    ) -> Any:
        """Pop the first inbox message matching ``pred``; a typed error for each way it cannot.
        ``across_reconnect``: the answer may come from the next connection (a commit)."""
        with self.cond:
            while True:
                for i, msg in enumerate(self._inbox):
                    if pred(msg):
                        return self._inbox.pop(i)
                self._raise_state()
                lost = self.generation != generation or self._sock is None
                if lost and not across_reconnect:
                    raise PeerFailedError(f"lost the master while waiting for {what}; retry")
                if abort_check is not None and (reason := abort_check()) is not None:
                    raise PeerFailedError(reason)
                left = deadline.remaining()
                if left <= 0:
                    raise TimeoutExpired(f"timed out waiting for {what}")
                self.cond.wait(min(left, 0.5))

    def wait_joining(
        self, epoch: int, timeout_s: float, *, stop: Callable[[], bool] = lambda: False
    ) -> None:
        """Return once the master has announced a joiner in ``epoch`` or later, the
        connection changed (lost, kicked, gone for good, closed), ``stop()``
        (checked whenever the master sends an abort, and every 0.5 s) or ``timeout_s``
        passed, whichever is first."""
        deadline = Deadline.after(timeout_s)
        with self.cond:
            generation = self.generation
            while (
                self.joining_epoch < epoch
                and self.generation == generation
                and self.kicked is None
                and self.dead is None
                and not self._closing.is_set()
                and not stop()
            ):
                left = deadline.remaining()
                if left <= 0:
                    return
                self.cond.wait(min(left, 0.5))

    def purge(self, keep: Callable[[Any], bool]) -> None:
        with self.cond:
            self._inbox = [msg for msg in self._inbox if keep(msg)]

    def heartbeat_loop(self, interval_s: float) -> None:
        while not self._closing.wait(interval_s):
            if self._silenced.is_set():
                continue
            try:
                self.send(m.Heartbeat())
            except CommError:
                pass
