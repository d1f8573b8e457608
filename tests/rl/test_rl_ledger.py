"""An RL run that is a protocol task: workers record their rollouts as work, the orchestrator
records every final verdict, and the coordinator's ledger credits, rejects and ejects by them.

Over real HTTP on loopback: a coordinator and an orchestrator in this process, rollouts and
validator verdicts signed by hand (the validators' checks are ``checks``'s tests). The work
records go through ``cotrain.rl.worker.record_rollouts``, what a worker runs after each
submission, and the same ``Recorder`` the worker and the orchestrator use.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import rl_wire_harness as rw
from protocol_harness import config, identities, running

from cotrain.core.identity import Identity
from cotrain.core.signed import Envelope
from cotrain.protocol import audit
from cotrain.protocol.recorder import Recorder
from cotrain.rl import wire
from cotrain.rl.config import RLConfig
from cotrain.rl.orchestrator import Orchestrator
from cotrain.rl.worker import record_rollouts

pytest.importorskip("reasoning_gym")


def _orchestrator(tmp: Path, ids: dict[str, Identity], url: str, task: str) -> Orchestrator:
    from cotrain.rl.env import make_env

    cfg = RLConfig()
    cfg.run.out_dir = tmp / "run"
    cfg.run.group_size, cfg.run.groups_per_step, cfg.run.total_steps = 2, 1, 3
    cfg.run.async_level = 0
    cfg.orchestrator.port = 0
    cfg.orchestrator.trainer_key = ids["trainer"].public_hex
    cfg.orchestrator.validator_keys = [ids["checker"].public_hex]
    cfg.orchestrator.ban_after_rejects = 2
    cfg.orchestrator.coordinator = url
    cfg.orchestrator.coordinator_task = task
    cfg.env.curriculum = "off"
    return Orchestrator(
        cfg,
        identity=ids["orch"],
        env=make_env("chain_sum"),
        encode_prompt=lambda text: list(text.encode())[:64],
        decode=lambda ids_: bytes(ids_).decode(errors="replace"),
    )


async def _post(s: aiohttp.ClientSession, orch: Orchestrator, path: str, body: Any) -> Any:
    async with s.post(orch.url + path, json=body, params={"wait_s": "0"}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


@pytest.mark.timeout(180)
def test_rl_verdicts_credit_reject_and_eject_through_the_coordinator(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(config(tmp_path)) as (url, coord):
            reg = await identities(
                url, init=["initiator"], orch=["validator"], honest=["node"], cheat=["node"]
            )
            ids = {k: v[0] for k, v in reg.items()}
            ids["trainer"], ids["checker"] = Identity.generate(), Identity.generate()
            init = reg["init"][1]
            tid = (
                await init.write(
                    "/v1/tasks",
                    {
                        "name": "rl chain_sum",
                        "kind": "rl",
                        "budget": 10_000,
                        "rate_per_unit": 2,
                        "lock_s": 3600,
                        "admission": "open",
                        "validators": [ids["orch"].public_hex],
                        "quorum": 1,
                        "weights": {"rollout_tokens": 1},
                    },
                )
            )["task"]
            await init.write(f"/v1/tasks/{tid}/open", {})
            recorders = {}
            for w in ("honest", "cheat"):
                rec = Recorder(url, ids[w], tid, patience_s=30)
                assert (await rec.join_as_node(w))["status"] == "joined"
                rec.start()
                recorders[w] = rec
            orch = _orchestrator(tmp_path, ids, url, tid)
            await orch.start()
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
                    await _post(s, orch, "/v1/version", rw.version(ids["trainer"], 1))
                    sent: dict[str, list[dict[str, Any]]] = {}
                    for w, ok in (("honest", True), ("cheat", False)):
                        got = await _post(s, orch, "/v1/work", rw.request(ids[w]))
                        [a] = got["assignments"]
                        task = orch.env.task(a["body"]["task_seed"], 0)
                        rollouts = [rw.rollout(ids[w], a, i, task.answer) for i in range(2)]
                        res = await _post(s, orch, "/v1/rollouts", {"rollouts": rollouts})
                        step = a["body"]["step"]
                        n = record_rollouts(
                            recorders[w], rollouts, res["results"], step, tokens_per_s=41.26
                        )
                        assert n == 2
                        sent[w] = rollouts
                        aid = a["body"]["id"]
                        verdicts = [
                            rw.verdict(ids["checker"], r, aid, i, ok)
                            for i, r in enumerate(rollouts)
                        ]
                        await _post(s, orch, "/v1/verdicts", {"verdicts": verdicts})
                    for r in recorders.values():
                        assert await r.flush(60)
                    assert await orch.recorder.flush(60)
                    status = orch.status()["ledger"]
                    assert status == {"sent": 4, "pending": 0, "refused": {}, "lost": 0}
            finally:
                await orch.close()
                for r in recorders.values():
                    await r.close()

            async with aiohttp.ClientSession() as s:
                async with s.get(f"{url}/v1/tasks/{tid}/work", params={"limit": 100}) as r:
                    rows = {x["key"]: x for x in (await r.json())["work"]}
                async with s.get(f"{url}/v1/tasks/{tid}") as r:
                    members = {m["node"]: m for m in (await r.json())["members"]}

            def key(env: dict[str, Any]) -> str:
                raw = Envelope.from_json(env, domain=wire.ROLLOUT).to_bytes()
                return hashlib.sha256(raw).hexdigest()

            honest = [rows[key(e)] for e in sent["honest"]]
            cheat = [rows[key(e)] for e in sent["cheat"]]
            assert [u["state"] for u in honest] == ["accepted", "accepted"]
            assert [u["meta"] for u in honest] == [{"tokens_per_s": 41.3}] * 2  # the dashboard's
            # the first failed check drops that rollout's credit, the second gets the worker
            # banned by the orchestrator and ejected by the coordinator (quorum 1)
            assert [u["state"] for u in cheat] == ["soft_rejected", "hard_rejected"]
            assert "sampling" in cheat[0]["reason"]
            h, c = members[ids["honest"].public_hex], members[ids["cheat"].public_hex]
            assert h["accepted_units"] == sum(u["units"] for u in honest) > 0
            assert h["locked"] == 2 * h["accepted_units"] and h["status"] != "ejected"
            assert c["status"] == "ejected" and c["weight"] == 0 and c["locked"] == 0
            # the ledger alone says the same
            ledger = await audit.fetch(url, timeout_s=60)
            report = audit.audit(ledger, key=coord.key)
            m = report.state["members"]
            assert m[f"{tid}/{ids['cheat'].public_hex}"]["status"] == "ejected"
            assert m[f"{tid}/{ids['honest'].public_hex}"]["weight"] == h["weight"]
            for _, client in reg.values():
                await client.close()

    asyncio.run(main())
