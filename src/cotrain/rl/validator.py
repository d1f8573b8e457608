"""The validator: claims rollouts from the orchestrator, checks each cheapest first
(``checks``: schema, signature, assignment, staleness, then one prefill shared by TOPLOC,
logprob agreement, termination and the sampling replay, then the reward), signs its verdict.

It fetches the exact version each rollout claims through shardcast (the trainer keeps
``async_level + 2`` versions), so a rollout is checked against the weights it says it used.
Killed, its claims expire and another validator (or this one, restarted) takes them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from cotrain.core.identity import Identity
from cotrain.core.signed import Envelope
from cotrain.rl import wire
from cotrain.rl.client import OrchestratorClient, Weights
from cotrain.rl.config import RLConfig
from cotrain.rl.heap import release_memory
from cotrain.rl.wire import SignedRollout, Verdict, WireError

log = logging.getLogger("cotrain.rl.validator")


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class Validator:
    def __init__(self, cfg: RLConfig, *, log_line: Callable[[str], None] | None = None) -> None:
        from cotrain.rl import checks, policy
        from cotrain.rl.env import make_env, self_test

        self.cfg = cfg
        self.identity = Identity.load_or_create(cfg.path(cfg.validator.key))
        say = log_line or (lambda m: print(m, file=sys.stderr, flush=True))
        policy.check_memory("validator", cfg.model, log=say)
        from cotrain.rl.heap import limit_heap_growth

        limit_heap_growth()  # prefill temporaries go back to the system when freed
        self.policy = policy.load_policy(cfg.model, shared=True)
        self.env = make_env(cfg.env.name)
        self_test(self.env)
        p = self.policy
        self.ctx = checks.CheckContext(
            run=cfg.run.id,
            run_seed=cfg.run.seed,
            env=self.env,
            encode_prompt=p.encode_prompt,
            decode=p.decode,
            eos_token_id=p.eos_token_id,
            vocab_size=p.vocab_size,
            model_id=p.model_id,
            config=cfg.validator,
            proof=cfg.proof,
            group_size=cfg.run.group_size,
        )
        self.checked = 0
        self.rejected = 0
        self.check_s = 0.0

    @property
    def key(self) -> str:
        return self.identity.public_hex

    async def run(self) -> None:
        cfg = self.cfg
        async with OrchestratorClient(
            cfg.orchestrator_url, identity=self.identity, run=cfg.run.id, role="validator"
        ) as client:
            info = await client.info()
            orchestrator = info["orchestrator_key"]
            weights = Weights(
                cfg.run.out_dir / "cache" / "weights",
                publisher_key=info["trainer_key"],
                channel=cfg.run.id,
                keep=cfg.keep_versions + 1,
            )
            while True:
                got = await client.claim(max_items=cfg.validator.batch_size, wait_s=2.0)
                if not got["items"]:
                    if got["status"] != "running":
                        emit("finished", status=got["status"], **self.summary())
                        return
                    continue
                verdicts = []
                for group in self._groups(got["items"], orchestrator):
                    for v in await self._check(group, weights, got["servers"]):
                        sealed = Envelope.seal(self.identity, wire.VERDICT, v.to_body())
                        verdicts.append(sealed.to_json())
                if verdicts:
                    await client.verdicts(verdicts)

    def _groups(
        self, items: list[dict[str, Any]], orchestrator: str
    ) -> list[tuple[list[SignedRollout], str | None, int]]:
        """Claimed items by the version they claim (each group is checked on one model)."""
        groups: dict[tuple[int, str | None, int], list[SignedRollout]] = {}
        for item in items:
            try:
                signed = wire.parse_rollout(item["rollout"], orchestrator=orchestrator)
            except (WireError, KeyError, TypeError) as e:
                log.warning("unreadable item from the orchestrator: %s", e)
                continue
            key = (signed.rollout.version, item.get("expected_sha256"), int(item["latest_version"]))
            groups.setdefault(key, []).append(signed)
        return [
            (g, sha, latest)
            for (_, sha, latest), g in sorted(groups.items(), key=lambda kv: kv[0][0])
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "rejected": self.rejected,
            "check_s": round(self.check_s, 3),
        }

    async def _check(
        self,
        group: tuple[list[SignedRollout], str | None, int],
        weights: Weights,
        servers: list[str],
    ) -> list[Verdict]:
        from cotrain.rl import checks
        from cotrain.shardcast import ShardcastError
        from cotrain.shardcast.errors import VersionNotFound

        rollouts, expected, latest = group
        version = rollouts[0].rollout.version
        # Fetch only a version that can pass the staleness check; the others fail before
        # the model is used.
        if expected and 1 <= version <= latest:
            try:
                await weights.fetch(servers, version, sha256=expected)
                await asyncio.to_thread(weights.load_into, self.policy.model, version)
            except VersionNotFound as e:  # retired or never published: it cannot be checked
                log.warning("version %d not offered (%s): judged as stale", version, e)
                expected = None
            except ShardcastError as e:  # the servers are down: no verdict, the claims expire
                log.warning("version %d unreachable (%s): no verdict for now", version, e)
                return []
        t0 = time.monotonic()
        verdicts = await asyncio.to_thread(
            checks.check_rollouts,
            self.policy.model,
            rollouts,
            self.ctx,
            expected_sha256=expected,
            latest_version=latest,
        )
        took = time.monotonic() - t0
        release_memory()
        self.check_s += took
        self.checked += len(verdicts)
        for v in verdicts:
            self.rejected += not v.ok
            emit(
                "verdict",
                id=v.rollout_id,
                ok=v.ok,
                check=v.check,
                reason=v.reason[:200],
                check_s=round(took / len(verdicts), 4),
            )
        return verdicts


def run_validator(cfg: RLConfig) -> int:
    """The validator role's program (``cotrain rl validator``)."""
    from cotrain.core.service import Service

    with Service("rl validator") as svc:
        v = Validator(cfg)
        svc.summary = lambda: json.dumps(v.summary())
        svc.ready(validator=v.key)
        asyncio.run(v.run())
    return svc.exit_code
