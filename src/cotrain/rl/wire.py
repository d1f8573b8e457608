"""The messages of an RL run, declared once: what the orchestrator assigns, what a worker
submits, what a validator rules, and what the trainer receives.

Every statement a key vouches for is a signed envelope (``core.signed``) of its own domain::

    assignment  cotrain.rl.assignment/1   orchestrator -> worker: one task, G sampling seeds
    rollout     cotrain.rl.rollout/1      worker -> orchestrator: one sample of an assignment,
                                          carrying the signed assignment it answers
    verdict     cotrain.rl.verdict/1      validator -> orchestrator: accept or reject, and why
    request     cotrain.rl.request/1      any role -> orchestrator: "give me work" (nonce, time)
    version     cotrain.rl.version/1      trainer -> orchestrator: policy v is published

Bodies from other processes are untrusted: ``parse_*`` checks types, sizes and ranges before
anything else reads them (a hostile payload gets a ``WireError``, never a crash). Seeds and the
task belong to the assignment, which only the orchestrator can sign, so a worker chooses neither.

Policy versions: v1 is the base model; trainer step n trains the policy of version n on
rollouts of versions n - k .. n (k: the async level) and publishes version n + 1. Versions are
the shardcast versions of the trainer's origin.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

from cotrain.core.errors import CotrainError
from cotrain.core.signed import Envelope, EnvelopeError

ASSIGNMENT = "cotrain.rl.assignment/1"
ROLLOUT = "cotrain.rl.rollout/1"
VERDICT = "cotrain.rl.verdict/1"
REQUEST = "cotrain.rl.request/1"
VERSION = "cotrain.rl.version/1"

MAX_TOKENS = 8192
"""Prompt or completion ids per rollout (bounds every list a stranger can send)."""
MAX_GROUP = 64
MAX_PROOF_BYTES = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^[A-Za-z0-9_.:/@-]{1,120}$")
FINISH_REASONS = ("eos", "length")

CHECKS = (
    "schema",
    "signature",
    "duplicate",
    "assignment",
    "staleness",
    "toploc",
    "logprobs",
    "termination",
    "sampling",
    "reward",
)
"""The validation checks, cheapest first (research/rl.md 2.5); a verdict names the first that
failed."""


class WireError(CotrainError, ValueError):
    """A message that is malformed, out of bounds or forged."""


# ---- field checks ----------------------------------------------------------------------------


def _get(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in body:
        raise WireError(f"{what}: missing {key!r}")
    value = body[key]
    # bool is an int to Python; never accept it where a number is meant
    if isinstance(value, bool) and kind is not bool:
        raise WireError(f"{what}: {key!r} must be {_kind_name(kind)}")
    if not isinstance(value, kind):
        raise WireError(f"{what}: {key!r} must be {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _int(body: dict[str, Any], key: str, what: str, lo: int = 0, hi: int = 2**62) -> int:
    v = _get(body, key, int, what)
    if not lo <= v <= hi:
        raise WireError(f"{what}: {key!r}={v} is out of [{lo}, {hi}]")
    return int(v)


def _float(body: dict[str, Any], key: str, what: str, lo: float, hi: float) -> float:
    v = _get(body, key, (int, float), what)
    if not (math.isfinite(v) and lo <= v <= hi):
        raise WireError(f"{what}: {key!r}={v} is out of [{lo}, {hi}]")
    return float(v)


def _str(body: dict[str, Any], key: str, what: str, pattern: re.Pattern[str] = _ID) -> str:
    v = _get(body, key, str, what)
    if not pattern.match(v):
        raise WireError(f"{what}: {key!r} is not a valid value ({v[:40]!r})")
    return str(v)


def _ids(body: dict[str, Any], key: str, what: str, *, limit: int = MAX_TOKENS) -> list[int]:
    v = _get(body, key, list, what)
    if len(v) > limit:
        raise WireError(f"{what}: {key!r} has {len(v)} items, more than {limit}")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 2**31:
            raise WireError(f"{what}: {key!r} must hold token ids (ints in [0, 2^31))")
    return [int(x) for x in v]


def _exact_keys(body: dict[str, Any], keys: set[str], what: str) -> None:
    extra = set(body) - keys
    missing = keys - set(body)
    if missing:
        raise WireError(f"{what}: missing {sorted(missing)}")
    if extra:
        raise WireError(f"{what}: unknown fields {sorted(extra)[:5]}")


def new_nonce() -> str:
    return secrets.token_hex(16)


# ---- assignment ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assignment:
    """One group to generate: G samples of one task, each with its own sampling seed.

    ``id`` names this issue of the slot (``s{step}.j{slot}.a{attempt}.i{issue}``): a slot
    re-issued after a timeout or a rejection gets a new id but the same task and seeds, so
    whoever answers it produces the same honest completions."""

    run: str
    id: str
    worker: str
    """The public key this assignment is issued to; only its rollouts count."""
    step: int
    """The trainer step whose batch this group is for."""
    slot: int
    attempt: int
    env: str
    """``name@version`` of the environment."""
    task_seed: int
    level: int
    prompt_ids: list[int]
    seeds: list[int]
    """One sampling seed per sample of the group (``len(seeds)`` is G)."""
    min_version: int
    """The oldest policy version the rollouts may use (``step - k``)."""
    temperature: float
    max_new_tokens: int
    issued_unix: float
    deadline_unix: float
    task_from: str = ""
    """A revisit: the slot key (``s{step}.j{slot}.a{attempt}``) of the earlier group whose
    task this samples again; empty for a task of this slot's own schedule."""

    @property
    def slot_key(self) -> str:
        return f"s{self.step}.j{self.slot}.a{self.attempt}"

    def to_body(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "id": self.id,
            "worker": self.worker,
            "step": self.step,
            "slot": self.slot,
            "attempt": self.attempt,
            "env": self.env,
            "task_seed": self.task_seed,
            "level": self.level,
            "prompt_ids": list(self.prompt_ids),
            "seeds": list(self.seeds),
            "min_version": self.min_version,
            "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens,
            "issued_unix": self.issued_unix,
            "deadline_unix": self.deadline_unix,
            "task_from": self.task_from,
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Assignment:
        what = "assignment"
        keys = set(cls.__dataclass_fields__)
        if "task_from" not in body:  # an assignment journaled before revisits existed
            keys.discard("task_from")
        _exact_keys(body, keys, what)
        seeds = _get(body, "seeds", list, what)
        if not 1 <= len(seeds) <= MAX_GROUP or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**53 for s in seeds
        ):
            raise WireError(f"{what}: 'seeds' must be 1..{MAX_GROUP} ints in [0, 2^53)")
        return cls(
            run=_str(body, "run", what),
            id=_str(body, "id", what),
            worker=_str(body, "worker", what, _HEX64),
            step=_int(body, "step", what, 1),
            slot=_int(body, "slot", what, 0, 1 << 20),
            attempt=_int(body, "attempt", what, 0, 1 << 10),
            env=_str(body, "env", what),
            task_seed=_int(body, "task_seed", what, 0, 2**53),
            level=_int(body, "level", what, 0, 1 << 10),
            prompt_ids=_ids(body, "prompt_ids", what),
            seeds=[int(s) for s in seeds],
            min_version=_int(body, "min_version", what, 1),
            temperature=_float(body, "temperature", what, 0.0, 100.0),
            max_new_tokens=_int(body, "max_new_tokens", what, 1, MAX_TOKENS),
            issued_unix=_float(body, "issued_unix", what, 0.0, 1e11),
            deadline_unix=_float(body, "deadline_unix", what, 0.0, 1e11),
            task_from=_task_from(body, what),
        )


