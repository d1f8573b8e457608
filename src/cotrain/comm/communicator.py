"""``Communicator``: one peer's handle on the run (membership, collectives, shared state).

Every collective follows the same two phases: agree (each peer sends its descriptor to the master;
the master answers ``go`` once all members sent the same one, or a typed error to all), then
move bytes peer to peer around the ring (``ring.py``). The caller's tensor is written only after
the transfer succeeded, so any failure leaves it exactly as it was (commit or roll back).
Collectives are serialised per communicator; ``all_reduce_async`` runs them on a worker thread.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from cotrain.comm import messages as m
from cotrain.comm import probe, ring
from cotrain.comm.auth import (
    Admission,
    Credentials,
    fingerprint,
    load_identity,
    load_token,
    resolve_secret,
)
from cotrain.comm.config import CommConfig, Quantization, ReduceOp
from cotrain.comm.control import MasterLink
from cotrain.comm.errors import (
    RETRYABLE,
    CollectiveError,
    CommError,
    KickedError,
    MismatchError,
    PeerFailedError,
    RevisionError,
    StateSyncError,
    TopologyChangedError,
)
from cotrain.comm.faults import FaultInjector, FaultPlan
from cotrain.comm.frames import send_json
from cotrain.comm.quant import Codec, codec_for
from cotrain.comm.ring import TransferStats
from cotrain.comm.state import digest, fetch_from_sources, serve_state, views
from cotrain.comm.tensors import Scratch, flat_view
from cotrain.comm.transport import DataServer, close_quietly, dial_peer, wait_deadline
from cotrain.core.clock import Deadline
from cotrain.core.errors import TimeoutExpired
from cotrain.core.identity import Identity

log = logging.getLogger("cotrain.comm")

OPS = ("sum", "avg", "min", "max")
QUANTS = ("none", "fp16", "bf16", "int8", "int8_minmax", "int4")


@dataclass(frozen=True)
class CollectiveResult:
    seconds: float
    bytes_sent: int
    bytes_received: int
    world_size: int
    epoch: int


@dataclass(frozen=True)
class SyncResult:
    revision: int
    fetched: bool
    bytes_received: int
    source: str | None
    total_weight: float = 0.0
    """Sum of the ``weight`` passed by the peers that kept their state (fetchers count zero)."""


class Handle:
    """An all-reduce in flight; ``wait()`` returns its result or raises its error."""

    def __init__(self, future: Future[CollectiveResult]) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout_s: float | None = None) -> CollectiveResult:
        try:
            return self._future.result(timeout=timeout_s)
        except TimeoutError:
            raise TimeoutExpired(f"all-reduce still running after {timeout_s}s") from None


class Communicator:
    """A peer of the run. ``connect()``, then ``update_topology()`` to join the ring."""

    def __init__(
        self,
        config: CommConfig,
        *,
        name: str = "",
        identity: Identity | None = None,
        faults: FaultPlan | None = None,
    ) -> None:
        self.config = config
        secret = resolve_secret(config.secret)
        if secret is None and config.master_key is None:
            raise ValueError(
                "cannot authenticate the master: set master_key (printed by `cotrain master`) "
                "or a run secret (`secret` or the COTRAIN_SECRET variable)"
            )
        ident = identity or load_identity(config.key_file)
        self._creds = Credentials(ident, secret, load_token(config.token_file))
        # Members are whoever the master announced; the secret, when there is one, must be
        # proven on data connections too.
        self._admission = Admission(secret=secret, open=True)
        self.peer_id = ident.public_hex
        """This peer's id: its ed25519 public key (64 hex)."""
        self.name = name or fingerprint(self.peer_id)
        """A label for logs; the master logs it beside the key."""
        self._max_frame = config.max_frame_kb * 1024
        self._faults = FaultInjector(faults)
        self._op_lock = threading.Lock()
        self._lock = threading.Condition()
        self._epoch = 0
        self._ring: list[m.PeerAddr] = []
        self._rank = -1
        self._seq = 0
        self._broken: str | None = None
        self._links: ring.Links | None = None
        self._incoming: dict[tuple[int, int], tuple[str, socket.socket]] = {}
        self._serving: tuple[int, int, Any] | None = None
        self._revision: int | None = None
        self._allreduces = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cotrain-async")
        self._scratch = Scratch()
        self._server: DataServer | None = None
        self._master: MasterLink | None = None
        self._closing = False
        self.bytes_sent = 0
        self.bytes_received = 0

    # ---- properties --------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """Position in the ring (-1 until admitted)."""
        return self._rank

    @property
    def world_size(self) -> int:
        return len(self._ring)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def ring(self) -> list[str]:
        """The members' ids (public keys) in ring order."""
        return [p.peer_id for p in self._ring]

    @property
    def ring_names(self) -> list[str]:
        """The members' labels in ring order (for logs and scripts; ids are the keys)."""
        return [p.name or fingerprint(p.peer_id) for p in self._ring]

    @property
    def vote_wanted(self) -> bool:
        """True when ``update_topology()`` has work to do: peers wait to join, the ring is
        broken (a peer failed, the master restarted) or this peer is not in it. Otherwise a
        caller may skip its vote; a change it misses (a clean leave) fails its next collective
        with a retryable error, after which it votes."""
        link = self._master
        return (
            self._rank < 0
            or self._broken is not None
            # joiners announced in an earlier epoch were admitted by the vote that ended it
            or (link is not None and link.joining_epoch >= self._epoch)
        )

    @property
    def revision(self) -> int | None:
        """Revision of the last shared state this peer synced."""
        return self._revision

    # ---- lifecycle ---------------------------------------------------------------------------

    def connect(self, timeout_s: float | None = None) -> None:
        """Start the data server and reach the master (retrying until ``timeout_s``)."""
        cfg = self.config
        self._server = DataServer(
            cfg.listen_host,
            cfg.listen_port,
            self._creds.identity,
            self._admission,
            {"ring": self._on_ring, "state": self._on_state, "probe": self._on_probe},
            handshake_timeout_s=cfg.handshake_timeout_s,
            max_frame=self._max_frame,
            tls=cfg.tls,
        )
        self._master = MasterLink(
            cfg,
            self._creds,
            self._hello,
            self._on_abort,
            self._on_kicked,
            self._on_reconnect,
            self._faults.cut,
        )
        self._master.connect(timeout_s or cfg.connect_timeout_s)
        threading.Thread(
            target=self._master.heartbeat_loop,
            args=(cfg.heartbeat_interval_s,),
            name="cotrain-heartbeat",
            daemon=True,
        ).start()

    def close(self) -> None:
        """Leave the run cleanly: the master drops us at once, without waiting for heartbeats."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._master is not None:
            self._master.close()
        if self._links is not None:
            self._links.close()
        if self._server is not None:
            self._server.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _hello(self) -> m.Hello:
        assert self._server is not None
        resume = None
        if self._rank >= 0:
            resume = m.Resume(epoch=self._epoch, ring=self.ring, revision=self._revision)
        return m.Hello(
            peer_id=self.peer_id,
            host=self.config.advertise_host or self.config.listen_host,
            port=self.config.advertise_port or self._server.port,
            resume=resume,
            name=self.name,
        )

    def _link(self) -> MasterLink:
        if self._master is None:
            raise CommError("call connect() first")
        return self._master

    # ---- events from the master link ---------------------------------------------------------

    def _on_abort(self, msg: m.Abort) -> None:
        with self._lock:
            if msg.epoch != self._epoch:
                return
            self._broken = f"collective aborted: {msg.reason}"
            links = self._links
        if links is not None:
            links.close()

    def _on_kicked(self, reason: str) -> None:
        with self._lock:
            self._broken = f"removed by the master: {reason}"
            links = self._links
        if links is not None:
            links.close()

    def _on_reconnect(self, resumed: bool) -> None:
        with self._lock:
            self._broken = (
                "reconnected to the master" if resumed else "the master did not know our ring"
            )

    def _abort_reason(self) -> str | None:
        return self._broken

    # ---- membership --------------------------------------------------------------------------

    def update_topology(self, timeout_s: float | None = None) -> None:
        """Vote (or ask to join); returns with the new ring connected. All members must call it."""
        link = self._link()
        deadline = Deadline.after(timeout_s or self.config.request_timeout_s)
        with self._op_lock:
            # joiners announced before this vote reaches the master are admitted by it
            with link.cond:
                link.joining_epoch = -1
            gen = link.send(m.Vote())
            topo = link.wait_for(
                lambda x: isinstance(x, m.Topology),
                deadline,
                generation=gen,
                what="the new topology",
            )
            self._apply_topology(topo)

    def wait_for_world(self, n: int, timeout_s: float = 120.0) -> None:
        """Call ``update_topology`` until at least ``n`` peers are in the ring."""
        deadline = Deadline.after(timeout_s)
        while self.world_size < n:
            self.update_topology(timeout_s=deadline.check(f"{n} peers"))

    def _apply_topology(self, topo: m.Topology) -> None:
        ids = [p.peer_id for p in topo.ring]
        if self.peer_id not in ids:
            raise KickedError("the new topology does not include this peer")
        if topo.epoch == self._epoch and self._links is not None and self._broken is None:
            # Membership unchanged: keep the ring connections. Every member voted, so none is
            # in a collective: sequence numbers restart together (a member whose phase was
            # rejected because another voted had used one more than the others), and replies
            # of this epoch still in the inbox are stale.
            self._seq = 0
            self._link().purge(lambda x: getattr(x, "epoch", topo.epoch + 1) > topo.epoch)
            return
        old = self._links
        with self._lock:
            self._links = None
            self._epoch, self._ring, self._rank = (
                topo.epoch,
                list(topo.ring),
                ids.index(self.peer_id),
            )
            self._seq = 0
            self._broken = None
            stale = [k for k in self._incoming if k[0] < topo.epoch]
            stale_socks = [self._incoming.pop(k)[1] for k in stale]
        for s in stale_socks:
            close_quietly(s)
        if old is not None:
            old.close()
        self._link().purge(lambda x: getattr(x, "epoch", topo.epoch) >= topo.epoch)
        n = len(ids)
        if n == 1:
            self._links = ring.Links([], [])
            return
        nxt = topo.ring[(self._rank + 1) % n]
        prev = topo.ring[(self._rank - 1) % n]
        deadline = Deadline.after(self.config.connect_timeout_s)
        try:
            to_next = self._dial_streams(nxt)
            with self._lock:
                ok = self._lock.wait_for(
                    lambda: all(
                        (topo.epoch, j) in self._incoming for j in range(self.config.streams)
                    ),
                    timeout=deadline.remaining(),
                )
                got = [
                    self._incoming.pop((topo.epoch, j), None) for j in range(self.config.streams)
                ]
            if not ok:
                for s in to_next:
                    close_quietly(s)
                raise PeerFailedError(f"ring neighbour {prev.peer_id} did not connect in time")
            from_prev = []
            for item in got:
                assert item is not None
                if item[0] != prev.peer_id:
                    raise PeerFailedError(
                        f"ring connection from {item[0]}, expected {prev.peer_id}"
                    )
                from_prev.append(item[1])
            self._links = ring.Links(to_next, from_prev)
        except (OSError, CommError) as e:
            self._fail(0, f"could not connect the ring: {e}")
            raise PeerFailedError(f"could not connect the ring: {e}") from e

    def _dial_streams(self, nxt: m.PeerAddr) -> list[socket.socket]:
        socks: list[socket.socket | None] = [None] * self.config.streams
        errors: list[BaseException] = []

        def one(j: int) -> None:
            try:
                hello = m.RingHello(epoch=self._epoch, stream=j)
                socks[j] = dial_peer(nxt, self._creds, self.config, hello)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=one, args=(j,)) for j in range(self.config.streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            for s in socks:
                close_quietly(s)
            raise PeerFailedError(f"cannot reach ring neighbour {nxt.peer_id}: {errors[0]}")
        return [s for s in socks if s is not None]

    def _on_ring(self, sock: socket.socket, hello: m.RingHello, key: str) -> None:
        """Keep a ring stream only from our previous neighbour (by its proven key) in the
        epoch it names. A neighbour may dial as soon as it learns a new topology, before we do:
        wait for ours, but only ``connect_timeout_s`` (and the data server's per-address
        limits hold such waits), so neither strangers nor stale epochs are ever stored."""
        epoch, stream = hello.epoch, hello.stream
        if stream >= self.config.streams:
            raise CommError(f"ring stream {stream} of {self.config.streams}")
        deadline = Deadline.after(self.config.connect_timeout_s)
        with self._lock:
            wait_deadline(self._lock, lambda: self._epoch >= epoch or self._closing, deadline)
            n = len(self._ring)
            expected = self._ring[(self._rank - 1) % n].peer_id if self._rank >= 0 else None
            if epoch != self._epoch or key != expected:
                raise CommError(
                    f"ring stream from {fingerprint(key)} for epoch {epoch}: not our previous "
                    f"neighbour in epoch {self._epoch}"
                )
            old = self._incoming.get((epoch, stream))
            self._incoming[(epoch, stream)] = (key, sock)
            self._lock.notify_all()
        if old is not None:
            close_quietly(old[1])

    def _fail(self, seq: int, reason: str) -> None:
        with self._lock:
            if self._broken is None:
                self._broken = reason
            links = self._links
        if links is not None:
            links.close()
        try:
            self._link().send(m.Failed(epoch=self._epoch, seq=seq, reason=reason[:2000]))
        except CommError:
            pass

    # ---- collectives -------------------------------------------------------------------------

    def _begin(self, desc: m.Descriptor, deadline: Deadline) -> int:
        """Phase one: agree with every member on this collective; returns its sequence number."""
        link = self._link()
        if self._rank < 0:
            raise TopologyChangedError("not in the ring yet: call update_topology()")
        if self._broken is not None:
            raise TopologyChangedError(f"{self._broken}; call update_topology()")
        seq = self._seq
        self._seq += 1
        epoch = self._epoch
        gen = link.send(m.Collective(epoch=epoch, seq=seq, desc=desc))
        reply = link.wait_for(
            lambda x: isinstance(x, m.Go | m.Error) and x.epoch == epoch and x.seq == seq,
            deadline,
            generation=gen,
            what=f"agreement on {desc.kind}",
            abort_check=self._abort_reason,
        )
        if isinstance(reply, m.Error):
            raise _error_for(reply)
        return seq

    def all_reduce(
        self,
        tensor: Any,
        *,
        op: ReduceOp = "avg",
        quantization: Quantization = "none",
        timeout_s: float | None = None,
        rollback: bool = True,
    ) -> CollectiveResult:
        """Reduce ``tensor`` in place across the ring. On error it is left as it was.

        ``rollback=False`` skips saving the input of an fp32 tensor reduced in place (about 18%
        of an all-reduce on loopback): on error its contents are then undefined. For callers
        that can recompute the input, such as DiLoCo's pseudo-gradients."""
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; choose one of {', '.join(OPS)}")
        if quantization not in QUANTS:
            raise ValueError(
                f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTS)}"
            )
        view = flat_view(tensor)
        codec = codec_for(quantization, view.dtype)
        deadline = Deadline.after(timeout_s or self.config.request_timeout_s)
        with self._op_lock:
            index = self._allreduces
            self._allreduces += 1
            self._faults.check(index, 0)
            t0 = time.perf_counter()
            desc = m.Descriptor(
                kind="all_reduce", count=view.count, dtype=view.dtype, op=op, quant=quantization
            )
            seq = self._begin(desc, deadline)
            work, backup = view.work_buffer(self._scratch, rollback=rollback)
            links = self._links
            assert links is not None

            def on_chunk(k: int) -> None:
                self._faults.check(index, k)
                if self._faults.cut.is_set():  # emulate a dead link: go silent, then give up
                    threading.Event().wait(self.config.stall_timeout_s)
                    raise PeerFailedError("link cut (fault injection)")

            try:
                stats = ring.all_reduce(
                    work,
                    op=op,
                    codec=codec,
                    rank=self._rank,
                    world=self.world_size,
                    links=links,
                    epoch=self._epoch,
                    seq=seq,
                    chunk=self._chunk_values(codec),
                    stall_timeout_s=self.config.stall_timeout_s,
                    on_chunk_sent=on_chunk,
                    backup=backup,
                )
            except CollectiveError as e:
                view.finish(work, backup, ok=False)
                reason = self._broken or str(e)
                self._fail(seq, reason)
                raise PeerFailedError(f"all-reduce failed: {reason}") from None
            except BaseException:
                view.finish(work, backup, ok=False)
                raise
            view.finish(work, backup, ok=True)
            return self._account(stats, t0)

    def _chunk_values(self, codec: Codec) -> int:
        """Values per pipelined chunk: ``chunk_kb`` of *wire* bytes, so a quantized collective
        moves as few, as large, chunks as an fp32 one (and encodes fewer, larger blocks)."""
        per_value = codec.wire_nbytes(1 << 16) / (1 << 16)
        return max(1, int(self.config.chunk_kb * 1024 / per_value))

    def all_reduce_async(self, tensor: Any, **kwargs: Any) -> Handle:
        """Start an all-reduce on a worker thread; do not touch ``tensor`` until ``wait()``."""
        return Handle(self._executor.submit(self.all_reduce, tensor, **kwargs))

    def broadcast(
        self, tensor: Any, *, root: int = 0, timeout_s: float | None = None
    ) -> CollectiveResult:
        """Copy rank ``root``'s tensor into every peer's (bytes as they are, no quantization)."""
        view = flat_view(tensor)
        deadline = Deadline.after(timeout_s or self.config.request_timeout_s)
        with self._op_lock:
            t0 = time.perf_counter()
            if not 0 <= root < max(self.world_size, 1):
                raise ValueError(f"root {root} is not a rank of this {self.world_size}-peer ring")
            desc = m.Descriptor(kind="broadcast", count=view.count, dtype=view.dtype, root=root)
            seq = self._begin(desc, deadline)
            n = self.world_size
            is_root = self._rank == root
            src = view.array.view(np.uint8)
            data = src if is_root else np.empty_like(src)
            links = self._links
            assert links is not None
            if n == 1:
                return self._account(TransferStats(), t0)
            try:
                stats = ring.broadcast(
                    data,
                    is_root=is_root,
                    next_is_root=(self._rank + 1) % n == root,
                    links=links,
                    epoch=self._epoch,
                    seq=seq,
                    chunk_bytes=self.config.chunk_kb * 1024,
                    stall_timeout_s=self.config.stall_timeout_s,
                )
            except CollectiveError as e:
                reason = self._broken or str(e)
                self._fail(seq, reason)
                raise PeerFailedError(f"broadcast failed: {reason}") from None
            if not is_root:
                src[...] = data
                view.commit()
            return self._account(stats, t0)

    def _account(self, stats: TransferStats, t0: float) -> CollectiveResult:
        self.bytes_sent += stats.bytes_sent
        self.bytes_received += stats.bytes_received
        return CollectiveResult(
            time.perf_counter() - t0,
            stats.bytes_sent,
            stats.bytes_received,
            self.world_size,
            self._epoch,
        )

    # ---- shared state ------------------------------------------------------------------------

    def sync_shared_state(
        self,
        state: Mapping[str, Any],
        *,
        revision: int,
        weight: float = 0.0,
        timeout_s: float | None = None,
    ) -> SyncResult:
        """Make ``state`` equal the majority's (hash-checked); revisions go up by one per sync.

        ``weight`` (>= 0, e.g. tokens trained) rides along: the result's ``total_weight`` sums
        it over the peers that kept their state, the same float on every peer, so a weighted
        average that follows needs no collective of its own."""
        link = self._link()
        flat = views(state)
        mine = digest(flat, revision)
        deadline = Deadline.after(timeout_s or self.config.request_timeout_s)
        with self._op_lock:
            if self._rank < 0:
                raise TopologyChangedError("not in the ring yet: call update_topology()")
            if self._broken is not None:
                raise TopologyChangedError(f"{self._broken}; call update_topology()")
            epoch, seq = self._epoch, self._seq
            self._seq += 1
            with self._lock:
                self._serving = (epoch, seq, flat)
            try:
                gen = link.send(
                    m.Sync(
                        epoch=epoch,
                        seq=seq,
                        revision=revision,
                        digest=mine.digest,
                        hashes=mine.hashes,
                        fresh=self._revision is None,
                        weight=weight,
                    )
                )

                def match(kind: Any) -> Any:
                    return lambda x: (
                        isinstance(x, kind | m.Error) and x.epoch == epoch and x.seq == seq
                    )

                plan = link.wait_for(
                    match(m.SyncPlan),
                    deadline,
                    generation=gen,
                    what="the shared-state plan",
                    abort_check=self._abort_reason,
                )
                if isinstance(plan, m.Error):
                    raise _error_for(plan)
                source, received, failure = None, 0, ""
                if plan.action == "fetch":
                    source, received, failure = self._fetch(flat, plan)
                    link.send(
                        m.SyncResult(epoch=epoch, seq=seq, ok=source is not None, reason=failure)
                    )
                done = link.wait_for(
                    match(m.SyncDone),
                    deadline,
                    generation=gen,
                    what="the end of the shared-state sync",
                    abort_check=self._abort_reason,
                )
                if isinstance(done, m.Error):
                    raise _error_for(done)
                if plan.action == "fetch" and source is None:
                    raise StateSyncError(f"could not fetch the majority's state: {failure}")
                self._revision = plan.revision
                self.bytes_received += received
                return SyncResult(
                    plan.revision, plan.action == "fetch", received, source, plan.total_weight
                )
            finally:
                with self._lock:
                    self._serving = None

    def _fetch(self, flat: Any, plan: m.SyncPlan) -> tuple[str | None, int, str]:
        return fetch_from_sources(flat, plan, creds=self._creds, config=self.config)

    def _is_member(self, key: str) -> bool:
        with self._lock:
            return any(p.peer_id == key for p in self._ring)

    def _on_state(self, sock: socket.socket, hello: m.StateHello, key: str) -> None:
        with self._lock:
            serving = self._serving
        sock.settimeout(self.config.stall_timeout_s)
        try:
            if not self._is_member(key):
                raise CommError(f"state request from {fingerprint(key)}, not a member")
            if serving is None or (hello.epoch, hello.seq) != serving[:2]:
                send_json(sock, m.StateMissing(name="(not serving this sync)").dump())
                return
            serve_state(sock, serving[2], self._max_frame)
        finally:
            close_quietly(sock)

    # ---- ring optimisation -------------------------------------------------------------------

    def optimize_topology(
        self, *, probe_mb: float = 1.0, timeout_s: float | None = None
    ) -> list[str]:
        """Measure peer-to-peer bandwidth and reorder the ring to maximise its slowest link."""
        link = self._link()
        deadline = Deadline.after(timeout_s or self.config.request_timeout_s)
        with self._op_lock:
            nbytes = max(1, int(probe_mb * (1 << 20)))
            self._begin(m.Descriptor(kind="optimize", count=nbytes), deadline)
            epoch = self._epoch
            gen = link.generation
            while True:
                msg = link.wait_for(
                    lambda x: (
                        (isinstance(x, m.Probe) and x.epoch == epoch)
                        or (isinstance(x, m.Topology) and x.epoch > epoch)
                    ),
                    deadline,
                    generation=gen,
                    what="probe orders",
                    abort_check=self._abort_reason,
                )
                if isinstance(msg, m.Topology):
                    self._apply_topology(msg)
                    return self.ring
                mbps = self._probe(msg.target, msg.nbytes)
                link.send(m.ProbeResult(epoch=epoch, target=msg.target.peer_id, mbps=mbps))

    def _probe(self, target: m.PeerAddr, nbytes: int) -> float:
        return probe.send(target, nbytes, self._creds, self.config)

    def _on_probe(self, sock: socket.socket, hello: m.ProbeHello, key: str) -> None:
        if not self._is_member(key):
            close_quietly(sock)
            raise CommError(f"probe from {fingerprint(key)}, not a member")
        probe.serve(sock, hello, stall_timeout_s=self.config.stall_timeout_s)


