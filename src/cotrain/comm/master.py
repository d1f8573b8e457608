"""The master: membership, a small state machine, no tensor data.

Phases, all agreed by every accepted peer of the current *epoch* (one ring order per epoch):

* **vote** (``update_topology``): when every live member has voted, joiners are admitted, the dead
  are dropped, the epoch goes up and every member gets the new ring. A joiner's request is
  announced to the members (``joining``), so peers may vote only when there is something to do.
* **collective**: every member sends the same ``(epoch, seq, descriptor)``; the master answers
  ``go`` (or ``mismatch`` to all). Tensor bytes then flow peer to peer around the ring; each
  member reports ``done`` and keeps its result aside. Once every member reported, the master
  sends ``commit`` to all; if a member fails first, ``peer_failed`` to all (and each restores
  its input). One of the two goes to every survivor, so a collective is all-or-nothing: a peer
  dying at the very end can no longer leave some survivors with the result and others without.
* **sync_state**: members send tensor hashes, a revision and a weight; the master elects the
  majority, tells the others whom to fetch from and every peer the total weight of the majority
  (for a weighted average without a collective of its own); ``sync_done`` once every fetcher
  has reported. The revision counts as reached only then: a sync that fails half-way can be
  retried with the same revision.
* **optimize**: the master has each peer probe every other, then reorders the ring.

Failure: a peer whose connection closes or that misses heartbeats for ``heartbeat_timeout_s`` is
dropped; the epoch is marked broken and every member is sent ``abort`` so collectives in flight fail
on all survivors at once (a peer stopped with SIGSTOP still holds its sockets open: only the
master's heartbeat clock can tell). A restarted master collects the peers' ``resume`` reports
and adopts the view (epoch, ring, revision) of the ring's majority (``recovery.py``), tells
members that waited for a commit when the old master died how it ended, and the run goes on.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from cotrain.comm import messages as m
from cotrain.comm.auth import (
    admission_for,
    async_server_handshake,
    fingerprint,
    load_identity,
    resolve_secret,
)
from cotrain.comm.config import MasterConfig
from cotrain.comm.errors import AuthError, ProtocolError
from cotrain.comm.frames import async_recv_json, async_send_json
from cotrain.comm.recovery import View, elect, outcomes
from cotrain.comm.tls import server_context
from cotrain.comm.topology import best_ring

log = logging.getLogger("cotrain.master")


@dataclass
class _Peer:
    peer_id: str
    addr: m.PeerAddr | None
    writer: asyncio.StreamWriter | None
    last_seen: float
    accepted: bool = False
    resume: m.Resume | None = None  # its report to a restarted master


@dataclass
class _Recovery:
    """A restarted master's collection of resume reports (``recovery.py``)."""

    votes: set[str] = field(default_factory=set)  # votes that arrived before the view
    view: View | None = None
    unreported: set[str] = field(default_factory=set)  # members of the view not back yet


@dataclass
class _SyncRound:
    plans: dict[str, m.SyncPlan]
    revision: int
    waiting: set[str] = field(default_factory=set)


