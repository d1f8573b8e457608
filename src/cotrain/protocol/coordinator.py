"""The coordinator: an HTTP service that sequences signed writes into the ledger.

Writes (all ``POST``, signed: ``auth``) are applied to the state in the event loop as they
arrive, in order, and buffered; a committer writes each buffer to the database in one
transaction (group commit) and only then answers the writers. While one batch commits, the next
fills. If a commit fails (a full disk), every write not yet committed is answered 503, the state
is reloaded from the database, and nothing anyone was told is lost.

Reads (``GET``) are public::

    /v1/status                          sizes, the latest checkpoint, what the coordinator is
    /v1/state                           the whole state (what ``cotrain audit`` replays to)
    /v1/tasks, /v1/tasks/{t}            tasks; one task with its members
    /v1/tasks/{t}/work?node=&after=     work units, 100 at a time
    /v1/tasks/{t}/shares                ownership shares (frozen at finalize)
    /v1/accounts/{key}                  claimable, locked, claimed
    /v1/identities/{key}
    /v1/log/checkpoint[?size=N]         a signed checkpoint (C2SP note), cosignatures appended
    /v1/log/checkpoints?after=N         the sizes with checkpoints
    /v1/log/entries?start=&end=         entries as canonical JSON lines (at most 1000)
    /v1/log/proof/inclusion?index=&size=
    /v1/log/proof/consistency?old=&new=

Heartbeats (``POST /v1/tasks/{t}/heartbeat``, signed) are not logged; the transitions they
cause are, as entries the coordinator signs itself (``member.status``). Witnesses co-sign
checkpoints with ``POST /v1/log/cosign``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from cotrain.core.identity import Identity
from cotrain.protocol import auth, ingest, merkle, note
from cotrain.protocol.config import CoordinatorConfig
from cotrain.protocol.db import Batch, Database, SQLWork
from cotrain.protocol.errors import (
    Conflict,
    Forbidden,
    NotFound,
    ProtocolError,
    RequestError,
    Unavailable,
)
from cotrain.protocol.ingest import VERIFIED
from cotrain.protocol.ledger import TILE, ZERO, Entry, Tree
from cotrain.protocol.state import ACTIVE, State

log = logging.getLogger("cotrain.protocol.coordinator")
MAX_ENTRIES_PER_READ = 1000


def now_ms() -> int:
    return int(time.time() * 1000)


class SeenKeys:
    """Work keys already in the ledger, as a Bloom filter that grows: a new key (the common
    case) is known new without a database read; a hit is checked in the database.

    Work keys are sha256 hex, so their own bits index the filter. A client that picks keys to
    collide costs us database reads, never a wrong answer."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._filters: list[tuple[bytearray, int]] = []
        self._capacity = capacity
        self._count = 0
        self._grow()

    def _grow(self) -> None:
        bits = self._capacity * 10  # ten bits a key: ~1% false hits with 7 probes
        self._filters.append((bytearray(bits // 8 + 1), bits))
        self._count = 0

    @staticmethod
    def _probes(key: str, bits: int) -> list[int]:
        v = int(key[:56], 16)  # 224 bits of the key: seven 32-bit probes
        return [((v >> s) & 0xFFFFFFFF) % bits for s in (0, 32, 64, 96, 128, 160, 192)]

    def add(self, key: str) -> None:
        if self._count >= self._capacity:
            self._capacity *= 2
            self._grow()
        arr, bits = self._filters[-1]
        for p in self._probes(key, bits):
            arr[p >> 3] |= 1 << (p & 7)
        self._count += 1

    def may_contain(self, key: str) -> bool:
        for arr, bits in self._filters:
            if all(arr[p >> 3] & (1 << (p & 7)) for p in self._probes(key, bits)):
                return True
        return False


class _GuardedWork(SQLWork):
    """``SQLWork`` that asks the database only when the Bloom filter says it may know a key."""

    def __init__(self, db: Database, seen: SeenKeys) -> None:
        super().__init__(db)
        self.seen = seen

    def get(self, key: str) -> Any:
        if key not in self._cache and not self.seen.may_contain(key):
            return None
        return super().get(key)

    def put(self, unit: Any) -> None:
        super().put(unit)
        self.seen.add(unit.key)


@dataclass
class _Pending:
    """Writes applied to the state but not yet committed."""

    entries: list[tuple[int, int, str, str, str | None, bytes, bytes]] = field(default_factory=list)
    tiles: list[tuple[int, bytes]] = field(default_factory=list)
    waiters: list[tuple[asyncio.Future[dict[str, Any]], dict[str, Any]]] = field(
        default_factory=list
    )


class Coordinator:
    def __init__(self, cfg: CoordinatorConfig, identity: Identity, db: Database) -> None:
        self.cfg = cfg
        self.identity = identity
        self.key = identity.public_hex
        self.db = db
        self.replay = auth.Replay(int(cfg.window_s * 1000))
        self.rate = auth.RateLimit(cfg.rate_per_key, cfg.burst_per_key)
        self.seen_ms: dict[tuple[str, str], float] = {}
        self._status_writes: dict[tuple[str, str], str] = {}
        self.front: Any = None
        """The ingest processes, when there are any (``_Front``)."""
        self.trust_verified = False
        """Writes marked by an ingest process skip the signature check (only when the HTTP
        app is served on the private Unix socket alone)."""
        self.started = time.monotonic()
        self.commits = 0
        self.failed_commits = 0
        self._pending = _Pending()
        self._kick = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._last_cp_size = 0
        self._last_cp_t = time.monotonic()
        self._prev = ZERO
        self.state = State()
        self.work: _GuardedWork
        self.tree: Tree
        self._load()
        self._remember_recent_nonces()

    # ---- start, reload ---------------------------------------------------------------------

    def _load(self) -> None:
        """(Re)build the state and tree from the database: at start and after a failed commit."""
        self.work = _GuardedWork(self.db, SeenKeys())
        self.state = State(self.work)
        stored = self.db.load(TILE)
        tree_obj: dict[str, Any] | None = None
        for oid, obj in stored.objects:
            if oid == "tree":
                tree_obj = obj
            else:
                self.state.load(oid, obj)
        self.tree = Tree(self.db.leaves)
        self.tree.tiles = bytearray(stored.tiles)
        self.tree.tail = list(stored.tail)
        if stored.size:
            if tree_obj is None or self.state.size != stored.size:
                raise Unavailable(
                    f"the database holds {stored.size} entries but state for "
                    f"{self.state.size}: start with --rebuild to replay the ledger"
                )
            self.tree.frontier = merkle.Frontier.from_json(tree_obj["frontier"])
            self._prev = tree_obj["prev"]
            for key in self.db.work_keys():
                self.work.seen.add(key)
        else:
            self._prev = ZERO
        if self.state.coordinator and self.state.coordinator != self.key:
            raise Forbidden(
                f"this database is the ledger of coordinator {self.state.coordinator[:16]}...; "
                "start with that key"
            )
        if self.state.window_ms and self.state.window_ms != self.replay.window_ms:
            log.warning(
                "this ledger's clock window is %.0f s (its genesis); --window_s is ignored",
                self.state.window_ms / 1000,
            )
            self.replay.window_ms = self.state.window_ms
        cp = self.db.checkpoint()
        self._last_cp_size = cp["size"] if cp else 0
        self.state.dirty.clear()

    def _remember_recent_nonces(self) -> None:
        """The nonces of the entries whose requests could still pass the clock check (those
        sequenced within twice the window): the replay cache lives in memory, so without them a
        request acknowledged just before a crash (a claim) would be accepted again after it."""
        cutoff = now_ms() - 2 * self.replay.window_ms
        recent: list[tuple[int, str, str]] = []
        hi = self.state.size
        while hi > 0:
            lo = max(0, hi - MAX_ENTRIES_PER_READ)
            rows = self.db.entries(lo, hi)
            for data in reversed(rows):
                obj = json.loads(data)
                if obj["ts"] < cutoff:
                    hi = 0
                    break
                recent.append((obj["ts"], obj["req"]["key"], obj["req"]["nonce"]))
            else:
                hi = lo
        for ts, key, nonce in reversed(recent):
            self.replay.remember(key, nonce, ts)

    async def start(self) -> None:
        self._committer = asyncio.create_task(self._commit_loop())
        self._sweeper = asyncio.create_task(self._sweep_loop())
        if self.state.size == 0:
            genesis = {
                "origin": self.cfg.origin,
                "coordinator": self.key,
                "window_ms": self.replay.window_ms,
            }
            await self.write(auth.sign(self.identity, "LEDGER", "/v1/genesis", genesis))
        # members that were alive before a restart get a fresh grace period
        t = time.monotonic()
        for (task, node), m in self.state.members.items():
            if m.status in ACTIVE:
                self.seen_ms[(task, node)] = t

    async def stop(self) -> None:
        for t in (self._sweeper, self._committer):
            if t is not None:
                t.cancel()
        for t in (self._sweeper, self._committer):
            if t is not None:
                try:
                    await t
                except asyncio.CancelledError:
                    pass
        if self._pending.entries:
            self._flush_now()

    # ---- writes ----------------------------------------------------------------------------

    async def write(self, req: auth.SignedRequest) -> dict[str, Any]:
        """Apply ``req`` and wait until its entry is committed; its result, with ``seq``."""
        st = self.state
        seq, ts = st.size, max(now_ms(), st.ts_ms)
        applied = st.apply(seq, ts, req)  # a refusal raises here and changes nothing
        entry = Entry(seq, ts, self._prev, applied.kind, req)
        data = entry.encode()
        leaf = merkle.leaf_hash(data)
        self._prev = leaf.hex()
        tile = self.tree.append(leaf)
        p = self._pending
        p.entries.append((seq, ts, applied.kind, req.key, _task_of(req.path), leaf, data))
        if tile is not None:
            p.tiles.append((seq // TILE, tile))
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        p.waiters.append((fut, {**applied.result, "seq": seq}))
        self._kick.set()
        try:  # on timeout the future is cancelled: the committer skips it
            return await asyncio.wait_for(fut, self.cfg.write_timeout_s)
        except TimeoutError:
            raise Unavailable("the write was not committed in time; retry") from None

    def _take(self) -> tuple[Batch, list[tuple[asyncio.Future[dict[str, Any]], dict[str, Any]]]]:
        """Cut the pending writes into a batch (in the loop: the state does not move meanwhile)."""
        p, self._pending = self._pending, _Pending()
        st = self.state
        objs = [(oid, json.dumps(obj)) for oid, obj in st.objects()]
        tree = {"frontier": self.tree.frontier.to_json(), "prev": self._prev}
        objs.append(("tree", json.dumps(tree)))
        st.dirty.clear()
        units = [Batch.unit_row(u) for u in self.work.take_dirty()]
        batch = Batch(entries=p.entries, objects=objs, units=units, tiles=p.tiles)
        if self._checkpoint_due():
            batch.checkpoint = self._checkpoint()
        return batch, p.waiters

    def _checkpoint_due(self) -> bool:
        st = self.state
        return st.size - self._last_cp_size >= self.cfg.checkpoint_every or (
            st.size > self._last_cp_size
            and time.monotonic() - self._last_cp_t >= self.cfg.checkpoint_interval_s
        )

    def _checkpoint(self) -> dict[str, Any]:
        st = self.state
        root = self.tree.root()
        state_root = st.root()
        cp = note.Checkpoint(
            origin=st.origin or self.cfg.origin,
            size=st.size,
            root=root,
            extensions=[f"state {state_root}", f"time {st.ts_ms}"],
        )
        text = note.sign_note(note.format_checkpoint(cp), cp.origin, self.identity)
        return {
            "size": st.size,
            "ts": st.ts_ms,
            "root": root,
            "state_root": state_root,
            "note": text,
        }

    async def _commit_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # wake up to cut a checkpoint when due
                await asyncio.wait_for(self._kick.wait(), self.cfg.checkpoint_interval_s)
            self._kick.clear()
            if not self._pending.waiters and not self._checkpoint_due():
                continue
            batch, waiters = self._take()
            try:
                await asyncio.to_thread(self.db.commit, batch)
            except Unavailable as e:
                self._fail(waiters, e)
                continue
            self.commits += 1
            if batch.checkpoint is not None:
                self._last_cp_size = batch.checkpoint["size"]
                self._last_cp_t = time.monotonic()
            for fut, result in waiters:
                if not fut.done():
                    fut.set_result(result)
            self.work.trim()

    def _fail(self, waiters: list[Any], e: Unavailable) -> None:
        """A commit failed: nothing of this batch or after it is kept; reload what is."""
        self.failed_commits += 1
        log.error("commit failed, reloading the state from the database: %s", e)
        later, self._pending = self._pending.waiters, _Pending()
        for fut, _ in [*waiters, *later]:
            if not fut.done():
                fut.set_exception(Unavailable(f"{e}; nothing was written, retry"))
        self._load()

    def _flush_now(self) -> None:
        """Commit what is pending, synchronously (at stop)."""
        batch, waiters = self._take()
        try:
            self.db.commit(batch)
        except Unavailable as e:
            self._fail(waiters, e)
            return
        for fut, result in waiters:
            if not fut.done():
                fut.set_result(result)

    # ---- liveness --------------------------------------------------------------------------

    def heartbeat(self, req: auth.SignedRequest, task_id: str) -> dict[str, Any]:
        m = self.state.members.get((task_id, req.key))
        if m is None or m.status not in ACTIVE:
            status = "not a member" if m is None else m.status
            raise Forbidden(f"{req.key[:16]}... is {status} of {task_id}")
        self.seen_ms[(task_id, req.key)] = time.monotonic()
        if m.status != "healthy":  # joined or unhealthy: record that it is alive
            self._record_status(task_id, req.key, "healthy")
        task = self.state.tasks[task_id]
        return {
            "task": task_id,
            "task_state": task.state,
            "status": m.status,
            "heartbeat_s": self.cfg.heartbeat_s,
            "checkpoint": self._last_cp_size,
        }

    def _record_status(self, task_id: str, node: str, status: str) -> None:
        """Write a member's new status (once: a second heartbeat before the entry is applied
        does not write it again)."""
        if self._status_writes.get((task_id, node)) == status:
            return
        self._status_writes[(task_id, node)] = status
        path = f"/v1/tasks/{task_id}/members/{node}"
        req = auth.sign(self.identity, "LEDGER", path, {"status": status})

        def done(fut: asyncio.Future[Any]) -> None:
            if self._status_writes.get((task_id, node)) == status:
                del self._status_writes[(task_id, node)]
            _log_failure(fut)

        asyncio.ensure_future(self.write(req)).add_done_callback(done)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.cfg.heartbeat_s / 2))
            self.sweep(time.monotonic())

    def sweep(self, t: float) -> None:
        for (task_id, node), m in list(self.state.members.items()):
            if m.status not in ACTIVE:
                self.seen_ms.pop((task_id, node), None)
                continue
            last = self.seen_ms.setdefault((task_id, node), t)
            silent = t - last
            if silent >= self.cfg.dead_after_s:
                self._record_status(task_id, node, "dead")
                self.seen_ms.pop((task_id, node), None)
            elif silent >= self.cfg.unhealthy_after_s and m.status != "unhealthy":
                self._record_status(task_id, node, "unhealthy")

    # ---- HTTP ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.cfg.max_body_kb * 1024, middlewares=[self._errors]
        )
        get = [
            ("/v1/status", self._h_status),
            ("/v1/state", self._h_state),
            ("/v1/tasks", self._h_tasks),
            ("/v1/tasks/{t}", self._h_task),
            ("/v1/tasks/{t}/work", self._h_work),
            ("/v1/tasks/{t}/shares", self._h_shares),
            ("/v1/tasks/{t}/reports", self._h_reports),
            ("/v1/market", self._h_market),
            ("/v1/tasks/{t}/shares/export", self._h_shares_export),
            ("/v1/accounts/{k}", self._h_account),
            ("/v1/identities/{k}", self._h_identity),
            ("/v1/log/checkpoint", self._h_checkpoint),
            ("/v1/log/checkpoints", self._h_checkpoints),
            ("/v1/log/entries", self._h_entries),
            ("/v1/log/proof/inclusion", self._h_inclusion),
            ("/v1/log/proof/consistency", self._h_consistency),
        ]
        app.add_routes([web.get(path, h) for path, h in get])
        app.add_routes([web.get("/", self._h_dashboard), web.get("/ui/{name}", self._h_ui)])
        app.add_routes(
            [
                web.post("/v1/tasks/{t}/heartbeat", self._h_heartbeat),
                web.post("/v1/log/cosign", self._h_cosign),
                web.post("/{tail:.*}", self._h_write),
            ]
        )
        return app

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProtocolError as e:
            return web.json_response({"error": str(e)[:500]}, status=e.status)
        except web.HTTPRequestEntityTooLarge:
            return web.json_response(
                {"error": f"request body is over the {self.cfg.max_body_kb} KB limit"},
                status=413,
            )
        except web.HTTPException as e:  # the router's 404 and 405: JSON like every other error
            if e.status < 400:
                raise
            allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            return web.json_response(
                {"error": f"{e.reason}: {request.method} {request.path[:80]}"},
                status=e.status,
                headers=allow,
            )

    async def _signed(self, request: web.Request) -> auth.SignedRequest:
        raw = await request.read()
        if self.trust_verified and request.headers.get(VERIFIED) == "1":
            # an ingest process checked the signature and the canonical body (ingest.py)
            h = request.headers
            req = auth.SignedRequest(
                h[auth.H_KEY],
                int(h[auth.H_TIME]),
                h[auth.H_NONCE],
                request.method,
                request.path,
                json.loads(raw),
                h[auth.H_SIG],
                raw,
            )
        else:
            req = auth.read(
                request.method,
                request.path,
                request.headers,
                raw,
                max_body=self.cfg.max_body_kb * 1024,
            )
        t = time.time()
        self.rate.take(req.key, t)
        self.replay.check(req.key, req.nonce, req.ts_ms, int(t * 1000))
        return req

    async def _h_write(self, request: web.Request) -> web.Response:
        req = await self._signed(request)
        result = await self.write(req)
        if req.path.endswith("/join"):  # the credential its comm run accepts
            from cotrain.comm.auth import issue_token

            task_id = req.path.split("/")[3]
            token = issue_token(self.identity, req.key, run=task_id, ttl_s=self.cfg.token_ttl_s)
            result["admission_token"] = token.to_json()
            result["coordinator"] = self.key
        return web.json_response(result)

    async def _h_heartbeat(self, request: web.Request) -> web.Response:
        req = await self._signed(request)
        if req.body:
            raise RequestError("a heartbeat has an empty body ({})")
        return web.json_response(self.heartbeat(req, request.match_info["t"]))

    async def _h_cosign(self, request: web.Request) -> web.Response:
        """A witness's signature on a checkpoint it checked: ``{"note": <note + its line>}``."""
        req = await self._signed(request)
        text = req.body.get("note")
        if not isinstance(text, str) or set(req.body) != {"note"}:
            raise RequestError('a cosignature is {"note": "<the checkpoint with your line>"}')
        rec = self.state.identities.get(req.key)
        if rec is None or "witness" not in rec.roles:
            raise Forbidden(f"{req.key[:16]}... is not registered as a witness")
        try:
            parsed = note.parse_note(text)
            cp = note.parse_checkpoint(parsed.text)
            verified = note.verify_note(text, {rec.name: bytes.fromhex(req.key)})
        except (note.NoteError, ValueError) as e:
            raise RequestError(f"cosignature: {e}") from None
        stored = await asyncio.to_thread(self.db.checkpoint, cp.size)
        if stored is None or note.parse_note(stored["note"]).text != parsed.text:
            raise NotFound(f"no checkpoint of size {cp.size} with that text")
        line = next(s for s in verified.signatures if s.name == rec.name)
        text_line = f"— {line.name} {base64.b64encode(line.key_id + line.sig).decode()}"
        await asyncio.to_thread(self.db.add_cosignature, cp.size, req.key, text_line)
        return web.json_response({"size": cp.size, "witness": req.key})

    async def _h_status(self, request: web.Request) -> web.Response:
        st = self.state
        return web.json_response(
            {
                "coordinator": self.key,
                "origin": st.origin,
                "size": st.size,
                "checkpoint": self._last_cp_size,
                "tasks": len(st.tasks),
                "identities": len(st.identities),
                "uptime_s": round(time.monotonic() - self.started, 1),
                "commits": self.commits,
                "failed_commits": self.failed_commits,
            }
        )

    async def _h_state(self, request: web.Request) -> web.Response:
        view = self.state.view()
        return web.json_response({**view, "root": self.state.root()})

    async def _h_tasks(self, request: web.Request) -> web.Response:
        st = self.state
        return web.json_response({"tasks": [st.task_view(t) for t in st.tasks.values()]})

    async def _h_task(self, request: web.Request) -> web.Response:
        st = self.state
        task = st.tasks.get(request.match_info["t"])
        if task is None:
            raise NotFound(f"no task {request.match_info['t'][:40]}")
        members = [st.member_view(m, st.ts_ms) for (t, _), m in st.members.items() if t == task.id]
        return web.json_response({**st.task_view(task), "members": members})

    async def _h_work(self, request: web.Request) -> web.Response:
        task = request.match_info["t"]
        if task not in self.state.tasks:
            raise NotFound(f"no task {task[:40]}")
        node = request.query.get("node")
        if node is not None:
            auth.check_key(node, "node")
        after = _int_arg(request, "after", -1)
        limit = min(_int_arg(request, "limit", 100), 1000)
        rows = await asyncio.to_thread(self.db.work_list, task, node=node, after=after, limit=limit)
        return web.json_response({"task": task, "work": rows})

    async def _h_shares(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.shares(request.match_info["t"]))

    async def _h_shares_export(self, request: web.Request) -> web.Response:
        """The frozen shares as a signed file with a Merkle root (``shares.py``)."""
        from cotrain.protocol import shares

        task = self.state.tasks.get(request.match_info["t"])
        if task is None:
            raise NotFound(f"no task {request.match_info['t'][:40]}")
        if task.shares is None:
            raise Conflict(f"{task.id} is {task.state}: shares freeze when it is finalized")
        doc = shares.export(
            self.identity,
            task=task.id,
            origin=self.state.origin,
            finalized_seq=task.finalized_seq,
            weights=task.shares,
        )
        return web.json_response(doc)

    async def _h_account(self, request: web.Request) -> web.Response:
        key = auth.check_key(request.match_info["k"])
        return web.json_response(self.state.account_view(key, max(now_ms(), self.state.ts_ms)))

    async def _h_identity(self, request: web.Request) -> web.Response:
        rec = self.state.identities.get(request.match_info["k"])
        if rec is None:
            raise NotFound("no such identity")
        return web.json_response(
            {
                "key": rec.key,
                "roles": rec.roles,
                "name": rec.name,
                "specs": rec.specs,
                "seq": rec.seq,
            }
        )

    async def _h_checkpoint(self, request: web.Request) -> web.Response:
        size = request.query.get("size")
        cp = await asyncio.to_thread(
            self.db.checkpoint, None if size is None else _int_arg(request, "size", 0)
        )
        if cp is None:
            raise NotFound("no checkpoint" + ("" if size is None else f" of size {size}"))
        text = cp["note"] + "".join(line + "\n" for line in cp["cosignatures"])
        return web.Response(text=text, content_type="text/plain")

    async def _h_checkpoints(self, request: web.Request) -> web.Response:
        """Signed checkpoints after a size, oldest first (at most 1000), cosignatures included."""
        rows = await asyncio.to_thread(
            self.db.checkpoints, after=_int_arg(request, "after", -1), limit=1000
        )
        notes = [
            {
                "size": cp["size"],
                "note": cp["note"] + "".join(line + "\n" for line in cp["cosignatures"]),
            }
            for cp in rows
        ]
        return web.json_response({"checkpoints": notes})

    async def _h_entries(self, request: web.Request) -> web.Response:
        start = _int_arg(request, "start", 0)
        if start < 0:  # the rows would start at entry 0, not where the reader counts from
            raise RequestError("start must be an entry number (>= 0)")
        end = min(
            _int_arg(request, "end", start + MAX_ENTRIES_PER_READ),
            start + MAX_ENTRIES_PER_READ,
            self._committed_size(),
        )
        rows = await asyncio.to_thread(self.db.entries, start, end) if end > start else []
        body = b"".join(row + b"\n" for row in rows)
        return web.Response(body=body, content_type="application/x-ndjson")

    async def _h_reports(self, request: web.Request) -> web.Response:
        """The task's progress reports (``task.report`` entries), oldest first: each with its
        entry's number, time and author, so that a curve's every point links to the ledger."""
        task = request.match_info["t"]
        if task not in self.state.tasks:
            raise NotFound(f"no task {task[:40]}")
        limit = min(max(_int_arg(request, "limit", 1000), 1), 1000)
        size = self._committed_size()
        rows = await asyncio.to_thread(self.db.of_kind, "task.report", task, limit=limit)
        out = []
        for raw in rows:
            e = json.loads(raw)
            if e["seq"] >= size:
                continue  # not yet in a checkpointed tree: reported once it is committed
            body = e["req"]["body"]
            out.append(
                {
                    "seq": e["seq"],
                    "ts": e["ts"],
                    "author": e["req"]["key"],
                    "step": body["step"],
                    "metrics": body["metrics"],
                    "note": body.get("note", ""),
                }
            )
        return web.json_response({"task": task, "reports": out})

    async def _h_market(self, request: web.Request) -> web.Response:
        """The market state this coordinator was pointed at (``market_state``): the offers
        last fetched and the nodes launched for each task, with what they have cost so far."""
        if not self.cfg.market_state:
            raise NotFound("this coordinator shows no market (start it with --market_state DIR)")
        return web.json_response(await asyncio.to_thread(_market_view, self.cfg.market_state))

    async def _h_inclusion(self, request: web.Request) -> web.Response:
        index, size = _int_arg(request, "index", 0), _int_arg(request, "size", 0)
        if size > self._committed_size():
            raise NotFound(f"the log has {self._committed_size()} committed entries")
        proof = await asyncio.to_thread(self.tree.inclusion, index, size)
        return web.json_response({"index": index, "size": size, "proof": [h.hex() for h in proof]})

    async def _h_consistency(self, request: web.Request) -> web.Response:
        old, new = _int_arg(request, "old", 0), _int_arg(request, "new", 0)
        if new > self._committed_size():
            raise NotFound(f"the log has {self._committed_size()} committed entries")
        proof = await asyncio.to_thread(self.tree.consistency, old, new)
        return web.json_response({"old": old, "new": new, "proof": [h.hex() for h in proof]})

    async def _h_dashboard(self, request: web.Request) -> web.Response:
        return _ui_file("index.html")

    async def _h_ui(self, request: web.Request) -> web.Response:
        return _ui_file(request.match_info["name"])

    def _committed_size(self) -> int:
        return self.state.size - len(self._pending.entries)


def _market_view(state_dir: str) -> dict[str, Any]:
    """Offers and launches from a market state directory; a file being rewritten or broken
    is left out rather than failing the page."""
    root = Path(state_dir).expanduser()
    now = time.time()
    offers: list[dict[str, Any]] = []
    with contextlib.suppress(OSError, ValueError):
        for provider, got in json.loads((root / "offers.json").read_text()).items():
            for o in got.get("offers", [])[:200]:
                offers.append({**o, "provider": provider, "age_s": now - got["fetched_at"]})
    offers.sort(key=lambda o: (o.get("usd_per_hour", 0), o.get("provider", "")))
    launches = []
    for path in sorted((root / "launches").glob("*.json"))[:100]:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            rec = json.loads(path.read_text())
            nodes = []
            for n in rec.get("nodes", []):
                hours = max(0.0, ((n.get("ended_at") or now) - n["started_at"]) / 3600)
                nodes.append({**n, "hours": hours, "spent_usd": n["usd_per_hour"] * hours})
            launches.append({
                "task": rec["task"], "budget_usd": rec.get("budget_usd"),
                "max_hours": rec.get("max_hours"), "stopped": rec.get("stopped"),
                "spent_usd": sum(n["spent_usd"] for n in nodes),
                "rate_usd_per_hour": sum(n["usd_per_hour"] for n in nodes if not n.get("ended_at")),
                "nodes": nodes, "failures": rec.get("failures", [])[-20:],
            })  # fmt: skip
    return {"offers": offers, "launches": launches, "at": now}


# The dashboard (``protocol/dashboard``): plain files, read-only, same origin as the API.
_UI = {
    "index.html": "text/html",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
_UI_HEADERS = {
    # its scripts and data come from here only; nothing it shows can run as code
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _ui_file(name: str) -> web.Response:
    kind = _UI.get(name)
    if kind is None:
        raise NotFound(f"no dashboard file {name[:40]}")
    body = (Path(__file__).parent / "dashboard" / name).read_bytes()
    return web.Response(body=body, content_type=kind, charset="utf-8", headers=_UI_HEADERS)


def _task_of(path: str) -> str | None:
    parts = path.split("/")
    return parts[3] if len(parts) > 3 and parts[2] == "tasks" else None


def _int_arg(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.lstrip("-").isdigit() or len(raw) > 16:
        raise RequestError(f"{name} must be an integer")
    return int(raw)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not record a member's status: %s", task.exception())


async def serve(
    cfg: CoordinatorConfig,
    *,
    ready: Callable[..., None] | None = None,
    stopped: Callable[[], Awaitable[None]] | None = None,
    box: dict[str, Any] | None = None,
) -> Coordinator:
    """Run a coordinator until ``stopped()`` returns (the CLI's ``Service``)."""
    from cotrain.comm.auth import load_identity

    identity = Identity.load_or_create(cfg.key) if cfg.key else load_identity(None)
    db = await asyncio.to_thread(Database, cfg.db)
    try:
        coord = await asyncio.to_thread(Coordinator, cfg, identity, db)
    except BaseException:  # a database of another key, a broken one: close its connections
        db.close()
        raise
    await coord.start()
    if box is not None:  # tests reach the live coordinator through this
        box["coordinator"] = coord
    runner = web.AppRunner(coord.app(), access_log=None)
    await runner.setup()
    front: _Front | None = None
    if cfg.ingest:
        front = await _Front.start(cfg, runner)
        coord.trust_verified = True
        coord.front = front
        port = front.port
    else:
        site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    if ready is not None:
        ready(
            host=cfg.host,
            port=port,
            key=coord.key,
            size=coord.state.size,
            url=f"http://{cfg.host}:{port}",
            ingest=cfg.ingest,
        )
    try:
        if stopped is not None:
            await stopped()
    finally:
        if front is not None:
            front.stop()
        await runner.cleanup()
        await coord.stop()
        db.close()
    return coord


class _Front:
    """The ingest processes on the public port, and the private socket they forward to."""

    def __init__(self, cfg: CoordinatorConfig, sock: socket.socket, rundir: str) -> None:
        self.cfg, self.sock, self.rundir = cfg, sock, rundir
        self.upstream = os.path.join(rundir, "sequencer.sock")
        self.port = int(sock.getsockname()[1])
        self.procs: list[Any] = []
        self._watch: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, cfg: CoordinatorConfig, runner: web.AppRunner) -> _Front:
        rundir = tempfile.mkdtemp(prefix="cotrain-coordinator-")  # 0700: ours alone
        sock = socket.create_server((cfg.host, cfg.port), backlog=1024)
        sock.set_inheritable(True)
        front = cls(cfg, sock, rundir)
        await web.UnixSite(runner, front.upstream).start()
        front.procs = [await front._spawn() for _ in range(cfg.ingest)]
        front._watch = asyncio.create_task(front._supervise())
        return front

    async def _spawn(self) -> Any:
        (proc,) = ingest.spawn(1, self.sock, self.upstream, self.cfg.max_body_kb * 1024)
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        if not line:
            raise Unavailable("an ingest process did not start (see its stderr)")
        return proc

    async def _supervise(self) -> None:
        """An ingest process that dies is replaced (the socket and the sequencer live on)."""
        while True:
            await asyncio.sleep(1.0)
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None:
                    log.warning(
                        "ingest process %d exited (%s); starting another", proc.pid, proc.returncode
                    )
                    self.procs[i] = await self._spawn()

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except Exception:
                proc.kill()
        self.sock.close()
        shutil.rmtree(self.rundir, ignore_errors=True)


__all__ = ["Coordinator", "serve"]
