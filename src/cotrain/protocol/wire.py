"""The bodies of the coordinator's writes, declared once (clients, coordinator and auditor).

Each write is ``METHOD PATH`` plus one of these bodies, signed (``auth``); ``route`` names the
ledger kind of a path. Amounts are integers (credits), times are unix milliseconds, keys are
64-hex ed25519 public keys.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cotrain.protocol.errors import NotFound, RequestError

Key = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Hex32 = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Amount = Annotated[int, Field(ge=0, le=2**53 - 1)]
Role = Literal["initiator", "node", "validator", "witness"]
Verdict = Literal["accept", "soft_reject", "hard_reject", "drop"]
MemberStatus = Literal["healthy", "unhealthy", "dead"]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9 _.:/@+-]{0,99}$"
MAX_META_BYTES = 2048


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _small(value: dict[str, Any], what: str) -> dict[str, Any]:
    from cotrain.core.signed import canonical

    if len(canonical(value)) > MAX_META_BYTES:
        raise ValueError(f"{what} is over {MAX_META_BYTES} bytes of JSON")
    return value


class Genesis(Body):
    """The first entry: the coordinator's key and the ledger's name (its checkpoint origin)."""

    origin: Annotated[str, Field(pattern=_NAME)]
    coordinator: Key
    window_ms: Annotated[int, Field(ge=1000, le=86_400_000)]
    """The clock window: an entry's time is within twice this of its request's signed time,
    so a coordinator cannot move entries in time (when credit matures, when a vote is late)."""


class RegisterIdentity(Body):
    roles: Annotated[list[Role], Field(min_length=1, max_length=4)]
    name: Annotated[str, Field(pattern=_NAME)]
    specs: dict[str, Any] = {}

    @field_validator("roles")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("roles repeat")
        return v

    @field_validator("specs")
    @classmethod
    def _specs(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _small(v, "specs")


class PublishTask(Body):
    name: Annotated[str, Field(pattern=_NAME)]
    kind: Literal["diloco", "rl", "other"]
    spec: dict[str, Any] = {}
    """What the work is: environment or dataset, initial model hash, reward function, rules."""
    budget: Amount
    rate_per_unit: Amount
    """Credits per accepted unit of work."""
    validator_fee: Amount = 0
    """Credits per verdict, to the validator (fixed: validators gain nothing from slashing)."""
    lock_s: Annotated[int, Field(ge=0, le=30 * 86400)] = 86400
    """Accepted credit stays locked (and can be taken back) this long."""
    admission: Literal["open", "invite"] = "invite"
    validators: Annotated[list[Key], Field(max_length=64)] = []
    quorum: Annotated[int, Field(ge=1, le=64)] | None = None
    """Hard-reject votes needed (default: two thirds of the validators, rounded up)."""
    weights: dict[str, Annotated[int, Field(ge=0, le=10**6)]] = {"units": 1}
    """Share weight of one unit of each kind of work; work of another kind is refused."""
    max_units: Annotated[int, Field(ge=1, le=2**40)] = 10**9
    """The most units one work record may claim."""

    @field_validator("spec")
    @classmethod
    def _spec(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _small(v, "spec")

    @field_validator("validators")
    @classmethod
    def _validators(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("validators repeat")
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, int]) -> dict[str, int]:
        if not 1 <= len(v) <= 16 or not all(re.match(r"^[a-z_]{1,32}$", k) for k in v):
            raise ValueError("weights name 1 to 16 kinds of work, each [a-z_]{1,32}")
        return v


class Empty(Body):
    pass


class CreateInvite(Body):
    node: Key | None = None
    """The one key that may use it (None: whoever holds the invite id)."""
    ttl_s: Annotated[int, Field(ge=1, le=86400)] = 1000


class Join(Body):
    invite: Hex32 | None = None


class SubmitWork(Body):
    work_key: Key
    """sha256 of the artifact (a pseudo-gradient, a batch of rollouts): unique in the ledger."""
    kind: Annotated[str, Field(pattern=r"^[a-z_]{1,32}$")]
    units: Annotated[int, Field(ge=1, le=2**53 - 1)]
    step: Annotated[int, Field(ge=0, le=2**53 - 1)] = 0
    meta: dict[str, Any] = {}

    @field_validator("meta")
    @classmethod
    def _meta(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _small(v, "meta")


class SubmitVerdict(Body):
    work_key: Key
    verdict: Verdict
    reason: Annotated[str, Field(max_length=300)] = ""
    evidence: Key | None = None
    """sha256 of whatever shows the verdict right (a replay log, a failed check's inputs)."""


MetricName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


class SubmitReport(Body):
    """A task's progress as its validators or initiator measure it (an RL trainer's reward
    and held-out accuracy at a step, the policy version it published): numbers for the
    dashboard's curves, in the ledger so that each point links to a signed entry."""

    step: Annotated[int, Field(ge=0, le=2**53 - 1)]
    metrics: Annotated[dict[MetricName, float], Field(min_length=1, max_length=16)]
    note: Annotated[str, Field(max_length=200)] = ""

    @field_validator("metrics")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        import math

        if not all(math.isfinite(x) for x in v.values()):
            raise ValueError("metrics must be finite numbers")
        return v


class Claim(Body):
    amount: Annotated[int, Field(ge=1, le=2**53 - 1)]


class SetMemberStatus(Body):
    status: MemberStatus


# (method, path pattern) -> (ledger kind, body model); {t} is a task id, {k} a key.
ROUTES: list[tuple[str, re.Pattern[str], str, type[Body]]] = [
    ("LEDGER", re.compile(r"^/v1/genesis$"), "ledger.genesis", Genesis),
    ("POST", re.compile(r"^/v1/identities$"), "identity.register", RegisterIdentity),
    ("POST", re.compile(r"^/v1/tasks$"), "task.publish", PublishTask),
    ("POST", re.compile(r"^/v1/tasks/(?P<t>t[0-9]{1,15})/open$"), "task.open", Empty),
    ("POST", re.compile(r"^/v1/tasks/(?P<t>t[0-9]{1,15})/pause$"), "task.pause", Empty),
    ("POST", re.compile(r"^/v1/tasks/(?P<t>t[0-9]{1,15})/finalize$"), "task.finalize", Empty),
    ("POST", re.compile(r"^/v1/tasks/(?P<t>t[0-9]{1,15})/cancel$"), "task.cancel", Empty),
    ("POST", re.compile(r"^/v1/tasks/(?P<t>t[0-9]{1,15})/invites$"), "invite.create", CreateInvite),
    ("POST", re.compile(r"^/v1/tasks/(?P<t>t[0-9]{1,15})/join$"), "member.join", Join),
    ("POST", re.compile(r"^/v1/tasks/(?P<t>t[0-9]{1,15})/leave$"), "member.leave", Empty),
    ("POST", re.compile(r"^/v1/tasks/(?P<t>t[0-9]{1,15})/work$"), "work.submit", SubmitWork),
    (
        "POST",
        re.compile(r"^/v1/tasks/(?P<t>t[0-9]{1,15})/verdicts$"),
        "work.verdict",
        SubmitVerdict,
    ),
    (
        "POST",
        re.compile(r"^/v1/tasks/(?P<t>t[0-9]{1,15})/reports$"),
        "task.report",
        SubmitReport,
    ),
    ("POST", re.compile(r"^/v1/claims$"), "account.claim", Claim),
    (
        "LEDGER",
        re.compile(r"^/v1/tasks/(?P<t>t[0-9]{1,15})/members/(?P<k>[0-9a-f]{64})$"),
        "member.status",
        SetMemberStatus,
    ),
]


class Route(BaseModel):
    model_config = ConfigDict(frozen=True)
    kind: str
    task: str | None
    key: str | None
    body: Any


def route(method: str, path: str, body: dict[str, Any]) -> Route:
    """The ledger kind, path parameters and checked body of a write; ``NotFound`` for a path
    that is no write, ``RequestError`` for a body that does not fit it."""
    for m, pattern, kind, model in ROUTES:
        match = pattern.match(path)
        if match is None or m != method:
            continue
        try:
            parsed = model.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "body"
            raise RequestError(f"{kind}: {where}: {err['msg']}") from None
        groups = match.groupdict()
        return Route(kind=kind, task=groups.get("t"), key=groups.get("k"), body=parsed)
    raise NotFound(f"no write {method} {path[:80]}")