class Master:
    """Runs inside an asyncio loop; ``cotrain master`` and the tests drive it through ``serve``."""

    def __init__(self, config: MasterConfig) -> None:
        self.config = config
        self.identity = load_identity(config.key_file)
        self._admission = admission_for(
            secret=resolve_secret(config.secret),
            allow_keys=config.allow_keys,
            token_issuers=config.token_issuers,
            run_id=config.run_id,
        )
        self._events_file = config.events_file
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=1_000)
        """The latest membership events (also logged, and appended to ``events_file``, which
        keeps them all): every credentialed connection adds one, so this stays short."""
        self._names: dict[str, str] = {}
        # per address, oldest first: connections still in their handshake (and hello)
        self._unauthenticated: dict[str, dict[asyncio.StreamWriter, None]] = {}
        self._max_frame = config.max_frame_kb * 1024
        self.peers: dict[str, _Peer] = {}
        self.ring: list[str] = []
        self.epoch = 0
        self.broken = False
        self.state_revision: int | None = None
        self._votes: set[str] = set()
        self._dropped: set[str] = set()  # dropped in this epoch: may rejoin, never resume
        self.banned: dict[str, str] = {}
        """Keys refused from now on, with why (``ban``: e.g. ejected by the coordinator)."""
        self._joiners: list[str] = []
        self._vote_deadline: asyncio.TimerHandle | None = None
        self._colls: dict[int, dict[str, m.Descriptor]] = {}
        self._syncs: dict[int, dict[str, m.Sync]] = {}
        self._sync_round: dict[int, _SyncRound] = {}
        self._transfers: dict[int, set[str]] = {}  # seq -> members yet to report done
        self._transfer_kinds: dict[int, str] = {}
        self._last_commit: tuple[int, int] | None = None
        self._recovery: _Recovery | None = None
        self._probe_waiters: dict[tuple[str, str], asyncio.Future[float]] = {}
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> int:
        ctx: ssl.SSLContext | None = server_context(self.config.tls) if self.config.tls else None
        self._server = await asyncio.start_server(
            self._handle, self.config.host, self.config.port, ssl=ctx, limit=1 << 20
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._spawn(self._monitor())
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for p in list(self.peers.values()):
            if p.writer is not None:
                p.writer.close()
        for t in list(self._tasks):
            t.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- connections -------------------------------------------------------------------------

    MAX_UNAUTHENTICATED_PER_ADDRESS = 256

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_id: str | None = None
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if peer else "?"
        pending = self._unauthenticated.setdefault(ip, {})
        if len(pending) >= self.MAX_UNAUTHENTICATED_PER_ADDRESS:
            # A flood from one address: cut its oldest handshake, not this newcomer. Honest
            # peers finish in milliseconds; strangers sharing their address (a NAT, loopback)
            # that idle or trickle are the old ones, so they cannot lock the honest ones out.
            oldest = next(iter(pending))
            del pending[oldest]
            oldest.transport.abort()
        pending[writer] = None
        authenticated = False
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # one deadline for the whole handshake and hello, however slowly the bytes come
            async with asyncio.timeout(self.config.handshake_timeout_s):
                key = await async_server_handshake(reader, writer, self.identity, self._admission)
                hello = m.parse_to_master(await async_recv_json(reader, self._max_frame))
            self._release_unauthenticated(ip, writer)
            authenticated = True
            if not isinstance(hello, m.Hello):
                raise ProtocolError("first message must be hello")
            if hello.peer_id != key:
                raise AuthError(
                    f"hello names peer {hello.peer_id[:16]} but the connection proved key "
                    f"{fingerprint(key)}: a peer's id is its key"
                )
            self._names[key] = hello.name
            peer_id = hello.peer_id
            if not self._admit_connection(hello, writer):
                peer_id = None
                return
            while True:
                msg = m.parse_to_master(await async_recv_json(reader, self._max_frame))
                p = self.peers.get(hello.peer_id)
                if p is None or p.writer is not writer:
                    return  # replaced or dropped meanwhile
                p.last_seen = self._now()
                if isinstance(msg, m.Bye):
                    self._drop(hello.peer_id, "left")
                    peer_id = None
                    return
                self._dispatch(hello.peer_id, msg)
        except (
            TimeoutError,
            AuthError,
            ProtocolError,
            ConnectionError,
            OSError,
            ssl.SSLError,
        ) as e:
            who = self._who(peer_id) if peer_id else f"(unauthenticated, {ip})"
            (log.info if peer_id else log.debug)("connection %s closed: %s", who, e)
        finally:
            if not authenticated:
                self._release_unauthenticated(ip, writer)
            if peer_id is not None:
                p = self.peers.get(peer_id)
                if p is not None and p.writer is writer:
                    self._drop(peer_id, "connection lost")
            writer.close()

    def _release_unauthenticated(self, ip: str, writer: asyncio.StreamWriter) -> None:
        pending = self._unauthenticated.get(ip)
        if pending is None:
            return
        pending.pop(writer, None)  # absent if it was cut to make room
        if not pending:
            del self._unauthenticated[ip]

    # ---- the event log: which key did what -------------------------------------------------

    def _who(self, key: str) -> str:
        name = self._names.get(key)
        return f"{fingerprint(key)} ({name})" if name else fingerprint(key)

    def _event(self, event: str, key: str | None = None, **fields: Any) -> None:
        """Record that ``key`` (a peer's public key) did ``event``: joined, contributed to
        collective N, left, failed. Kept in ``events``, logged, appended to ``events_file``."""
        rec: dict[str, Any] = {"t": round(time.time(), 3), "event": event, "epoch": self.epoch}
        if key is not None:
            rec["key"] = key
            if self._names.get(key):
                rec["name"] = self._names[key]
        rec.update(fields)
        self.events.append(rec)
        if event != "collective":
            who = self._who(key) if key else ""
            detail = " ".join(f"{k}={v}" for k, v in fields.items() if k != "keys")
            log.info("%s %s %s", event, who, detail)
        if self._events_file is not None:
            try:
                with open(self._events_file, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            except OSError as e:
                log.warning("cannot append to events_file %s: %s", self._events_file, e)
                self._events_file = None

    def ban(self, peer_id: str, reason: str) -> None:
        """Refuse ``peer_id`` from now on, whatever its credentials, and drop it now if it is
        connected (its collectives in flight fail and are retried without it)."""
        if peer_id in self.banned:
            return
        self.banned[peer_id] = reason
        self._event("banned", peer_id, reason=reason)
        if peer_id in self.peers:
            self._send(peer_id, m.Kicked(reason=f"banned from the run: {reason}"))
            self._drop(peer_id, f"banned: {reason}")

    def _admit_connection(self, hello: m.Hello, writer: asyncio.StreamWriter) -> bool:
        why = self.banned.get(hello.peer_id)
        if why is not None:
            async_send_json(writer, m.Kicked(reason=f"banned from the run: {why}").dump())
            return False
        addr = m.PeerAddr(peer_id=hello.peer_id, host=hello.host, port=hello.port, name=hello.name)
        old = self.peers.get(hello.peer_id)
        resumed = hello.resume is not None and self._resumable(hello.peer_id, hello.resume)
        if old is not None and old.writer is not None and not resumed:
            async_send_json(writer, m.Kicked(reason="duplicate peer id").dump())
            return False
        if old is not None and old.writer is not None:
            old.writer.close()
        self.peers[hello.peer_id] = _Peer(
            hello.peer_id, addr, writer, self._now(), accepted=resumed, resume=hello.resume
        )
        async_send_json(
            writer,
            m.Welcome(
                peer_id=hello.peer_id,
                epoch=self.epoch,
                resumed=resumed,
                state_revision=self.state_revision,
            ).dump(),
        )
        self._event("connected", hello.peer_id, resumed=resumed)
        if hello.resume is not None:
            self._on_resume(hello.peer_id, hello.resume)
        return True

    # ---- a restarted master ------------------------------------------------------------------

    def _resumable(self, pid: str, r: m.Resume) -> bool:
        """Whether a returning peer resumes its membership. A master that has no ring yet and
        hears a resume was restarted: it hears every report until a view is elected."""
        if self._recovery is None and not self.ring and self.epoch == 0:
            self._recovery = _Recovery()
            loop = asyncio.get_running_loop()
            loop.call_later(self.config.heartbeat_timeout_s, self._recovery_timeout)
        if self._recovery is not None and self._recovery.view is None:
            return True
        return r.epoch == self.epoch and pid in self.ring and pid not in self._dropped

    def _resumes(self) -> dict[str, m.Resume]:
        return {pid: p.resume for pid, p in self.peers.items() if p.resume is not None}

    def _on_resume(self, pid: str, r: m.Resume) -> None:
        rec = self._recovery
        if rec is not None and rec.view is None:
            view = elect(self._resumes(), final=False)
            if view is not None:
                self._adopt(view)
        elif rec is not None:
            rec.unreported.discard(pid)
            self._resolve_outcomes()
        elif r.done_seq is not None and not r.committed:
            self._tell_outcome(pid, r)

    def _recovery_timeout(self) -> None:
        rec = self._recovery
        if rec is None or rec.view is not None:
            return
        view = elect(self._resumes(), final=True)
        if view is None:  # every peer that reported has gone again: start afresh
            self._recovery = None
            for pid in rec.votes:
                if pid in self.peers:
                    self._on_vote(pid)
            return
        self._adopt(view)

    def _adopt(self, view: View) -> None:
        rec = self._recovery
        assert rec is not None
        rec.view = view
        self.epoch, self.ring = view.epoch, list(view.ring)
        self.broken = True  # peers reconnect their rings in a fresh epoch
        self.state_revision = view.revision
        now = self._now()
        for pid in self.ring:
            # members not back yet get a heartbeat timeout's grace before they are dropped
            self.peers.setdefault(pid, _Peer(pid, None, None, now)).accepted = True
        rec.unreported = {pid for pid in self.ring if self.peers[pid].writer is None}
        log.info(
            "recovered epoch %d (ring of %d, revision %s) from %d of its members",
            view.epoch,
            len(view.ring),
            view.revision,
            len(view.reporters),
        )
        self._resolve_outcomes()
        votes, rec.votes = rec.votes, set()
        for pid in votes:
            if pid in self.peers:
                self._on_vote(pid)

    def _resolve_outcomes(self) -> None:
        rec = self._recovery
        if rec is None or rec.view is None:
            return
        decided = outcomes(rec.view, self._resumes(), all_reported=not rec.unreported)
        for pid, (epoch, seq, commit) in decided.items():
            self.peers[pid].resume = None  # answered
            if commit:
                self._send(pid, m.Commit(epoch=epoch, seq=seq))
                self._event("collective", pid, seq=seq, recovered=True)
            else:
                text = "the master restarted before every member reported its transfer done"
                self._send(pid, m.Error(epoch=epoch, seq=seq, kind="peer_failed", message=text))

    def _tell_outcome(self, pid: str, r: m.Resume) -> None:
        """A peer reconnected (to this same master) while it waited for collective
        ``(r.epoch, r.done_seq)``'s commit, which may have gone to its old connection."""
        assert r.done_seq is not None
        waiting = self._transfers.get(r.done_seq) if r.epoch == self.epoch else None
        if waiting is not None:
            waiting.discard(pid)  # its transfer finished; its done may have been lost
            self._check_transfer(r.done_seq)
        elif (r.epoch, r.done_seq) == self._last_commit:
            self._send(pid, m.Commit(epoch=r.epoch, seq=r.done_seq))
        else:
            text = "the collective failed while this peer was reconnecting"
            self._send(
                pid, m.Error(epoch=r.epoch, seq=r.done_seq, kind="peer_failed", message=text)
            )

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _send(self, peer_id: str, msg: m._Msg) -> None:
        p = self.peers.get(peer_id)
        if p is not None and p.writer is not None and not p.writer.is_closing():
            async_send_json(p.writer, msg.dump())

    def _members(self) -> list[str]:
        return [pid for pid in self.ring if pid in self.peers]

    async def _monitor(self) -> None:
        period = self.config.heartbeat_timeout_s / 5
        last_tick = self._now()
        while True:
            await asyncio.sleep(period)
            now = self._now()
            late = now - last_tick > 2 * period
            last_tick = now
            if late:
                # This process was starved (CPU, swap, SIGSTOP): heartbeats that arrived meanwhile
                # may not be read yet. Judge no one on this tick.
                continue
            for pid, p in list(self.peers.items()):
                if now - p.last_seen > self.config.heartbeat_timeout_s:
                    self._send(pid, m.Kicked(reason="missed heartbeats"))
                    self._drop(pid, f"silent for {now - p.last_seen:.1f}s")

    def _drop(self, peer_id: str, reason: str) -> None:
        p = self.peers.pop(peer_id, None)
        if p is None:
            return
        self._event("left" if reason == "left" else "failed", peer_id, reason=reason)
        if peer_id in self.ring:
            self._dropped.add(peer_id)  # only a member's resume is at stake; bounded by the ring
        else:
            self._names.pop(peer_id, None)
        if p.writer is not None:
            p.writer.close()
        if peer_id in self._joiners:
            self._joiners.remove(peer_id)
        self._votes.discard(peer_id)
        if self._recovery is not None and self._recovery.view is not None:
            self._recovery.unreported.discard(peer_id)
            self._resolve_outcomes()
        if peer_id in self.ring:
            # A clean leave aborts the epoch too, so that members still forming the ring stop
            # waiting for (and dialling) the one that left, and a short ring votes at once. It
            # cuts no transfer short: a peer says bye once its last collective committed (every
            # member done), or after giving up on it, when that collective fails anyway.
            gone = f"peer {peer_id} " + ("left" if reason == "left" else f"failed ({reason})")
            self._break_epoch(gone)
        self._check_votes()

    def _break_epoch(self, reason: str) -> None:
        """A member is gone: collectives of this epoch fail on every survivor, and those
        already moving bytes are interrupted (a dead or stalled peer never finishes)."""
        self.broken = True
        for pid in self._members():
            self._send(pid, m.Abort(epoch=self.epoch, reason=reason))
        self._fail_transfers(reason)
        for seq, got in list(self._colls.items()) + list(self._syncs.items()):
            for pid in got:
                self._send(
                    pid, m.Error(epoch=self.epoch, seq=seq, kind="peer_failed", message=reason)
                )
        self._colls.clear()
        self._syncs.clear()
        self._sync_round.clear()
        for fut in self._probe_waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionError(reason))

    # ---- dispatch ----------------------------------------------------------------------------

    def _dispatch(self, pid: str, msg: Any) -> None:
        if isinstance(msg, m.Heartbeat):
            return
        if isinstance(msg, m.Vote):
            if self._recovery is not None and self._recovery.view is None:
                self._recovery.votes.add(pid)  # counted once a view is elected
            else:
                self._on_vote(pid)
        elif isinstance(msg, m.Done):
            if msg.epoch == self.epoch and (waiting := self._transfers.get(msg.seq)) is not None:
                waiting.discard(pid)
                self._check_transfer(msg.seq)
        elif isinstance(msg, m.Collective):
            self._on_collective(pid, msg)
        elif isinstance(msg, m.Sync):
            self._on_sync(pid, msg)
        elif isinstance(msg, m.SyncResult):
            self._on_sync_result(pid, msg)
        elif isinstance(msg, m.Failed):
            if msg.epoch == self.epoch and pid in self.ring and not self.broken:
                self._break_epoch(f"peer {pid} reported: {msg.reason}")
        elif isinstance(msg, m.ProbeResult):
            fut = self._probe_waiters.get((pid, msg.target))
            if fut is not None and not fut.done():
                fut.set_result(msg.mbps)
        else:
            raise ProtocolError(f"unexpected {msg.type} from a peer")

    def _on_vote(self, pid: str) -> None:
        if pid in self.ring:
            self._votes.add(pid)
            # A member asked for a new topology while others wait for a collective (possible
            # after a master restart or a peer-side failure): they must vote too.
            self._reject_pending("a peer called update_topology(); call it too")
        elif pid not in self._joiners:
            self._joiners.append(pid)
            # Members that vote only when needed (``Communicator.vote_wanted``) learn it here.
            for member in self._members():
                self._send(member, m.Joining(epoch=self.epoch))
        if self._vote_deadline is None:
            loop = asyncio.get_running_loop()
            self._vote_deadline = loop.call_later(self.config.vote_timeout_s, self._vote_timeout)
        self._check_votes()

    def _fail_transfers(self, reason: str) -> None:
        """Collectives moving bytes (or done, waiting for the others) fail on every member."""
        for seq in self._transfers:
            for pid in self._members():
                self._send(
                    pid, m.Error(epoch=self.epoch, seq=seq, kind="peer_failed", message=reason)
                )
        self._transfers.clear()
        self._transfer_kinds.clear()

    def _reject_pending(self, message: str) -> None:
        # a member that votes has left any collective it was in
        self._fail_transfers(message)
        for seq, got in list(self._colls.items()) + list(self._syncs.items()):
            for p in got:
                self._send(
                    p, m.Error(epoch=self.epoch, seq=seq, kind="topology_changed", message=message)
                )
        self._colls.clear()
        self._syncs.clear()

    def _vote_timeout(self) -> None:
        self._vote_deadline = None
        for pid in self._members():
            if pid not in self._votes:
                self._send(pid, m.Kicked(reason="did not vote in time"))
                self._drop(pid, "did not vote in time")

    def _check_votes(self) -> None:
        members = self._members()
        if not (self._votes or self._joiners):
            return
        if any(pid not in self._votes for pid in members):
            return
        new_ring = members + [pid for pid in self._joiners if pid in self.peers]
        self._joiners.clear()
        self._votes.clear()
        if self._vote_deadline is not None:
            self._vote_deadline.cancel()
            self._vote_deadline = None
        if new_ring == self.ring and not self.broken:
            # Nothing changed: confirm the current epoch so peers keep their ring connections.
            # Every member is between collectives now and restarts its sequence numbers.
            self._colls.clear()
            self._syncs.clear()
            self._sync_round.clear()
            addrs = [a for a in (self.peers[p].addr for p in new_ring) if a is not None]
            topo = m.Topology(epoch=self.epoch, ring=addrs)
            for pid in new_ring:
                self._send(pid, topo)
            return
        self._set_ring(new_ring)

    def _set_ring(self, ring: list[str]) -> None:
        self.ring = ring
        self.epoch += 1
        self._dropped.clear()
        self._names = {k: v for k, v in self._names.items() if k in self.peers}
        self.broken = False
        self._colls.clear()
        self._syncs.clear()
        self._sync_round.clear()
        self._transfers.clear()
        self._transfer_kinds.clear()
        self._recovery = None  # every member voted: none waits for an old outcome
        addrs = []
        for pid in ring:
            p = self.peers[pid]
            if not p.accepted:
                self._event("joined", pid, epoch=self.epoch + 1)
            p.accepted = True
            assert p.addr is not None
            addrs.append(p.addr)
        log.info("epoch %d: ring of %d peers", self.epoch, len(ring))
        topo = m.Topology(epoch=self.epoch, ring=addrs)
        for pid in ring:
            self._send(pid, topo)

    def _check_member(self, pid: str, epoch: int, seq: int) -> bool:
        if self._votes and pid in self.ring:
            self._send(
                pid,
                m.Error(
                    epoch=epoch,
                    seq=seq,
                    kind="topology_changed",
                    message="peers are voting: call update_topology()",
                ),
            )
            return False
        if pid not in self.ring:
            self._send(
                pid,
                m.Error(
                    epoch=epoch,
                    seq=seq,
                    kind="not_member",
                    message="not a member: call update_topology() to join",
                ),
            )
            return False
        if epoch != self.epoch or self.broken:
            self._send(
                pid,
                m.Error(
                    epoch=epoch,
                    seq=seq,
                    kind="topology_changed",
                    message="membership changed: call update_topology()",
                ),
            )
            return False
        return True

    def _on_collective(self, pid: str, msg: m.Collective) -> None:
        if not self._check_member(pid, msg.epoch, msg.seq):
            return
        got = self._colls.setdefault(msg.seq, {})
        got[pid] = msg.desc
        members = self._members()
        if any(p not in got for p in members):
            return
        del self._colls[msg.seq]
        descs = {pid: got[pid] for pid in members}
        if len({d.model_dump_json() for d in descs.values()}) > 1:
            detail = "; ".join(f"{p}: {d.model_dump()}" for p, d in descs.items())
            for p in members:
                self._send(
                    p,
                    m.Error(
                        epoch=self.epoch,
                        seq=msg.seq,
                        kind="mismatch",
                        message=f"peers disagree on the collective: {detail}",
                    ),
                )
            return
        for p in members:
            self._send(p, m.Go(epoch=self.epoch, seq=msg.seq))
        if msg.desc.kind in ("all_reduce", "broadcast"):
            self._transfers[msg.seq] = set(members)
            self._transfer_kinds[msg.seq] = msg.desc.kind
        if msg.desc.kind == "optimize":
            self._spawn(self._optimize(self.epoch, msg.desc.count))

    def _check_transfer(self, seq: int) -> None:
        waiting = self._transfers.get(seq)
        if waiting is None or waiting:
            return
        del self._transfers[seq]
        self._last_commit = (self.epoch, seq)
        members = self._members()
        for p in members:
            self._send(p, m.Commit(epoch=self.epoch, seq=seq))
        # credited on commit, not on go: a collective that rolls back earned nobody anything
        kind = self._transfer_kinds.pop(seq, "all_reduce")
        self._event("collective", seq=seq, kind=kind, keys=members)

    # ---- shared state ------------------------------------------------------------------------

    def _on_sync(self, pid: str, msg: m.Sync) -> None:
        if not self._check_member(pid, msg.epoch, msg.seq):
            return
        got = self._syncs.setdefault(msg.seq, {})
        got[pid] = msg
        members = self._members()
        if any(p not in got for p in members):
            return
        del self._syncs[msg.seq]
        groups: dict[tuple[int, str], list[str]] = {}
        # Peers that never synced (fresh joiners) hold no state worth electing: they vote only
        # when nobody else has synced, so joiners can never outvote the survivors.
        voters = [p for p in members if not got[p].fresh] or members
        for p in voters:
            groups.setdefault((got[p].revision, got[p].digest), []).append(p)
        # Majority; ties go to the higher revision, then the smaller digest (deterministic).
        (revision, _digest), holders = max(
            groups.items(), key=lambda kv: (len(kv[1]), kv[0][0], [-ord(c) for c in kv[0][1]])
        )
        if self.state_revision is not None and revision != self.state_revision + 1:
            text = (
                f"shared state revision {revision} does not follow {self.state_revision} "
                "(it must go up by exactly one per sync)"
            )
            for p in members:
                self._send(p, m.Error(epoch=self.epoch, seq=msg.seq, kind="revision", message=text))
            return
        target = got[holders[0]].hashes
        # one sum, in ring order, sent to all: every peer divides by the same float
        total = sum(got[p].weight for p in members if p in holders)
        rnd = _SyncRound(plans={}, revision=revision)
        for i, p in enumerate(members):
            if p in holders:
                plan = m.SyncPlan(
                    epoch=self.epoch,
                    seq=msg.seq,
                    revision=revision,
                    action="ok",
                    total_weight=total,
                )
            else:
                mine = got[p].hashes
                names = [n for n, h in target.items() if mine.get(n) != h]
                # rotate sources so several fetchers spread over the holders
                k = i % len(holders)
                srcs = [self.peers[h].addr for h in holders[k:] + holders[:k]]
                plan = m.SyncPlan(
                    epoch=self.epoch,
                    seq=msg.seq,
                    revision=revision,
                    action="fetch",
                    sources=[a for a in srcs if a is not None],
                    names=names,
                    hashes=target,
                    total_weight=total,
                )
                rnd.waiting.add(p)
            rnd.plans[p] = plan
            self._send(p, plan)
        if rnd.waiting:
            self._sync_round[msg.seq] = rnd
        else:
            self.state_revision = revision
            for p in members:
                self._send(p, m.SyncDone(epoch=self.epoch, seq=msg.seq))

    def _on_sync_result(self, pid: str, msg: m.SyncResult) -> None:
        rnd = self._sync_round.get(msg.seq)
        if msg.epoch != self.epoch or rnd is None or pid not in rnd.waiting:
            return
        if not msg.ok:
            log.warning("peer %s could not fetch the shared state: %s", pid, msg.reason)
        rnd.waiting.discard(pid)
        if not rnd.waiting:
            del self._sync_round[msg.seq]
            self.state_revision = rnd.revision  # reached only now: a failed sync may be retried
            for p in rnd.plans:
                self._send(p, m.SyncDone(epoch=self.epoch, seq=msg.seq))

    # ---- ring optimisation -------------------------------------------------------------------

    async def _optimize(self, epoch: int, probe_bytes: int) -> None:
        members = self._members()
        bw: dict[tuple[str, str], float] = {}
        try:
            for src in members:
                for dst in members:
                    if src == dst:
                        continue
                    target = self.peers[dst].addr
                    assert target is not None
                    fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
                    self._probe_waiters[(src, dst)] = fut
                    self._send(src, m.Probe(epoch=epoch, target=target, nbytes=max(probe_bytes, 1)))
                    async with asyncio.timeout(self.config.vote_timeout_s):
                        bw[(src, dst)] = await fut
        except (ConnectionError, TimeoutError) as e:
            log.warning("bandwidth probing failed: %s", e)
            if epoch == self.epoch and not self.broken:
                self._break_epoch(f"bandwidth probing failed: {e}")
            return
        finally:
            self._probe_waiters.clear()
        if epoch != self.epoch or self.broken:
            return
        order = best_ring(members, bw)
        log.info("optimised ring: %s", " -> ".join(order))
        self._set_ring(order)


async def serve(config: MasterConfig, ready: asyncio.Event | None = None) -> None:
    """Run a master until cancelled; prints the bound port so scripts can find it."""
    master = Master(config)
    port = await master.start()
    print(
        f"cotrain master listening on {config.host}:{port} key {master.identity.public_hex}",
        flush=True,
    )
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await master.close()
