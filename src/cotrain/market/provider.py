"""The one interface every compute provider implements, and what it returns.

    class Provider(Protocol):
        name: str
        caps: frozenset[Cap]
        async def offers(self, q: OfferQuery) -> list[Offer]
        async def launch(self, offer: Offer, spec: LaunchSpec) -> Instance
        async def status(self, instance_id: str) -> Instance
        async def terminate(self, instance_id: str) -> None
        async def instances(self) -> list[Instance]

Async: the cloud adapters are HTTP clients on cotrain's one HTTP stack (aiohttp), and asking
every provider for offers at once is what keeps ``cotrain market offers`` fast. A launched
machine runs ``cotrain node`` with ``LaunchSpec``'s coordinator, task and invite, and joins
the task by itself.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from cotrain.core.errors import CotrainError
from cotrain.market.offers import Offer, OfferQuery

State = Literal["starting", "running", "exited", "terminated", "failed", "unknown"]


class Cap(StrEnum):
    """What a provider can do beyond offers, launch, status and terminate."""

    SPOT = "spot"
    MULTI_NODE = "multi_node"
    DOCKER_IMAGE = "docker_image"
    OPEN_PORTS = "open_ports"
    STOP = "stop"
    BID = "bid"
    PREPAID = "prepaid"


class ProviderError(CotrainError):
    """A provider refused or failed (its message kept, its credentials never)."""


class OutOfStock(ProviderError):
    """The offer is gone: try the next one."""


class LaunchSpec(BaseModel):
    """What a launched machine runs: ``cotrain node`` joining ``task`` at ``coordinator``."""

    model_config = ConfigDict(extra="forbid")
    coordinator: str
    task: str
    invite: str = ""
    name: str = ""
    """The node's name on the coordinator (default: provider and instance id)."""
    max_hours: float | None = Field(default=None, gt=0)
    """Stop (terminate) the machine after this long."""


class Instance(BaseModel):
    """A machine a provider runs for us."""

    model_config = ConfigDict(extra="forbid")
    provider: str
    instance_id: str
    offer_id: str
    state: State
    usd_per_hour: float = 0.0
    started_at: float = 0.0
    """Unix time of the launch."""
    host: str | None = None
    """Where it can be reached (an address; ``localhost`` for local processes)."""
    detail: str = ""
    """The provider's words on its state (why it failed, ...)."""
    task: str | None = None
    measured: dict[str, Any] = Field(default_factory=dict)
    """What cotrain measured on the machine (SSH: GFLOP/s, round trips, link Mbit/s)."""


class Provider(Protocol):
    name: str
    caps: frozenset[Cap]

    async def offers(self, q: OfferQuery) -> list[Offer]: ...

    async def launch(self, offer: Offer, spec: LaunchSpec) -> Instance: ...

    async def status(self, instance_id: str) -> Instance: ...

    async def terminate(self, instance_id: str) -> None: ...

    async def instances(self) -> list[Instance]: ...


def onstart_script(spec: LaunchSpec, version: str = "") -> str:
    """What a rented machine runs first (a shell line): install cotrain in a venv, then start
    ``cotrain node`` in the background, joining ``spec.task`` at ``spec.coordinator``. Every
    cloud adapter passes this as the machine's start-up command."""
    import shlex

    pin = f"=={version}" if version else ""
    args = ["--coordinator", spec.coordinator, "--task", spec.task]
    args += ["--invite", spec.invite] if spec.invite else []
    args += ["--name", spec.name] if spec.name else []
    return (
        "set -e; python3 -m venv /opt/cotrain && "
        f"/opt/cotrain/bin/pip install -q 'cotrain{pin}' && "
        f"nohup /opt/cotrain/bin/cotrain node {shlex.join(args)} "
        "--key /root/node.pem --work_dir /root/cotrain > /root/node.log 2>&1 &"
    )
