"""Signed RL messages made by hand (no model): requests, version notices, rollouts, verdicts."""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

from cotrain.core.identity import Identity
from cotrain.core.signed import Envelope
from cotrain.rl import wire


def request(who: Identity, role: str = "worker", **over: Any) -> dict[str, Any]:
    body = wire.Request("rl", role, wire.new_nonce(), time.time(), 0, 1).to_body()
    body.update(over)
    return Envelope.seal(who, wire.REQUEST, body).to_json()


def version(trainer: Identity, v: int, step: int = 0) -> dict[str, Any]:
    notice = wire.VersionNotice("rl", v, f"{v:064x}", step, time.time(), ["http://127.0.0.1:1"])
    return Envelope.seal(trainer, wire.VERSION, notice.to_body()).to_json()


def rollout(who: Identity, assignment: dict[str, Any], sample: int, answer: str) -> dict:
    a = wire.Assignment.from_body(assignment["body"])
    ids = list(answer.encode())
    body = wire.Rollout(
        assignment=assignment,
        sample=sample,
        version=1,
        manifest_sha256=f"{1:064x}",
        prompt_ids=a.prompt_ids,
        completion_ids=ids,
        logprobs=[-0.5] * len(ids),
        finish_reason="length",
        proof=base64.b64encode(b"\0" * 8).decode(),
        proof_chunk=32,
        proof_topk=128,
        claimed_reward=None,
        t_start_unix=time.time(),
        t_end_unix=time.time(),
        nonce=wire.new_nonce(),
    ).to_body()
    return Envelope.seal(who, wire.ROLLOUT, body).to_json()


def verdict(
    validator: Identity, rollout: dict[str, Any], assignment_id: str, sample: int, ok: bool
) -> dict:
    sha = hashlib.sha256(Envelope.from_json(rollout, domain=wire.ROLLOUT).to_bytes())
    v = wire.Verdict(
        f"{assignment_id}/{sample}", sha.hexdigest(), ok, None if ok else "sampling", "t", None, {}
    )
    return Envelope.seal(validator, wire.VERDICT, v.to_body()).to_json()
