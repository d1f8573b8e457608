"""What ties a DiLoCo run to a protocol task: the task's spec, its work artifacts, ejections.

A ``diloco`` task's ``spec`` says where its comm master is and what to train::

    {"master": "host:port", "master_key": "<64 hex>",
     "store": "/shared/dir",          # where nodes put their pseudo-gradients
     "train": {...}}                  # a TrainConfig (model, data, inner, algo, total_steps)

Each pseudo-gradient a node puts into an outer step is written to the store as safetensors
(``<store>/<task>/<work_key>.safetensors``, the key being the SHA-256 of the file) and
submitted as work of kind ``tokens`` (units: the tokens it trained on, its weight in the
average; step: the outer step). Validators read them back by key (``validator.py``). The run's
master follows the task's members and bans every node the coordinator ejects
(``ban_ejected``), so a hard reject takes effect in the ring too.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cotrain.core.errors import UsageError

log = logging.getLogger("cotrain.protocol")

WORK_KIND = "tokens"


def _invalid(task: Any, where: str, e: ValidationError) -> UsageError:
    """A task's spec that does not fit: one line naming the field."""
    err = e.errors()[0]
    field = ".".join(str(p) for p in err["loc"])
    return UsageError(f"task {task}: {where}{'.' + field if field else ''}: {err['msg']}")


class DiLoCoSpec(BaseModel):
    """The ``spec`` of a ``diloco`` task."""

    model_config = ConfigDict(extra="forbid")
    master: str = Field(pattern=r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")
    """The run's comm master, host:port."""
    master_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Its key (``cotrain master --key_file``), pinned by the nodes: they hold admission
    tokens, not a run secret, so this is how they know they reach the real master."""
    store: str = Field(min_length=1)
    """The directory (shared by nodes and validators) where pseudo-gradients are put."""
    train: dict[str, Any] = {}
    """The run's TrainConfig: model, data, inner, algo, total_steps, world."""

    @classmethod
    def of(cls, task: dict[str, Any]) -> DiLoCoSpec:
        """The spec of a task as the coordinator shows it; ``UsageError`` when it has none."""
        if task.get("kind") != "diloco":
            raise UsageError(f"task {task.get('id')} is a {task.get('kind')} task, not diloco")
        try:
            return cls.model_validate(task.get("spec") or {})
        except ValidationError as e:
            raise _invalid(task.get("id"), "spec", e) from None

    def train_config(self, task: str, **fields: Any) -> Any:
        """The TrainConfig a node of task ``task`` runs: the spec's, this run's master and
        ``fields`` (its key, token, worker index, out_dir)."""
        from cotrain.diloco.config import TrainConfig

        host, port = self.master.rsplit(":", 1)
        comm = dict(self.train.get("comm", {}))
        comm.update(
            master_host=host.strip("[]"),
            master_port=int(port),
            master_key=self.master_key,
            **fields.pop("comm", {}),
        )
        body = {**self.train, **fields, "comm": comm}
        try:
            return TrainConfig.model_validate(body)
        except ValidationError as e:
            raise _invalid(task, "spec.train", e) from None


class RLSpec(BaseModel):
    """The ``spec`` of an ``rl`` task: its orchestrator and the run's shared settings."""

    model_config = ConfigDict(extra="forbid")
    orchestrator: str = Field(pattern=r"^https?://[^\s/]+$")
    """The run's orchestrator, http://host:port."""
    rl: dict[str, Any] = {}
    """The RLConfig sections every worker shares: run (its id), model, env, sampling, proof."""

    @classmethod
    def of(cls, task: dict[str, Any]) -> RLSpec:
        try:
            return cls.model_validate(task.get("spec") or {})
        except ValidationError as e:
            raise _invalid(task.get("id"), "spec", e) from None

    def worker_config(self, task: str, *, key: Path, coordinator: str, out_dir: Path) -> Any:
        """The RLConfig of a node's inference worker in task ``task``."""
        from cotrain.rl.config import RLConfig

        shared = {
            k: v for k, v in self.rl.items() if k in ("run", "model", "env", "sampling", "proof")
        }
        if len(shared) != len(self.rl):
            extra = sorted(set(self.rl) - set(shared))
            raise UsageError(
                f"task {task}: spec.rl may set run, model, env, sampling, proof; not {extra}"
            )
        body = {
            **shared,
            "run": {**shared.get("run", {}), "out_dir": str(out_dir)},
            "orchestrator": {"url": self.orchestrator},
            "worker": {
                "key": str(key.resolve()),
                "coordinator": coordinator,
                "coordinator_task": task,
            },
        }
        try:
            return RLConfig.model_validate(body)
        except ValidationError as e:
            raise _invalid(task, "spec.rl", e) from None


# ---- artifacts --------------------------------------------------------------------------------


def artifact_path(store: str | Path, task: str, work_key: str) -> Path:
    return Path(store) / task / f"{work_key}.safetensors"


def put_pseudo_gradient(
    store: str | Path, task: str, delta: torch.Tensor, meta: dict[str, str]
) -> str:
    """Write a pseudo-gradient (flat fp32) to the store; returns its work key (SHA-256)."""
    blob = st_save({"delta": delta.detach().to(torch.float32).contiguous().clone()}, meta)
    key = hashlib.sha256(blob).hexdigest()
    path = artifact_path(store, task, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)
    return key


class ArtifactError(Exception):
    """A work record's artifact is missing, or is not what the record's key names."""


def get_pseudo_gradient(
    store: str | Path, task: str, work_key: str, *, numel: int | None = None
) -> torch.Tensor:
    """The pseudo-gradient of a work record, checked against its key (and, with ``numel``,
    its size before it is read: a huge file from a hostile node is refused unread)."""
    path = artifact_path(store, task, work_key)
    try:
        size = path.stat().st_size
        if numel is not None and size > 4 * numel + (64 << 10):
            raise ArtifactError(
                f"the artifact of {work_key[:16]}... is {size} bytes, over a pseudo-gradient of "
                f"{numel} values"
            )
        blob = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"no artifact {work_key[:16]}... in the store") from None
    if hashlib.sha256(blob).hexdigest() != work_key:
        raise ArtifactError(f"the artifact of {work_key[:16]}... does not hash to its key")
    try:
        delta = st_load(blob)["delta"]
    except Exception as e:  # safetensors raises its own errors for a malformed file
        raise ArtifactError(f"the artifact of {work_key[:16]}... is not safetensors: {e}") from None
    if delta.dtype != torch.float32 or delta.dim() != 1:
        raise ArtifactError(f"the artifact of {work_key[:16]}... is not a flat fp32 tensor")
    return delta


# ---- the run follows the coordinator ------------------------------------------------------------


class Bans(Protocol):
    def ban(self, peer_id: str, reason: str) -> None: ...


async def ban_ejected(master: Bans, url: str, task: str, every_s: float) -> None:
    """Until cancelled: read ``task``'s members from the coordinator at ``url`` and ban each
    ejected one from the run (a coordinator that cannot be read is tried again)."""
    import aiohttp

    from cotrain.protocol.client import Client
    from cotrain.protocol.errors import ProtocolError

    async with Client(url, timeout_s=max(5.0, every_s * 4)) as client:
        warned = False
        while True:
            try:
                view = await client.get(f"/v1/tasks/{task}")
                warned = False
                for m in view.get("members", []):
                    if m.get("status") == "ejected":
                        master.ban(m["node"], f"ejected from {task} by its validators")
            except (ProtocolError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                if not warned:
                    log.warning("cannot read task %s from %s: %s", task, url, e)
                    warned = True
            await asyncio.sleep(every_s)
