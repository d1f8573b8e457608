"""``cotrain audit``: check a ledger from public data alone and replay every balance and share.

What is checked, in order, for a coordinator's URL or a saved ledger directory:

1. every entry: canonical bytes, its position (``seq``), the hash chain (``prev``), time that
   never goes back, its author's signature over the request, and that the request obeys the
   rules when replayed (roles, invites, quorums, budgets): the replay *is* the state;
2. the Merkle tree over the entries (RFC 9162) against every signed checkpoint: the
   coordinator's signature (its key is in the genesis entry, or pinned with ``--key``), the
   root at that size and the ``state`` root of the replayed state at that size; witnesses'
   co-signatures from keys registered as witnesses;
3. against what this auditor saw before (a cache per coordinator): a checkpoint of a size seen
   before with another root is equivocation; an earlier root that the log no longer has means
   history was rewritten; a log that shrank is named too;
4. what the coordinator publishes (``/v1/state``) against the replay, field by field.

Any failure raises ``AuditError`` naming the entry (``seq``) or the checkpoint at fault.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotrain.protocol import merkle, note
from cotrain.protocol.errors import AuditError, NotFound, ProtocolError
from cotrain.protocol.ledger import ZERO, Entry
from cotrain.protocol.state import State


@dataclass
class Ledger:
    """A ledger as fetched or saved: entry bytes, checkpoint notes by size, published state."""

    entries: list[bytes]
    checkpoints: dict[int, str]
    published: dict[str, Any] | None = None


@dataclass
class Report:
    size: int
    root: str
    state_root: str
    coordinator: str
    origin: str
    checkpoints: int
    cosignatures: int
    kinds: dict[str, int]
    seconds: float
    state: dict[str, Any] = field(repr=False)


VERIFY_CHUNK = 5000
"""Entries per signature-checking job when the audit uses other cores."""


def _bad_signatures(start: int, datas: list[bytes]) -> list[int]:
    """Entries of ``datas`` (numbered from ``start``) whose signature does not verify; entries
    that do not even decode are left to the replay, which names them in order."""
    bad = []
    for i, data in enumerate(datas):
        try:
            Entry.decode(data).req.verify()
        except ProtocolError:
            bad.append(start + i)
    return bad


def _verifies(e: Entry) -> bool:
    try:
        e.req.verify()
    except ProtocolError:
        return False
    return True


class _Signatures:
    """Signature checks for a long ledger, run on the other cores while the replay runs here
    (they are most of an audit's work); ``bad(i)`` waits for entry ``i``'s chunk."""

    def __init__(self, entries: Sequence[bytes], workers: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawned, not forked: the caller may have threads (a coordinator in the same process)
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self._jobs = [
            self._pool.submit(_bad_signatures, lo, list(entries[lo : lo + VERIFY_CHUNK]))
            for lo in range(0, len(entries), VERIFY_CHUNK)
        ]
        self._bad: set[int] = set()
        self._done = 0

    def bad(self, i: int) -> bool:
        while self._done <= i // VERIFY_CHUNK:
            self._bad.update(self._jobs[self._done].result())
            self._done += 1
        return i in self._bad

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def replay(
    entries: Sequence[bytes],
    *,
    record_at: set[int] = frozenset(),  # type: ignore[assignment]
    on_progress: Callable[[int], None] | None = None,
    workers: int = 0,
) -> tuple[State, dict[int, tuple[bytes, str, dict[str, Any]]], dict[str, int]]:
    """Check and replay entries; the final state, (tree root, state root, view) at each size in
    ``record_at``, and the number of entries of each kind.

    ``workers`` > 0 checks signatures in that many spawned processes while the replay runs here
    (``cotrain audit`` uses the other cores; a script that passes it needs the usual
    ``if __name__ == "__main__":`` guard, as with any spawned process)."""
    sigs = _Signatures(entries, workers) if workers > 0 and len(entries) >= VERIFY_CHUNK else None
    try:
        return _replay(entries, sigs, record_at, on_progress)
    finally:
        if sigs is not None:
            sigs.close()


def _replay(
    entries: Sequence[bytes],
    sigs: _Signatures | None,
    record_at: set[int],
    on_progress: Callable[[int], None] | None,
) -> tuple[State, dict[int, tuple[bytes, str, dict[str, Any]]], dict[str, int]]:
    state = State()
    frontier = merkle.Frontier()
    prev = ZERO
    at: dict[int, tuple[bytes, str, dict[str, Any]]] = {}
    kinds: dict[str, int] = {}
    # every request's signature -> its entry: the same signature is the same signed statement,
    # so a request sequenced twice (a replay the rules would allow, such as a claim) is named
    seen_sigs: dict[bytes, int] = {}
    if 0 in record_at:
        at[0] = (merkle.EMPTY_ROOT, state.root(), state.view())
    for i, data in enumerate(entries):
        try:
            e = Entry.decode(data)
        except ProtocolError as ex:
            raise AuditError(f"is malformed: {ex}", seq=i) from None
        if e.seq != i:
            raise AuditError(
                f"says it is entry {e.seq}: entries were removed, inserted or reordered", seq=i
            )
        if e.prev != prev:
            raise AuditError(
                "does not chain to the entry before it: that entry was altered, or entries "
                "were removed, inserted or reordered",
                seq=i,
            )
        if not (_verifies(e) if sigs is None else not sigs.bad(i)):
            raise AuditError(
                f"is not signed by its author {e.req.key[:16]}...: altered or forged", seq=i
            )
        first = seen_sigs.setdefault(bytes.fromhex(e.req.sig), i)
        if first != i:
            raise AuditError(
                f"repeats the signed request of entry {first}: a replay",
                seq=i,
            )
        try:
            applied = state.apply(i, e.ts_ms, e.req)
        except ProtocolError as ex:
            raise AuditError(f"breaks the rules ({e.kind}): {ex}", seq=i) from None
        if applied.kind != e.kind:
            raise AuditError(f"is labelled {e.kind} but is a {applied.kind}", seq=i)
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
        leaf = merkle.leaf_hash(data)
        frontier.append(leaf)
        prev = leaf.hex()
        if i + 1 in record_at:
            at[i + 1] = (frontier.root(), state.root(), state.view())
        if on_progress is not None and (i + 1) % 10_000 == 0:
            on_progress(i + 1)
    return state, at, kinds


def check_checkpoint(
    size: int,
    text: str,
    *,
    coordinator: str,
    origin: str,
    root: bytes,
    state_root: str,
    witnesses: dict[str, bytes],
) -> int:
    """Verify one signed checkpoint against the replay; the number of witness signatures."""
    try:
        parsed = note.verify_note(text, {origin: bytes.fromhex(coordinator)})
        cp = note.parse_checkpoint(parsed.text)
    except (note.NoteError, ValueError) as e:
        raise AuditError(f"checkpoint {size}: {e}") from None
    if cp.origin != origin or cp.size != size:
        raise AuditError(f"checkpoint {size}: it is {cp.origin!r} at size {cp.size}")
    if cp.root != root:
        raise AuditError(
            f"checkpoint {size}: its root {cp.root.hex()[:16]}... is not the root of the "
            f"entries ({root.hex()[:16]}...): the log was altered after it was signed"
        )
    states = [x.split(" ", 1)[1] for x in cp.extensions if x.startswith("state ")]
    if states != [state_root]:
        raise AuditError(
            f"checkpoint {size}: its state root {(states or ['none'])[0][:16]}... is not the "
            f"replayed state's {state_root[:16]}..."
        )
    cosigned = 0
    known = {name: key for name, key in witnesses.items() if name != origin}
    if known and any(s.name in known for s in parsed.signatures):
        try:
            cosigned = len(note.verify_note(text, known).verified)
        except note.NoteError as e:
            raise AuditError(f"checkpoint {size}: a witness signature is bad: {e}") from None
    return cosigned


def compare(published: dict[str, Any], replayed: dict[str, Any], where: str = "") -> list[str]:
    """The paths where two JSON values differ (at most 20)."""
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if len(out) >= 20:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if k not in a or k not in b:
                    side = "the coordinator" if k in a else "the ledger"
                    out.append(f"{path}{k}: only {side} has it")
                else:
                    walk(a[k], b[k], f"{path}{k}.")
        elif a != b:
            out.append(f"{path.rstrip('.')}: published {a!r}, the ledger says {b!r}")

    walk(published, replayed, where)
    return out


class SeenCheckpoints:
    """What this auditor saw of a coordinator before: size -> root, in a small JSON file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.roots: dict[int, str] = {}
        if path is not None and path.exists():
            try:
                self.roots = {int(k): v for k, v in json.loads(path.read_text()).items()}
            except (ValueError, AttributeError):
                raise AuditError(f"{path} is not an audit cache: remove it") from None

    def check(self, size: int, roots: dict[int, bytes]) -> None:
        for old, root_hex in sorted(self.roots.items()):
            if old > size:
                raise AuditError(
                    f"the log shrank: this auditor saw {old} entries before, it now has {size}"
                )
            got = roots.get(old)
            if got is not None and got.hex() != root_hex:
                raise AuditError(
                    f"history was rewritten: the log's root at size {old} is "
                    f"{got.hex()[:16]}..., but a checkpoint of that size seen before had "
                    f"{root_hex[:16]}... (equivocation)"
                )

    def save(self, roots: dict[int, bytes]) -> None:
        if self.path is None:
            return
        self.roots.update({s: r.hex() for s, r in roots.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({str(k): v for k, v in sorted(self.roots.items())}))
        os.replace(tmp, self.path)


def audit(
    ledger: Ledger,
    *,
    key: str | None = None,
    seen: SeenCheckpoints | None = None,
    on_progress: Callable[[int], None] | None = None,
    workers: int = 0,
) -> Report:
    """Audit a whole ledger; ``AuditError`` at the first thing wrong."""
    t0 = time.perf_counter()
    n = len(ledger.entries)
    pub_size = ledger.published.get("size") if ledger.published else None
    sizes = set(ledger.checkpoints) | {n}
    if seen is not None:
        sizes |= {s for s in seen.roots if s <= n}
    if isinstance(pub_size, int) and 0 <= pub_size <= n:
        sizes.add(pub_size)
    state, at, kinds = replay(
        ledger.entries, record_at=sizes, on_progress=on_progress, workers=workers
    )
    if n == 0:
        raise AuditError("the ledger is empty")
    for size in ledger.checkpoints:  # after the replay, which names an entry removed midway
        if size > n:
            raise AuditError(f"checkpoint {size} is beyond the {n} entries fetched")
    coordinator, origin = state.coordinator, state.origin
    if key is not None and key != coordinator:
        raise AuditError(
            f"entry 0 names coordinator {coordinator[:16]}..., not the key you trust {key[:16]}...",
            seq=0,
        )
    witnesses = {
        rec.name: bytes.fromhex(rec.key)
        for rec in state.identities.values()
        if "witness" in rec.roles
    }
    cosigned = 0
    for size, text in sorted(ledger.checkpoints.items()):
        root, state_root, _ = at[size]
        cosigned += check_checkpoint(
            size,
            text,
            coordinator=coordinator,
            origin=origin,
            root=root,
            state_root=state_root,
            witnesses=witnesses,
        )
    roots = {s: v[0] for s, v in at.items()}
    if seen is not None:
        seen.check(n, roots)
    if ledger.published is not None:
        pub = dict(ledger.published)
        pub_root = pub.pop("root", None)
        psize = pub.get("size")
        if not isinstance(psize, int) or psize not in at:
            raise AuditError(f"the published state is at size {psize!r}, which was not fetched")
        diffs = compare(pub, at[psize][2])
        if pub_root is not None and pub_root != at[psize][1]:  # the state root it publishes
            diffs.append(f"root: published {pub_root!r}, the ledger says {at[psize][1]!r}")
        if diffs:
            raise AuditError(
                f"the coordinator's published state (size {psize}) differs from the ledger's: "
                + "; ".join(diffs)
            )
    if seen is not None:
        seen.save({s: roots[s] for s in ledger.checkpoints})
    final_root, final_state, _ = at[n]
    return Report(
        size=n,
        root=final_root.hex(),
        state_root=final_state,
        coordinator=coordinator,
        origin=origin,
        checkpoints=len(ledger.checkpoints),
        cosignatures=cosigned,
        kinds=kinds,
        seconds=time.perf_counter() - t0,
        state=state.view(),
    )


# ---- where a ledger comes from --------------------------------------------------------------


async def fetch(url: str, *, timeout_s: float = 60.0) -> Ledger:
    """Everything public about a coordinator's ledger, consistent with its published state."""
    import asyncio

    from cotrain.protocol.client import Client

    async with Client(url, timeout_s=timeout_s) as c:
        published = await c.get("/v1/state")
        notes: dict[int, str] = {}
        after = -1
        while True:
            got = (await c.get("/v1/log/checkpoints", after=after))["checkpoints"]
            if not got:
                break
            for cp in got:
                notes[int(cp["size"])] = cp["note"]
            after = max(notes)
        size = max([published["size"], *notes])
        deadline = time.monotonic() + timeout_s
        while True:  # the published state may be a moment ahead of what is committed
            try:
                entries = await c.entries(0, size)
                break
            except NotFound:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    return Ledger(entries, notes, published)


def save(ledger: Ledger, path: Path) -> None:
    """A ledger directory: entries.jsonl (exact bytes), checkpoints.jsonl, state.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "entries.jsonl").write_bytes(b"".join(e + b"\n" for e in ledger.entries))
    (path / "checkpoints.jsonl").write_text(
        "".join(
            json.dumps({"size": s, "note": t}) + "\n" for s, t in sorted(ledger.checkpoints.items())
        )
    )
    if ledger.published is not None:
        (path / "state.json").write_text(json.dumps(ledger.published))


def load(path: Path) -> Ledger:
    if not (path / "entries.jsonl").is_file():
        raise AuditError(f"{path} is not a ledger directory (no entries.jsonl)")
    entries = [line for line in (path / "entries.jsonl").read_bytes().split(b"\n") if line]
    notes: dict[int, str] = {}
    cps = path / "checkpoints.jsonl"
    if cps.is_file():
        for line in cps.read_text().splitlines():
            if line.strip():
                obj = json.loads(line)
                notes[int(obj["size"])] = obj["note"]
    st = path / "state.json"
    published = json.loads(st.read_text()) if st.is_file() else None
    return Ledger(entries, notes, published)