SLOT_KEY = re.compile(r"^s([0-9]{1,9})\.j([0-9]{1,7})\.a([0-9]{1,4})$")
"""``s{step}.j{slot}.a{attempt}``: a slot's attempt."""


def _task_from(body: dict[str, Any], what: str) -> str:
    if "task_from" not in body:
        return ""
    v = _get(body, "task_from", str, what)
    if v and not SLOT_KEY.match(v):
        raise WireError(f"{what}: 'task_from' must be empty or s<step>.j<slot>.a<attempt>")
    return v


# ---- rollout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """One sample of an assignment, as its worker signs it.

    ``logprobs[t]`` is the worker's log-probability of ``completion_ids[t]`` under
    ``softmax(logits / temperature)`` (the behaviour policy mu that the trainer's ratio uses);
    ``proof`` is the TOPLOC proof of the prompt and completion's hidden states."""

    assignment: dict[str, Any]
    """The orchestrator's signed assignment envelope, as JSON (``Envelope.to_json``)."""
    sample: int
    version: int
    """The policy version that generated it."""
    manifest_sha256: str
    """The ``file_sha256`` of that version's shardcast manifest."""
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    proof: str
    """Base64 of the TOPLOC proof bytes."""
    proof_chunk: int
    proof_topk: int
    claimed_reward: float | None
    t_start_unix: float
    t_end_unix: float
    nonce: str

    def to_body(self) -> dict[str, Any]:
        return {
            "assignment": self.assignment,
            "sample": self.sample,
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
            "prompt_ids": list(self.prompt_ids),
            "completion_ids": list(self.completion_ids),
            "logprobs": [float(x) for x in self.logprobs],
            "finish_reason": self.finish_reason,
            "proof": self.proof,
            "proof_chunk": self.proof_chunk,
            "proof_topk": self.proof_topk,
            "claimed_reward": self.claimed_reward,
            "t_start_unix": self.t_start_unix,
            "t_end_unix": self.t_end_unix,
            "nonce": self.nonce,
        }

    @property
    def proof_bytes(self) -> bytes:
        return base64.b64decode(self.proof)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Rollout:
        what = "rollout"
        _exact_keys(body, set(cls.__dataclass_fields__), what)
        prompt = _ids(body, "prompt_ids", what)
        completion = _ids(body, "completion_ids", what)
        if not prompt or not completion:
            raise WireError(f"{what}: prompt_ids and completion_ids must not be empty")
        lps = _get(body, "logprobs", list, what)
        if len(lps) != len(completion):
            raise WireError(f"{what}: {len(lps)} logprobs for {len(completion)} completion tokens")
        for x in lps:
            if (
                isinstance(x, bool)
                or not isinstance(x, int | float)
                or not (math.isfinite(x) and -1e4 <= x <= 0)
            ):
                raise WireError(f"{what}: logprobs must be finite numbers <= 0")
        reason = _get(body, "finish_reason", str, what)
        if reason not in FINISH_REASONS:
            raise WireError(f"{what}: finish_reason must be one of {FINISH_REASONS}")
        proof = _get(body, "proof", str, what)
        if len(proof) > MAX_PROOF_BYTES * 4 // 3 + 4:
            raise WireError(f"{what}: proof is larger than {MAX_PROOF_BYTES} bytes")
        try:
            base64.b64decode(proof, validate=True)
        except ValueError:
            raise WireError(f"{what}: proof is not base64") from None
        claimed = body.get("claimed_reward")
        if claimed is not None and (
            isinstance(claimed, bool)
            or not isinstance(claimed, int | float)
            or not math.isfinite(claimed)
        ):
            raise WireError(f"{what}: claimed_reward must be a finite number or null")
        if not isinstance(body["assignment"], dict):
            raise WireError(f"{what}: assignment must be an envelope object")
        return cls(
            assignment=body["assignment"],
            sample=_int(body, "sample", what, 0, MAX_GROUP - 1),
            version=_int(body, "version", what, 1),
            manifest_sha256=_str(body, "manifest_sha256", what, _HEX64),
            prompt_ids=prompt,
            completion_ids=completion,
            logprobs=[float(x) for x in lps],
            finish_reason=reason,
            proof=proof,
            proof_chunk=_int(body, "proof_chunk", what, 1, 4096),
            proof_topk=_int(body, "proof_topk", what, 1, 32767),
            claimed_reward=None if claimed is None else float(claimed),
            t_start_unix=_float(body, "t_start_unix", what, 0.0, 1e11),
            t_end_unix=_float(body, "t_end_unix", what, 0.0, 1e11),
            nonce=_str(body, "nonce", what, re.compile(r"^[0-9a-f]{16,64}$")),
        )


@dataclass(frozen=True)
class SignedRollout:
    """A rollout envelope checked for shape and signature, with the assignment inside it
    checked against the orchestrator's key."""

    envelope: Envelope
    rollout: Rollout
    assignment: Assignment

    @property
    def worker(self) -> str:
        return self.envelope.signer

    @property
    def id(self) -> str:
        """``<assignment id>/<sample>``: unique per issued sample."""
        return f"{self.assignment.id}/{self.rollout.sample}"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.envelope.to_bytes()).hexdigest()


