"""The coordinator's database: SQLite by default (a file), PostgreSQL by URL.

Tables (created and upgraded by the Alembic migrations in ``migrations/``)::

    entries       seq, ts, kind, author, task, leaf hash, canonical bytes: the ledger itself
    tiles         the hash of each complete 256-entry tile of the Merkle tree
    checkpoints   signed tree heads (C2SP notes) with the state root at that size
    cosignatures  witnesses' signature lines on checkpoints
    objects       the state's small objects (tasks, members, accounts, ...) as JSON
    work          work units (too many to keep in memory), as JSON plus indexed columns

Each batch of writes is one transaction: its entries, the objects and work units they changed
and any tile they completed. So what the database holds is always the state after some whole
number of entries, and a write is acknowledged only after its transaction commits: a kill -9
loses nothing that anyone was told was done.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from cotrain.protocol.errors import Unavailable
from cotrain.protocol.state import Unit

metadata = MetaData()

entries = Table(
    "entries",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("ts", BigInteger, nullable=False),
    Column("kind", String(40), nullable=False),
    Column("author", String(64), nullable=False),
    Column("task", String(20), nullable=True),
    Column("leaf", LargeBinary(32), nullable=False),
    Column("data", LargeBinary, nullable=False),
    Index("ix_entries_author", "author"),
    Index("ix_entries_task", "task"),
)
tiles = Table(
    "tiles",
    metadata,
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", LargeBinary(32), nullable=False),
)
checkpoints = Table(
    "checkpoints",
    metadata,
    Column("size", BigInteger, primary_key=True, autoincrement=False),
    Column("ts", BigInteger, nullable=False),
    Column("root", LargeBinary(32), nullable=False),
    Column("state_root", String(64), nullable=False),
    Column("note", Text, nullable=False),
)
cosignatures = Table(
    "cosignatures",
    metadata,
    Column("size", BigInteger, primary_key=True, autoincrement=False),
    Column("witness", String(64), primary_key=True),
    Column("line", Text, nullable=False),
)
objects = Table(
    "objects",
    metadata,
    Column("oid", String(200), primary_key=True),
    Column("data", Text, nullable=False),
)
work = Table(
    "work",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("task", String(20), nullable=False),
    Column("node", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("data", Text, nullable=False),
    Index("ix_work_task_node", "task", "node"),
    Index("ix_work_task_seq", "task", "seq"),
)


def engine_for(url: str) -> Engine:
    """An engine for ``url``: a path or ``sqlite:///...`` (WAL, full sync) or PostgreSQL."""
    if "://" not in url:
        path = Path(url).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        eng = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(eng, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        return eng
    return create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (``alembic upgrade head``)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@dataclass
class Batch:
    """What one transaction writes, as rows ready for the driver (serialized by the caller,
    in the thread that owns the objects: the commit runs in another)."""

    entries: list[tuple[int, int, str, str, str | None, bytes, bytes]] = field(default_factory=list)
    """(seq, ts, kind, author, task, leaf, data)."""
    objects: list[tuple[str, str]] = field(default_factory=list)
    """(oid, JSON text)."""
    units: list[tuple[str, str, str, str, int, str]] = field(default_factory=list)
    """(key, task, node, state, seq, JSON text)."""
    tiles: list[tuple[int, bytes]] = field(default_factory=list)
    checkpoint: dict[str, Any] | None = None
    """A signed checkpoint of the state after this batch (size, ts, root, state_root, note)."""

    @staticmethod
    def unit_row(u: Unit) -> tuple[str, str, str, str, int, str]:
        return (u.key, u.task, u.node, u.state, u.seq, json.dumps(u.to_json()))


@dataclass
class Stored:
    """What a coordinator reads back at start."""

    objects: list[tuple[str, dict[str, Any]]]
    tiles: bytes
    tail: list[bytes]
    size: int


def _upsert(conn: Connection, table: Table, rows: list[dict[str, Any]], keys: list[str]) -> None:
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt = pg_insert(table)
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(table)  # type: ignore[assignment]
    update = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
    conn.execute(stmt.on_conflict_do_update(index_elements=keys, set_=update), rows)


class Database:
    """The coordinator's storage. ``commit`` is called from one writer thread; the reads are
    safe from any thread (each takes its own connection)."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine = engine_for(url)
            migrate(self.engine)
        except SQLAlchemyError as e:
            raise Unavailable(f"cannot open the database {_redact(url)}: {_short(e)}") from None
        self.dialect = self.engine.dialect.name
        p = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"

        def values(n: int) -> str:
            return "(" + ", ".join([p] * n) + ")"

        self._sql = {
            "entries": "INSERT INTO entries (seq, ts, kind, author, task, leaf, data) VALUES "
            + values(7),
            "tiles": "INSERT INTO tiles (idx, hash) VALUES " + values(2),
            "objects": "INSERT INTO objects (oid, data) VALUES "
            + values(2)
            + " ON CONFLICT (oid) DO UPDATE SET data = excluded.data",
            "work": "INSERT INTO work (key, task, node, state, seq, data) VALUES "
            + values(6)
            + " ON CONFLICT (key) DO UPDATE SET state = excluded.state, data = excluded.data",
        }

    def close(self) -> None:
        self.engine.dispose()

    # ---- writes ------------------------------------------------------------------------------

    def commit(self, batch: Batch) -> None:
        """Write ``batch`` in one transaction; ``Unavailable`` (and nothing written) on failure.

        Rows go to the driver's ``executemany`` as tuples: this is the coordinator's hot path,
        and the SQL (``ON CONFLICT ... DO UPDATE``) is the same in SQLite and PostgreSQL."""
        try:
            with self.engine.begin() as conn:
                if batch.entries:
                    conn.exec_driver_sql(self._sql["entries"], batch.entries)
                if batch.tiles:
                    conn.exec_driver_sql(self._sql["tiles"], batch.tiles)
                if batch.objects:
                    conn.exec_driver_sql(self._sql["objects"], batch.objects)
                if batch.units:
                    conn.exec_driver_sql(self._sql["work"], batch.units)
                if batch.checkpoint is not None:
                    conn.execute(checkpoints.insert(), batch.checkpoint)
        except SQLAlchemyError as e:
            raise Unavailable(f"the database refused a write: {_short(e)}") from None

    def add_checkpoint(self, size: int, ts: int, root: bytes, state_root: str, note: str) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    checkpoints.insert(),
                    {"size": size, "ts": ts, "root": root, "state_root": state_root, "note": note},
                )
        except SQLAlchemyError as e:
            raise Unavailable(f"the database refused a checkpoint: {_short(e)}") from None

    def add_cosignature(self, size: int, witness: str, line: str) -> None:
        with self.engine.begin() as conn:
            _upsert(
                conn,
                cosignatures,
                [{"size": size, "witness": witness, "line": line}],
                ["size", "witness"],
            )

    # ---- reads -------------------------------------------------------------------------------

    def load(self, tile: int) -> Stored:
        with self.engine.connect() as conn:
            objs = [(r.oid, json.loads(r.data)) for r in conn.execute(select(objects))]
            size = conn.execute(select(entries.c.seq).order_by(entries.c.seq.desc()).limit(1))
            last = size.scalar()
            n = 0 if last is None else int(last) + 1
            tile_rows = conn.execute(select(tiles.c.idx, tiles.c.hash).order_by(tiles.c.idx))
            hashes = bytearray()
            for i, row in enumerate(tile_rows):
                if row.idx != i:
                    raise Unavailable(f"the database lacks Merkle tile {i}")
                hashes += row.hash
            complete = len(hashes) // 32
            if complete != n // tile:
                raise Unavailable(f"the database has {complete} Merkle tiles for {n} entries")
            tail = self.leaves(complete * tile, n, conn=conn)
        return Stored(objs, bytes(hashes), tail, n)

    def leaves(self, lo: int, hi: int, *, conn: Connection | None = None) -> list[bytes]:
        q = select(entries.c.leaf).where(entries.c.seq >= lo, entries.c.seq < hi)
        q = q.order_by(entries.c.seq)
        if conn is not None:
            return [bytes(r[0]) for r in conn.execute(q)]
        with self.engine.connect() as c:
            return [bytes(r[0]) for r in c.execute(q)]

    def entries(self, lo: int, hi: int) -> list[bytes]:
        q = select(entries.c.data).where(entries.c.seq >= lo, entries.c.seq < hi)
        with self.engine.connect() as c:
            return [bytes(r[0]) for r in c.execute(q.order_by(entries.c.seq))]

    def entry_seqs(
        self,
        *,
        author: str | None = None,
        task: str | None = None,
        kind: str | None = None,
        after: int = -1,
        limit: int = 100,
    ) -> list[int]:
        q = select(entries.c.seq).where(entries.c.seq > after)
        if kind is not None:
            q = q.where(entries.c.kind == kind)
        if author is not None:
            q = q.where(entries.c.author == author)
        if task is not None:
            q = q.where(entries.c.task == task)
        with self.engine.connect() as c:
            return [int(r[0]) for r in c.execute(q.order_by(entries.c.seq).limit(limit))]

    def of_kind(self, kind: str, task: str, *, limit: int = 1000) -> list[bytes]:
        """The newest ``limit`` entries of ``kind`` about ``task``, oldest first."""
        q = (
            select(entries.c.data)
            .where(entries.c.kind == kind, entries.c.task == task)
            .order_by(entries.c.seq.desc())
            .limit(limit)
        )
        with self.engine.connect() as c:
            return [bytes(r[0]) for r in c.execute(q)][::-1]

    def work_keys(self) -> Iterator[str]:
        with self.engine.connect() as c:
            result = c.execution_options(yield_per=10_000).execute(select(work.c.key))
            for (key,) in result:
                yield key

    def units(self, keys: Iterable[str]) -> dict[str, Unit]:
        keys = list(keys)
        out: dict[str, Unit] = {}
        with self.engine.connect() as c:
            for i in range(0, len(keys), 500):
                q = select(work.c.data).where(work.c.key.in_(keys[i : i + 500]))
                for (data,) in c.execute(q):
                    u = Unit.from_json(json.loads(data))
                    out[u.key] = u
        return out

    def work_list(
        self, task: str, *, node: str | None = None, after: int = -1, limit: int = 100
    ) -> list[dict[str, Any]]:
        q = select(work.c.data).where(work.c.task == task, work.c.seq > after)
        if node is not None:
            q = q.where(work.c.node == node)
        with self.engine.connect() as c:
            rows = c.execute(q.order_by(work.c.seq).limit(limit))
            return [json.loads(r[0]) for r in rows]

    def checkpoint(self, size: int | None = None) -> dict[str, Any] | None:
        q = select(checkpoints)
        q = (
            q.order_by(checkpoints.c.size.desc())
            if size is None
            else q.where(checkpoints.c.size == size)
        )
        with self.engine.connect() as c:
            row = c.execute(q.limit(1)).first()
            if row is None:
                return None
            cos = c.execute(
                select(cosignatures.c.line)
                .where(cosignatures.c.size == row.size)
                .order_by(cosignatures.c.witness)
            )
            lines = [r[0] for r in cos]
        return {
            "size": row.size,
            "ts": row.ts,
            "root": bytes(row.root),
            "state_root": row.state_root,
            "note": row.note,
            "cosignatures": lines,
        }

    def checkpoints(self, *, after: int = -1, limit: int = 1000) -> list[dict[str, Any]]:
        q = select(checkpoints).where(checkpoints.c.size > after)
        with self.engine.connect() as c:
            rows = c.execute(q.order_by(checkpoints.c.size).limit(limit)).all()
            if not rows:
                return []
            lo, hi = rows[0].size, rows[-1].size
            cos: dict[int, list[str]] = {}
            for r in c.execute(
                select(cosignatures)
                .where(cosignatures.c.size >= lo, cosignatures.c.size <= hi)
                .order_by(cosignatures.c.size, cosignatures.c.witness)
            ):
                cos.setdefault(r.size, []).append(r.line)
        return [
            {
                "size": r.size,
                "ts": r.ts,
                "root": bytes(r.root),
                "state_root": r.state_root,
                "note": r.note,
                "cosignatures": cos.get(r.size, []),
            }
            for r in rows
        ]


class SQLWork:
    """The coordinator's ``WorkStore``: units in the ``work`` table, the batch's in a dict.

    ``prefetch`` reads every unit a batch names in one query; ``take_dirty`` hands the batch's
    changed units to ``Database.commit``. After a failed commit, ``forget`` drops the cache."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._cache: dict[str, Unit | None] = {}
        self._dirty: dict[str, Unit] = {}

    def prefetch(self, keys: Sequence[str]) -> None:
        missing = [k for k in keys if k not in self._cache]
        if missing:
            found = self.db.units(missing)
            for k in missing:
                self._cache[k] = found.get(k)

    def get(self, key: str) -> Unit | None:
        if key not in self._cache:
            self._cache[key] = self.db.units([key]).get(key)
        return self._cache[key]

    def put(self, unit: Unit) -> None:
        self._cache[unit.key] = unit
        self._dirty[unit.key] = unit

    def take_dirty(self) -> list[Unit]:
        out = list(self._dirty.values())
        self._dirty.clear()
        return out

    def forget(self) -> None:
        self._cache.clear()
        self._dirty.clear()

    def trim(self, keep: int = 4096) -> None:
        """Bound the cache (called after each commit): the units of writes applied but not yet
        committed stay, the rest are read back from the database when a verdict names them
        (validators judge recent work, which is what stays cached between trims)."""
        if len(self._cache) > keep:
            self._cache.clear()
            self._cache.update(self._dirty)


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _short(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


__all__ = ["Batch", "Database", "OperationalError", "SQLWork", "Stored", "engine_for", "migrate"]
