"""``cotrain witness``: co-sign a coordinator's checkpoints, each one only once it is shown to
extend the last one this witness signed.

A coordinator could show one history to some readers and another to the rest (a split view),
or rewrite its past. Witnesses make that visible: each keeps the newest checkpoint it
co-signed (origin, size, root hash) in its state file; every ``poll_s`` it fetches the
coordinator's newest signed checkpoint, verifies the coordinator's signature (its key is
pinned: ``--coordinator_key``), and when the log has grown asks for the RFC 9162 consistency
proof from the size it signed to the new one and checks it. Only then does it add its own
signature line (C2SP signed-note) and post it (``POST /v1/log/cosign``). A checkpoint that
does not verify, a log that shrank, two roots for one size or a failed proof stop the witness
with exit code 1 and the evidence in its last line, and it signs nothing after that: readers
who require a witness's co-signature (``cotrain audit`` counts them) refuse the forked view.
A restarted witness continues from its state file, so a fork across its restart is caught too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import Field

from cotrain.core.config import ConfigModel
from cotrain.core.errors import CotrainError, UsageError
from cotrain.core.files import write_atomic
from cotrain.core.identity import Identity
from cotrain.protocol import merkle, note
from cotrain.protocol.client import Client
from cotrain.protocol.errors import NotFound, ProtocolError

log = logging.getLogger("cotrain.protocol")


class WitnessConfig(ConfigModel):
    """``cotrain witness --coordinator URL --coordinator_key HEX --key witness.pem``."""

    coordinator: str = "http://127.0.0.1:8740"
    """The coordinator's URL."""
    coordinator_key: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    """The coordinator's public key (hex), pinned: its ready line and /v1/status show it."""
    key: str = "witness.pem"
    """This witness's ed25519 key (created if missing), registered with the witness role."""
    name: str = ""
    """Its name in signature lines (no spaces or '+'; default: witness-<first 8 hex of key>)."""
    state: str = "witness-state.json"
    """The newest checkpoint it co-signed; a restarted witness goes on from it."""
    poll_s: float = Field(2.0, gt=0)
    """How often to look for a new checkpoint."""
    timeout_s: float = Field(30.0, gt=0)
    """Deadline of each call to the coordinator."""
    once: bool = False
    """Co-sign the newest checkpoint (if it is consistent) and exit."""


class ForkDetected(CotrainError):
    """The coordinator showed a checkpoint that does not extend the one this witness signed."""


@dataclass
class Seen:
    origin: str
    size: int
    root: bytes

    def to_json(self, coordinator: str) -> dict[str, Any]:
        return {
            "coordinator": coordinator,
            "origin": self.origin,
            "size": self.size,
            "root": self.root.hex(),
        }


class Witness:
    def __init__(self, cfg: WitnessConfig, identity: Identity) -> None:
        if not cfg.coordinator_key:
            raise UsageError("--coordinator_key is required: the coordinator's key, pinned")
        self.cfg = cfg
        self.identity = identity
        self.name = cfg.name or f"witness-{identity.public_hex[:8]}"
        if not note.valid_name(self.name):
            raise UsageError(f"--name {self.name!r}: no spaces or '+' in a witness's name")
        self.coordinator = cfg.coordinator_key
        self.state_path = Path(cfg.state)
        self.seen = self._load()
        self.cosigned = 0

    def _load(self) -> Seen | None:
        try:
            obj = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise UsageError(f"{self.state_path}: unreadable witness state: {e}") from None
        if obj.get("coordinator") != self.coordinator:
            raise UsageError(
                f"{self.state_path} is the state of a witness of another coordinator "
                f"({str(obj.get('coordinator'))[:16]}...): give another --state"
            )
        return Seen(obj["origin"], int(obj["size"]), bytes.fromhex(obj["root"]))

    def _save(self, seen: Seen) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_path, json.dumps(seen.to_json(self.coordinator)).encode())
        self.seen = seen

    async def register(self, c: Client) -> None:
        try:
            rec = await c.get(f"/v1/identities/{self.identity.public_hex}")
            if "witness" in rec["roles"] and rec["name"] == self.name:
                return
            roles = sorted({*rec["roles"], "witness"})
        except NotFound:
            roles = ["witness"]
        await c.register(roles, self.name)

    async def step(self, c: Client) -> int | None:
        """Check and co-sign the newest checkpoint if it is new; its size (None: nothing new)."""
        try:
            text = (await c.get_bytes("/v1/log/checkpoint")).decode()
        except NotFound:
            return None  # no checkpoint yet
        try:
            parsed = note.verify_note(text, {self._origin(text): bytes.fromhex(self.coordinator)})
            cp = note.parse_checkpoint(parsed.text)
        except (note.NoteError, ValueError) as e:
            raise ForkDetected(f"the coordinator's checkpoint does not verify: {e}") from None
        old = self.seen
        if old is not None:
            if cp.origin != old.origin:
                raise ForkDetected(f"the log's origin changed: {old.origin!r} -> {cp.origin!r}")
            if cp.size < old.size:
                raise ForkDetected(f"the log shrank: size {cp.size} after {old.size} was co-signed")
            if cp.size == old.size:
                if cp.root != old.root:
                    raise ForkDetected(
                        f"two roots for size {cp.size}: {old.root.hex()[:16]}... (co-signed) "
                        f"and {cp.root.hex()[:16]}..."
                    )
                return None
            got = await c.get("/v1/log/proof/consistency", old=old.size, new=cp.size)
            try:
                proof = [bytes.fromhex(h) for h in got["proof"]]
                merkle.verify_consistency(old.size, cp.size, old.root, cp.root, proof)
            except (merkle.ProofError, ValueError, KeyError, TypeError) as e:
                raise ForkDetected(
                    f"size {cp.size} does not extend the co-signed size {old.size}: {e}"
                ) from None
        cosigned = note.add_signature(text, self.name, self.identity)
        await c.write("/v1/log/cosign", {"note": cosigned})
        self._save(Seen(cp.origin, cp.size, cp.root))
        self.cosigned += 1
        return cp.size

    @staticmethod
    def _origin(text: str) -> str:
        """The log's origin: the checkpoint's first line, which is also its key name."""
        return text.split("\n", 1)[0]

    async def run(self) -> dict[str, Any]:
        async with Client(self.cfg.coordinator, self.identity, timeout_s=self.cfg.timeout_s) as c:
            try:
                await self.register(c)
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                raise UsageError(
                    f"cannot reach the coordinator at {self.cfg.coordinator}: {e}"
                ) from None
            while True:
                try:
                    size = await self.step(c)
                    if size is not None:
                        print(f"co-signed checkpoint {size}", flush=True)
                except (ProtocolError, aiohttp.ClientError, OSError, TimeoutError) as e:
                    # the coordinator down or busy: not evidence of anything; ask again
                    log.warning("witness: %s (trying again in %g s)", e, self.cfg.poll_s)
                if self.cfg.once:
                    break
                await asyncio.sleep(self.cfg.poll_s)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {
            "cosigned": self.cosigned,
            "size": self.seen.size if self.seen else 0,
            "at": round(time.time(), 3),
        }


def run(cfg: WitnessConfig) -> dict[str, Any]:
    try:
        identity = Identity.load_or_create(cfg.key)
    except ValueError as e:
        raise UsageError(f"{cfg.key}: not an ed25519 key: {e}") from None
    return asyncio.run(Witness(cfg, identity).run())