def parse_rollout(obj: Any, *, orchestrator: str) -> SignedRollout:
    """A rollout envelope from a stranger: shape, the worker's signature, the orchestrator's
    signature on the assignment inside, and that the assignment was issued to this worker."""
    try:
        env = Envelope.from_json(obj, domain=ROLLOUT)
        rollout = Rollout.from_body(env.body)
        a_env = Envelope.from_json(rollout.assignment, domain=ASSIGNMENT, signers={orchestrator})
    except EnvelopeError as e:
        raise WireError(str(e)) from None
    assignment = Assignment.from_body(a_env.body)
    if assignment.worker != env.signer:
        raise WireError("rollout signed by a key other than the one its assignment names")
    if rollout.sample >= len(assignment.seeds):
        raise WireError(f"rollout sample {rollout.sample} of a group of {len(assignment.seeds)}")
    return SignedRollout(env, rollout, assignment)


# ---- verdict ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """A validator's ruling on one rollout (``rollout_sha256``: the envelope's hash)."""

    rollout_id: str
    rollout_sha256: str
    ok: bool
    check: str | None
    """The first check that failed (one of ``CHECKS``); None when ok."""
    reason: str
    reward: float | None
    """The reward the validator recomputed (None when a check failed before it)."""
    metrics: dict[str, float]
    """What the checks measured (toploc median error, worst logprob gap, ...)."""

    def to_body(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id,
            "rollout_sha256": self.rollout_sha256,
            "ok": self.ok,
            "check": self.check,
            "reason": self.reason[:500],
            "reward": self.reward,
            "metrics": {k: float(v) for k, v in self.metrics.items() if math.isfinite(v)},
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Verdict:
        what = "verdict"
        _exact_keys(body, set(cls.__dataclass_fields__), what)
        ok = _get(body, "ok", bool, what)
        check = body["check"]
        if (ok and check is not None) or (not ok and check not in CHECKS):
            raise WireError(f"{what}: check must be null when ok, else one of {CHECKS}")
        reward = body["reward"]
        if reward is not None and (
            isinstance(reward, bool)
            or not isinstance(reward, int | float)
            or not math.isfinite(reward)
        ):
            raise WireError(f"{what}: reward must be a finite number or null")
        metrics = _get(body, "metrics", dict, what)
        if len(metrics) > 32 or not all(
            isinstance(k, str)
            and len(k) <= 40
            and isinstance(v, int | float)
            and not isinstance(v, bool)
            for k, v in metrics.items()
        ):
            raise WireError(f"{what}: metrics must be at most 32 named numbers")
        reason = _get(body, "reason", str, what)
        return cls(
            rollout_id=_str(body, "rollout_id", what),
            rollout_sha256=_str(body, "rollout_sha256", what, _HEX64),
            ok=ok,
            check=check,
            reason=reason[:500],
            reward=None if reward is None else float(reward),
            metrics={k: float(v) for k, v in metrics.items()},
        )


# ---- requests and announcements --------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A signed "give me work" from a worker or validator: fresh (``unix``) and never reused
    (``nonce``), so a recorded request cannot be replayed to take work in another's name."""

    run: str
    role: str
    nonce: str
    unix: float
    have_version: int
    """The newest policy version the caller holds (0: none)."""
    max_items: int

    def to_body(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "role": self.role,
            "nonce": self.nonce,
            "unix": self.unix,
            "have_version": self.have_version,
            "max_items": self.max_items,
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Request:
        what = "request"
        _exact_keys(body, set(cls.__dataclass_fields__), what)
        role = _get(body, "role", str, what)
        if role not in ("worker", "validator"):
            raise WireError(f"{what}: role must be worker or validator")
        return cls(
            run=_str(body, "run", what),
            role=role,
            nonce=_str(body, "nonce", what, re.compile(r"^[0-9a-f]{16,64}$")),
            unix=_float(body, "unix", what, 0.0, 1e11),
            have_version=_int(body, "have_version", what, 0),
            max_items=_int(body, "max_items", what, 1, 64),
        )


@dataclass(frozen=True)
class VersionNotice:
    """The trainer's word that policy ``version`` is published (``file_sha256`` of its
    shardcast manifest), after ``step`` trainer steps."""

    run: str
    version: int
    file_sha256: str
    step: int
    unix: float
    servers: list[str]
    """Shardcast servers (origin and relays) that serve it."""

    def to_body(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "version": self.version,
            "file_sha256": self.file_sha256,
            "step": self.step,
            "unix": self.unix,
            "servers": list(self.servers),
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> VersionNotice:
        what = "version notice"
        _exact_keys(body, set(cls.__dataclass_fields__), what)
        return cls(
            run=_str(body, "run", what),
            version=_int(body, "version", what, 1),
            file_sha256=_str(body, "file_sha256", what, _HEX64),
            step=_int(body, "step", what, 0),
            unix=_float(body, "unix", what, 0.0, 1e11),
            servers=_servers(body, what),
        )


def _servers(body: dict[str, Any], what: str) -> list[str]:
    servers = _get(body, "servers", list, what)
    if not 1 <= len(servers) <= 16 or not all(
        isinstance(u, str) and len(u) <= 200 and re.match(r"^https?://[^\s]+$", u) for u in servers
    ):
        raise WireError(f"{what}: servers must be 1..16 http(s) URLs")
    return [str(u) for u in servers]


# ---- the trainer's batch ---------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One accepted rollout as the trainer uses it."""

    rollout_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    """Validated behaviour log-probabilities mu (at ``temperature``)."""
    advantage: float
    reward: float
    version: int
    temperature: float

    def to_json(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id,
            "prompt_ids": self.prompt_ids,
            "completion_ids": self.completion_ids,
            "logprobs": self.logprobs,
            "advantage": self.advantage,
            "reward": self.reward,
            "version": self.version,
            "temperature": self.temperature,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Sample:
        what = "sample"
        _exact_keys(obj, set(cls.__dataclass_fields__), what)
        completion = _ids(obj, "completion_ids", what)
        lps = _get(obj, "logprobs", list, what)
        if len(lps) != len(completion):
            raise WireError(f"{what}: logprobs and completion_ids differ in length")
        return cls(
            rollout_id=_str(obj, "rollout_id", what),
            prompt_ids=_ids(obj, "prompt_ids", what),
            completion_ids=completion,
            logprobs=[float(x) for x in lps],
            advantage=_float(obj, "advantage", what, -1e6, 1e6),
            reward=_float(obj, "reward", what, -1e6, 1e6),
            version=_int(obj, "version", what, 1),
            temperature=_float(obj, "temperature", what, 0.0, 100.0),
        )


@dataclass(frozen=True)
class Batch:
    """What trainer step ``step`` trains on: samples in a fixed order (slot, then sample), so
    the same rollouts give the same update on every run."""

    step: int
    samples: list[Sample]
    groups: int
    """Groups with a non-zero advantage in the batch."""
    dropped_groups: int
    """Slots dropped: every attempt had zero advantage (no signal), or rollouts of
    ``max_slot_rejects`` workers were rejected for it."""
    mean_reward: float
    """Over every completed group of the step, including zero-advantage ones."""
    level: int
    """The curriculum level after this batch."""

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "samples": [s.to_json() for s in self.samples],
            "groups": self.groups,
            "dropped_groups": self.dropped_groups,
            "mean_reward": self.mean_reward,
            "level": self.level,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Batch:
        what = "batch"
        if not isinstance(obj, dict):
            raise WireError(f"{what}: must be an object")
        _exact_keys(obj, set(cls.__dataclass_fields__), what)
        samples = _get(obj, "samples", list, what)
        if not all(isinstance(s, dict) for s in samples):
            raise WireError(f"{what}: samples must be objects")
        return cls(
            step=_int(obj, "step", what, 1),
            samples=[Sample.from_json(s) for s in samples],
            groups=_int(obj, "groups", what, 0),
            dropped_groups=_int(obj, "dropped_groups", what, 0),
            mean_reward=_float(obj, "mean_reward", what, -1e6, 1e6),
            level=_int(obj, "level", what, 0),
        )
