"""``Communicator``: one peer's handle on the run, a thin facade over the jobs that make it up.

==================  ============================================================================
``membership.py``   the ring of this epoch, links to the neighbours, agreement with the master
``collectives.py``  all-reduce and broadcast (agree, then move bytes around the ring)
``state.py``        shared-state sync: hashes to the master, fetch the majority's, serve members
``probe.py``        bandwidth probes and the reordered ring
``control.py``      the link to the master (hello/resume, heartbeats, inbox, reconnection)
``transport.py``    authenticated sockets and the data server (ring, state, probe connections)
==================  ============================================================================

A peer is a key: ``peer_id`` is its ed25519 public key (``CommConfig.key_file``, or a fresh key
per process), proven on every connection (``auth.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from cotrain.comm import messages as m
from cotrain.comm import probe
from cotrain.comm.auth import (
    Admission,
    Credentials,
    fingerprint,
    load_identity,
    load_token,
    resolve_secret,
)
from cotrain.comm.collectives import CollectiveResult, Collectives, Handle
from cotrain.comm.config import CommConfig, Quantization, ReduceOp
from cotrain.comm.control import MasterLink
from cotrain.comm.errors import RETRYABLE, CommError, PeerFailedError, TopologyChangedError
from cotrain.comm.faults import FaultInjector, FaultPlan
from cotrain.comm.membership import Membership
from cotrain.comm.state import SharedState, SyncResult
from cotrain.comm.transport import DataServer
from cotrain.core.clock import Deadline
from cotrain.core.identity import Identity

log = logging.getLogger("cotrain.comm")

REVOTE_S = 2.0
"""``wait_for_world``: the longest wait before voting again (for a joiner, or after a failure)."""
REVOTE_BACKOFF_S = 0.1
"""``wait_for_world``: the wait before voting again after the first failure, doubling after each."""

__all__ = ["CollectiveResult", "Communicator", "Handle", "SyncResult", "all_reduce_with_retry"]


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
        creds = Credentials(ident, secret, load_token(config.token_file))
        self.peer_id = ident.public_hex
        """This peer's id: its ed25519 public key (64 hex)."""
        self.name = name or fingerprint(self.peer_id)
        """A label for logs; the master logs it beside the key."""
        # Members are whoever the master announced; the secret, when there is one, must be
        # proven on data connections too.
        self._admission = Admission(secret=secret, open=True)
        self._faults = FaultInjector(faults)
        self._ms = Membership(config, creds)
        self._collectives = Collectives(self._ms, config, self._faults)
        self._state = SharedState(self._ms, config)
        self._server: DataServer | None = None
        self._master: MasterLink | None = None
        self.run_revision: int | None = None
        """The run's shared-state revision when ``connect()`` reached the master: None while
        the run has not started (no state synced), else this peer joins a run in progress."""

    # ---- properties --------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """Position in the ring (-1 until admitted)."""
        return self._ms.rank

    @property
    def world_size(self) -> int:
        return len(self._ms.ring)

    @property
    def epoch(self) -> int:
        return self._ms.epoch

    @property
    def ring(self) -> list[str]:
        """The members' ids (public keys) in ring order."""
        return self._ms.ids

    @property
    def ring_names(self) -> list[str]:
        """The members' labels in ring order (for logs and scripts; ids are the keys)."""
        return [p.name or fingerprint(p.peer_id) for p in self._ms.ring]

    @property
    def vote_wanted(self) -> bool:
        """True when ``update_topology()`` has work to do: peers wait to join, a member left
        (cleanly or not), the master restarted, or this peer is not in the ring. Otherwise a
        caller may skip its vote; a change it has not heard of yet fails its next collective
        with a retryable error, after which it votes."""
        return self._ms.vote_wanted()

    @property
    def revision(self) -> int | None:
        """Revision of the last shared state this peer synced."""
        return self._state.revision

    @property
    def data_port(self) -> int:
        """The port of this peer's data server (ring, state and probe connections)."""
        if self._server is None:
            raise CommError("call connect() first")
        return self._server.port

    @property
    def bytes_sent(self) -> int:
        return self._ms.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._ms.bytes_received

    # ---- lifecycle ---------------------------------------------------------------------------

    def connect(self, timeout_s: float | None = None) -> None:
        """Start the data server and reach the master (retrying until ``timeout_s``)."""
        cfg = self.config
        ms = self._ms
        self._server = DataServer(
            cfg.listen_host,
            cfg.listen_port,
            ms.creds.identity,
            self._admission,
            {"ring": ms.on_ring, "state": self._state.on_state, "probe": probe.handler(ms)},
            handshake_timeout_s=cfg.handshake_timeout_s,
            max_frame=cfg.max_frame_kb * 1024,
            tls=cfg.tls,
        )
        self._master = MasterLink(
            cfg,
            ms.creds,
            self._hello,
            ms.on_abort,
            ms.on_kicked,
            ms.on_reconnect,
            self._faults.cut,
        )
        ms.attach(self._master)
        welcome = self._master.connect(timeout_s or cfg.connect_timeout_s)
        self.run_revision = welcome.state_revision
        threading.Thread(
            target=self._master.heartbeat_loop,
            args=(cfg.heartbeat_interval_s,),
            name="cotrain-heartbeat",
            daemon=True,
        ).start()

    def close(self) -> None:
        """Leave the run cleanly: the master drops us at once, without waiting for heartbeats."""
        if self._master is not None:
            self._master.close()
        self._ms.close()
        if self._server is not None:
            self._server.close()
        self._collectives.close()

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _hello(self) -> m.Hello:
        assert self._server is not None
        ms = self._ms
        resume = None
        if ms.rank >= 0:
            done = ms.outcome if ms.outcome and ms.outcome[0] == ms.epoch else None
            resume = m.Resume(
                epoch=ms.epoch,
                ring=ms.ids,
                revision=self._state.revision,
                done_seq=done[1] if done else None,
                committed=done[2] if done else False,
            )
        return m.Hello(
            peer_id=self.peer_id,
            host=self.config.advertise_host or self.config.listen_host,
            port=self.config.advertise_port or self._server.port,
            resume=resume,
            name=self.name,
        )

    # ---- membership --------------------------------------------------------------------------

    def update_topology(self, timeout_s: float | None = None) -> None:
        """Vote (or ask to join); returns with the new ring connected. All members must call it."""
        ms = self._ms
        link = ms.link
        deadline = Deadline.after(timeout_s or self.config.request_timeout_s)
        with ms.op_lock, ms.awaiting_topology():
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
            ms.apply_topology(topo)

    def wait_for_world(self, n: int, timeout_s: float = 120.0) -> None:
        """Call ``update_topology`` until at least ``n`` peers are in the ring, connected.

        A ring that could not connect (a neighbour that left, or whose connection did not get
        through in time on a lossy link) is voted on again, after a short backoff; a ring that
        is whole but short votes again once the master announces a joiner or a member goes (or
        after ``REVOTE_S``), not in a tight loop. ``TimeoutExpired`` names the last failure; being
        removed by the master (``KickedError``) and ``close()`` end the wait at once."""
        deadline = Deadline.after(timeout_s)
        if self.world_size >= n:
            return
        last, failures = "", 0
        while True:
            left = deadline.check(f"{n} peers ({self.world_size} in the ring so far{last})")
            try:
                self.update_topology(timeout_s=left)
            except (PeerFailedError, TopologyChangedError) as e:
                if self._ms.closing:
                    raise
                last, failures = f"; last: {e}", failures + 1
                log.info("the ring did not form (%s); voting again", e)
                pause = REVOTE_BACKOFF_S * 2 ** (failures - 1)
                time.sleep(min(pause, REVOTE_S, deadline.remaining()))
                continue
            if self.world_size >= n:
                return
            last, failures = "", 0
            # ... or once a member goes (the master aborts the epoch): vote for the next one
            self._ms.link.wait_joining(
                self.epoch,
                min(REVOTE_S, deadline.remaining()),
                stop=lambda: self._ms.broken is not None,
            )

    # ---- the jobs ----------------------------------------------------------------------------

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
        return self._collectives.all_reduce(
            tensor, op=op, quantization=quantization, timeout_s=timeout_s, rollback=rollback
        )

    def all_reduce_async(self, tensor: Any, **kwargs: Any) -> Handle:
        """Start an all-reduce on a worker thread; do not touch ``tensor`` until ``wait()``."""
        return self._collectives.all_reduce_async(tensor, **kwargs)

    def broadcast(
        self, tensor: Any, *, root: int = 0, timeout_s: float | None = None
    ) -> CollectiveResult:
        """Copy rank ``root``'s tensor into every peer's (bytes as they are, no quantization)."""
        return self._collectives.broadcast(tensor, root=root, timeout_s=timeout_s)

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
        return self._state.sync(state, revision=revision, weight=weight, timeout_s=timeout_s)

    def optimize_topology(
        self, *, probe_mb: float = 1.0, timeout_s: float | None = None
    ) -> list[str]:
        """Measure peer-to-peer bandwidth and reorder the ring to maximise its slowest link."""
        deadline = Deadline.after(timeout_s or self.config.request_timeout_s)
        return probe.optimize(self._ms, probe_mb=probe_mb, deadline=deadline)


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
