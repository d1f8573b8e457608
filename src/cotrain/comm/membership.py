"""This peer's place in the run: the ring of the current epoch and the links to its neighbours.

``Membership`` is the state every job of a peer shares (collectives, shared state, probing):
the epoch, the ring (members' keys and addresses), this peer's rank, the next sequence number,
whether the epoch is broken, and the ring sockets. It owns the first and last phases of every
collective, agreement with the master (``begin``) and its verdict (``commit``), and reporting a
failure (``fail``).

Ring links: after a topology change each peer dials ``streams`` connections to its next
neighbour and waits for as many from its previous one. A neighbour may dial as soon as it learns
the new topology, before we do: ``on_ring`` waits (bounded) for ours, then keeps the stream only
if its proven key is our previous neighbour's in that epoch.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

from cotrain.comm import messages as m
from cotrain.comm import ring
from cotrain.comm.auth import Credentials, fingerprint
from cotrain.comm.config import CommConfig
from cotrain.comm.control import MasterLink
from cotrain.comm.errors import (
    CommError,
    KickedError,
    MismatchError,
    PeerFailedError,
    RevisionError,
    TopologyChangedError,
)
from cotrain.comm.transport import close_quietly, dial_peer, wait_deadline
from cotrain.core.clock import Deadline


class Membership:
    """The ring as this peer sees it; every field is guarded by ``lock`` (a condition)."""

    def __init__(self, config: CommConfig, creds: Credentials) -> None:
        self.config = config
        self.creds = creds
        self.peer_id = creds.identity.public_hex
        self.lock = threading.Condition()
        self.op_lock = threading.Lock()
        """Held by every operation (vote, collective, sync, probe): one at a time per peer."""
        self.bytes_sent = 0
        self.bytes_received = 0
        self.epoch = 0
        self.ring: list[m.PeerAddr] = []
        self.rank = -1
        self.seq = 0
        self.broken: str | None = None
        self.early_abort: tuple[int, str] | None = None
        """An abort for an epoch whose topology is still in our inbox (the master sends both,
        in order, but the reader thread sees the abort first): the epoch is broken on arrival."""
        self.links: ring.Links | None = None
        self.outcome: tuple[int, int, bool] | None = None
        """(epoch, seq, committed) of the last collective reported done: a restarted master
        learns it from our resume and tells us, or the others, how it ended."""
        self.closing = False
        self.expecting_topology = 0
        """Votes or ring optimisations in flight: only then may a later epoch's ring arrive."""
        self._incoming: dict[tuple[int, int], tuple[str, socket.socket]] = {}
        self._link: MasterLink | None = None

    # ---- the master link ---------------------------------------------------------------------

    def attach(self, link: MasterLink) -> None:
        self._link = link

    @property
    def link(self) -> MasterLink:
        if self._link is None:
            raise CommError("call connect() first")
        return self._link

    def on_abort(self, msg: m.Abort) -> None:
        with self.lock:
            if msg.epoch > self.epoch:
                self.early_abort = (msg.epoch, f"collective aborted: {msg.reason}")
                return
            if msg.epoch != self.epoch:
                return
            self.broken = f"collective aborted: {msg.reason}"
            links = self.links
            self.lock.notify_all()  # a ring still forming stops waiting for its neighbour
        if links is not None:
            links.close()

    def on_kicked(self, reason: str) -> None:
        with self.lock:
            self.broken = f"removed by the master: {reason}"
            links = self.links
            self.lock.notify_all()
        if links is not None:
            links.close()

    def on_reconnect(self, resumed: bool) -> None:
        with self.lock:
            self.broken = (
                "reconnected to the master" if resumed else "the master did not know our ring"
            )
            self.lock.notify_all()

    def abort_reason(self) -> str | None:
        return self.broken

    def close(self) -> None:
        with self.lock:
            self.closing = True
            links = self.links
            pending = list(self._incoming.values())
            self._incoming.clear()
            self.lock.notify_all()
        if links is not None:
            links.close()
        for _, s in pending:
            close_quietly(s)

    # ---- queries -----------------------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        return [p.peer_id for p in self.ring]

    def is_member(self, key: str) -> bool:
        with self.lock:
            return any(p.peer_id == key for p in self.ring)

    def vote_wanted(self) -> bool:
        link = self._link
        return (
            self.rank < 0
            or self.broken is not None
            # joiners announced in an earlier epoch were admitted by the vote that ended it
            or (link is not None and link.joining_epoch >= self.epoch)
        )

    # ---- topology ----------------------------------------------------------------------------

    def apply_topology(self, topo: m.Topology) -> None:
        """Adopt the master's new ring and connect to the neighbours in it."""
        ids = [p.peer_id for p in topo.ring]
        if self.peer_id not in ids:
            raise KickedError("the new topology does not include this peer")
        if topo.epoch == self.epoch and self.links is not None and self.broken is None:
            # Membership unchanged: keep the ring connections. Every member voted, so none is
            # in a collective: sequence numbers restart together (a member whose phase was
            # rejected because another voted had used one more than the others), and replies
            # of this epoch still in the inbox are stale.
            self.seq = 0
            self.outcome = None
            self.link.purge(lambda x: getattr(x, "epoch", topo.epoch + 1) > topo.epoch)
            return
        if topo.epoch == self.epoch and self.links is not None:
            # Our ring connections are gone (or suspect) but the master saw nothing wrong, so
            # the others keep theirs: rebuilding alone would wait for a neighbour that never
            # dials (the ~10 s stall after a master restart). Have the master break the epoch
            # instead; the next vote makes a new one.
            reason = self.broken or "ring connections lost"
            self.fail(0, reason)
            raise PeerFailedError(f"{reason}; call update_topology() again")
        old = self.links
        with self.lock:
            self.links = None
            self.epoch, self.ring, self.rank = topo.epoch, list(topo.ring), ids.index(self.peer_id)
            self.seq = 0
            self.outcome = None
            early, self.early_abort = self.early_abort, None
            self.broken = early[1] if early is not None and early[0] == topo.epoch else None
            stale = [k for k in self._incoming if k[0] < topo.epoch]
            stale_socks = [self._incoming.pop(k)[1] for k in stale]
            self.lock.notify_all()
        for s in stale_socks:
            close_quietly(s)
        if old is not None:
            old.close()
        self.link.purge(lambda x: getattr(x, "epoch", topo.epoch) >= topo.epoch)
        n = len(ids)
        if n == 1:
            self.links = ring.Links([], [])
            return
        nxt = topo.ring[(self.rank + 1) % n]
        prev = topo.ring[(self.rank - 1) % n]
        deadline = Deadline.after(self.config.connect_timeout_s)
        streams = self.config.streams
        try:
            if self.broken is not None:  # aborted before it arrived (early_abort): no dialing
                raise PeerFailedError(self.broken)
            to_next = self._dial_streams(nxt)
            with self.lock:
                # ... or until the master aborts this epoch (a member failed to connect its
                # part of the ring): the next vote makes a new one, no need to wait it out
                self.lock.wait_for(
                    lambda: (
                        self.broken is not None
                        or all((topo.epoch, j) in self._incoming for j in range(streams))
                    ),
                    timeout=deadline.remaining(),
                )
                got = [self._incoming.pop((topo.epoch, j), None) for j in range(streams)]
                broken = self.broken
            if broken is not None or any(item is None for item in got):
                for s in to_next:
                    close_quietly(s)
                for item in got:
                    close_quietly(item[1] if item else None)
                raise PeerFailedError(
                    broken or f"ring neighbour {fingerprint(prev.peer_id)} did not connect in time"
                )
            from_prev = []
            for item in got:
                assert item is not None and item[0] == prev.peer_id  # on_ring checked the key
                from_prev.append(item[1])
            self.links = ring.Links(to_next, from_prev)
        except (OSError, CommError) as e:
            self.fail(0, f"could not connect the ring: {e}")
            raise PeerFailedError(f"could not connect the ring: {e}") from e

    def _dial_streams(self, nxt: m.PeerAddr) -> list[socket.socket]:
        """One connection per stream to ``nxt``, dialled in parallel. Ends early, closing
        whatever it got, when a dial fails or the master aborts the epoch meanwhile (the
        neighbour died while we dialled it, and the connect would otherwise run to
        ``connect_timeout_s``); dials still in flight then close their sockets when they end."""
        n = self.config.streams
        socks: list[socket.socket | None] = [None] * n
        errors: list[BaseException] = []
        ended, given_up, epoch = 0, False, self.epoch

        def one(j: int) -> None:
            nonlocal ended
            sock: socket.socket | None = None
            error: BaseException | None = None
            try:
                sock = dial_peer(nxt, self.creds, self.config, m.RingHello(epoch=epoch, stream=j))
            except BaseException as e:
                error = e
            with self.lock:
                late, socks[j] = given_up, sock
                if error is not None:
                    errors.append(error)
                ended += 1
                self.lock.notify_all()
            if late:
                close_quietly(sock)

        for j in range(n):
            threading.Thread(target=one, args=(j,), daemon=True, name=f"dial-{j}").start()
        with self.lock:
            self.lock.wait_for(
                lambda: ended == n or errors or self.broken is not None or self.closing,
                timeout=self.config.connect_timeout_s + 5.0,  # each dial's own bound, and some
            )
            done, failed = ended == n, list(errors)
            broken = self.broken or ("closing" if self.closing else None)
            given_up = not done
            got = list(socks)
        if not done or failed:
            for s in got:
                close_quietly(s)
            who = fingerprint(nxt.peer_id)
            if failed:
                raise PeerFailedError(f"cannot reach ring neighbour {who}: {failed[0]}")
            raise PeerFailedError(
                f"gave up dialling ring neighbour {who}: {broken or 'the dials did not end'}"
            )
        return [s for s in got if s is not None]

    def on_ring(self, sock: socket.socket, hello: m.RingHello, key: str) -> None:
        """Data-server handler: keep a ring stream only from our previous neighbour (by its
        proven key) in the epoch it names, waiting at most ``connect_timeout_s`` for that epoch
        (the data server's per-address limits hold such waits): neither strangers nor stale
        epochs are ever stored."""
        epoch, stream = hello.epoch, hello.stream
        if stream >= self.config.streams:
            raise CommError(f"ring stream {stream} of {self.config.streams}")
        deadline = Deadline.after(self.config.connect_timeout_s)
        with self.lock:
            if epoch > self.epoch and not self.expecting_topology:
                # A new topology only ever answers a vote (or a ring optimisation) of ours:
                # without one in flight nobody may dial us for a later epoch, so a stranger's
                # future-epoch hellos are refused at once instead of holding a slot waiting.
                raise CommError(f"ring stream for epoch {epoch}; no new topology is due")
            wait_deadline(self.lock, lambda: self.epoch >= epoch or self.closing, deadline)
            n = len(self.ring)
            expected = self.ring[(self.rank - 1) % n].peer_id if self.rank >= 0 else None
            if epoch != self.epoch or key != expected or self.closing:
                raise CommError(
                    f"ring stream from {fingerprint(key)} for epoch {epoch}: not our previous "
                    f"neighbour in epoch {self.epoch}"
                )
            old = self._incoming.get((epoch, stream))
            self._incoming[(epoch, stream)] = (key, sock)
            self.lock.notify_all()
        if old is not None:
            close_quietly(old[1])

    @contextlib.contextmanager
    def awaiting_topology(self) -> Iterator[None]:
        """Mark a vote or optimisation in flight (see ``on_ring``)."""
        with self.lock:
            self.expecting_topology += 1
        try:
            yield
        finally:
            with self.lock:
                self.expecting_topology -= 1

    @property
    def pending_streams(self) -> int:
        """Ring streams accepted for an epoch whose links are not built yet."""
        with self.lock:
            return len(self._incoming)

    # ---- the two phases every collective shares ----------------------------------------------

    def check_ready(self) -> None:
        if self.rank < 0:
            raise TopologyChangedError("not in the ring yet: call update_topology()")
        if self.broken is not None:
            raise TopologyChangedError(f"{self.broken}; call update_topology()")

    def next_seq(self) -> tuple[int, int]:
        """(epoch, seq) for the next collective or sync of this epoch."""
        seq = self.seq
        self.seq += 1
        return self.epoch, seq

    def begin(self, desc: m.Descriptor, deadline: Deadline) -> int:
        """Phase one: agree with every member on this collective; returns its sequence number."""
        link = self.link
        self.check_ready()
        epoch, seq = self.next_seq()
        gen = link.send(m.Collective(epoch=epoch, seq=seq, desc=desc))
        reply = link.wait_for(
            lambda x: isinstance(x, m.Go | m.Error) and x.epoch == epoch and x.seq == seq,
            deadline,
            generation=gen,
            what=f"agreement on {desc.kind}",
            abort_check=self.abort_reason,
        )
        if isinstance(reply, m.Error):
            raise error_for(reply)
        return seq

    def commit(self, seq: int, deadline: Deadline, what: str) -> None:
        """Phase three: report this peer's transfer done and wait for the master's verdict,
        ``commit`` or a typed error (a member failed first). The wait outlives a master
        restart: the resume sent on reconnecting names this collective, and the restarted
        master answers it from the members' reports (``recovery.py``)."""
        link = self.link
        epoch = self.epoch
        self.outcome = (epoch, seq, False)  # set before ``done`` leaves: a resume carries it
        try:
            gen = link.send(m.Done(epoch=epoch, seq=seq))
        except PeerFailedError:
            gen = link.generation  # lost the master: our resume reports the done instead
        try:
            reply = link.wait_for(
                lambda x: isinstance(x, m.Commit | m.Error) and x.epoch == epoch and x.seq == seq,
                deadline,
                generation=gen,
                what=f"the commit of the {what}",
                across_reconnect=True,
            )
        except BaseException:
            self.outcome = None
            raise
        if isinstance(reply, m.Error):
            self.outcome = None
            raise error_for(reply)
        self.outcome = (epoch, seq, True)

    def fail(self, seq: int, reason: str) -> None:
        """This peer saw the collective ``seq`` fail: close the ring and tell the master."""
        with self.lock:
            if self.broken is None:
                self.broken = reason
            links = self.links
            self.lock.notify_all()
        if links is not None:
            links.close()
        try:
            self.link.send(m.Failed(epoch=self.epoch, seq=seq, reason=reason[:2000]))
        except CommError:
            pass


def error_for(reply: m.Error) -> CommError:
    """The typed error for the master's ``error`` message (kinds travel as data)."""
    text = reply.message
    if reply.kind == "mismatch":
        return MismatchError(text)
    if reply.kind == "revision":
        return RevisionError(text)
    if reply.kind == "peer_failed":
        return PeerFailedError(text)
    return TopologyChangedError(text)


def match_reply(kind: Any, epoch: int, seq: int) -> Any:
    """An inbox predicate: ``kind`` or an error, for (epoch, seq)."""
    return lambda x: isinstance(x, kind | m.Error) and x.epoch == epoch and x.seq == seq