def _error_for(reply: m.Error) -> CommError:
    text = reply.message
    if reply.kind == "mismatch":
        return MismatchError(text)
    if reply.kind == "revision":
        return RevisionError(text)
    if reply.kind == "peer_failed":
        return PeerFailedError(text)
    return TopologyChangedError(text)


def all_reduce_with_retry(
    comm: Communicator,
    tensor: Any,
    *,
    attempts: int = 5,
    rejoin_timeout_s: float = 120.0,
    **kwargs: Any,
) -> CollectiveResult:
    """All-reduce; on a peer failure, update the topology and retry with the survivors.

    ``attempts`` bounds the all-reduces tried. Between two of them ``update_topology`` may
    itself fail a few times in quick succession when this peer was dropped (kicked, then the old
    master link's end, then the reconnect): it is retried until ``rejoin_timeout_s``."""
    for attempt in range(1, attempts + 1):
        try:
            return comm.all_reduce(tensor, **kwargs)
        except RETRYABLE as e:
            if attempt == attempts:
                raise
            log.info("all-reduce failed (%s); updating the topology and retrying", e)
        deadline = Deadline.after(rejoin_timeout_s)
        while True:
            try:
                comm.update_topology(timeout_s=max(deadline.remaining(), 0.001))
                break
            except RETRYABLE as e:
                if deadline.expired():
                    raise
                log.info("topology update failed (%s); trying again", e)
                threading.Event().wait(0.05)  # back off: the master link may be reconnecting
    raise AssertionError("unreachable")
