"""The orchestrator over real HTTP on loopback: hostile input is refused at the door with the
check it failed and nothing lost, requests cannot be replayed, accepted rollouts become a
batch with group advantages, and a restarted orchestrator rebuilds its state from the journal.

Rollout contents are not validated here (that is ``checks``, run by real validators in the
end-to-end tests); this test signs the verdicts with a validator key itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import rl_wire_harness

from cotrain.core.identity import Identity
from cotrain.core.signed import Envelope
from cotrain.rl import wire
from cotrain.rl.config import RLConfig
from cotrain.rl.orchestrator import Orchestrator

pytest.importorskip("reasoning_gym")

ORCH, TRAINER, VALIDATOR = Identity.generate(), Identity.generate(), Identity.generate()
W1, W2 = Identity.generate(), Identity.generate()


def _cfg(tmp: Path) -> RLConfig:
    cfg = RLConfig()
    cfg.run.out_dir = tmp
    cfg.run.group_size, cfg.run.groups_per_step, cfg.run.total_steps = 2, 1, 3
    cfg.run.async_level = 0
    cfg.orchestrator.port = 0
    cfg.orchestrator.trainer_key = TRAINER.public_hex
    cfg.orchestrator.validator_keys = [VALIDATOR.public_hex]
    cfg.orchestrator.ban_after_rejects = 3
    cfg.env.curriculum = "off"
    return cfg


def _orchestrator(cfg: RLConfig) -> Orchestrator:
    from cotrain.rl.env import make_env

    return Orchestrator(
        cfg,
        identity=ORCH,
        env=make_env("chain_sum"),
        encode_prompt=lambda text: list(text.encode())[:64],
        decode=lambda ids: bytes(ids).decode(errors="replace"),
    )


def serve(
    cfg: RLConfig, body: Callable[[Orchestrator, aiohttp.ClientSession], Awaitable[None]]
) -> None:
    async def main() -> None:
        orch = _orchestrator(cfg)
        await orch.start()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
                await body(orch, s)
        finally:
            await orch.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def _request(who: Identity, role: str = "worker", **over: Any) -> dict[str, Any]:
    return rl_wire_harness.request(who, role, **over)


def _version(v: int, step: int = 0) -> dict[str, Any]:
    return rl_wire_harness.version(TRAINER, v, step)


_rollout = rl_wire_harness.rollout


def _verdict(rollout: dict[str, Any], assignment_id: str, sample: int, ok: bool) -> dict:
    return rl_wire_harness.verdict(VALIDATOR, rollout, assignment_id, sample, ok)


async def _post(s: aiohttp.ClientSession, orch: Orchestrator, path: str, body: Any) -> tuple:
    async with s.post(orch.url + path, json=body, params={"wait_s": "0"}) as r:
        return r.status, await r.json()


def test_a_step_from_assignment_to_batch(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)

    async def body(orch: Orchestrator, s: aiohttp.ClientSession) -> None:
        code, got = await _post(s, orch, "/v1/work", _request(W1))
        assert code == 200 and got["assignments"] == [] and got["latest_version"] == 0
        assert (await _post(s, orch, "/v1/version", _version(1)))[0] == 200
        code, got = await _post(s, orch, "/v1/work", _request(W1))
        [a] = got["assignments"]
        task = orch.env.task(a["body"]["task_seed"], 0)
        r0 = _rollout(W1, a, 0, task.answer)
        r1 = _rollout(W1, a, 1, "no idea")
        code, got = await _post(s, orch, "/v1/rollouts", {"rollouts": [r0, r1]})
        assert [r["status"] for r in got["results"]] == ["queued", "queued"]
        code, got = await _post(s, orch, "/v1/claim", _request(VALIDATOR, "validator", max_items=8))
        assert len(got["items"]) == 2 and got["items"][0]["expected_sha256"] == f"{1:064x}"
        aid = a["body"]["id"]
        verdicts = [_verdict(r0, aid, 0, True), _verdict(r1, aid, 1, True)]
        code, got = await _post(s, orch, "/v1/verdicts", {"verdicts": verdicts})
        assert [r["status"] for r in got["results"]] == ["accepted", "accepted"]
        async with s.get(orch.url + "/v1/batch", params={"step": "1", "wait_s": "0"}) as r:
            got = await r.json()
        assert got["status"] == "ready"
        batch = wire.Batch.from_json(got["batch"])
        assert [x.reward for x in batch.samples] == [1.0, 0.0]
        assert [x.advantage for x in batch.samples] == [0.5, -0.5]
        orch.flush_store()
        records = orch.store.read_step(1)
        assert {r["status"] for r in records} == {"accepted"} and len(records) == 2

    serve(cfg, body)


def test_hostile_input_is_refused_at_the_door(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    cfg.run.groups_per_step = 2

    async def body(orch: Orchestrator, s: aiohttp.ClientSession) -> None:
        await _post(s, orch, "/v1/version", _version(1))
        # garbage bodies: 400 with a reason, never a 500
        for raw in [
            b"{",
            b"[]",
            b'{"rollouts": 5}',
            b"\xff\xfe",
            b'{"a": ' * 100 + b"1" + b"}" * 100,
        ]:
            async with s.post(orch.url + "/v1/rollouts", data=raw) as r:
                assert r.status == 400, raw
        # a replayed request (same nonce) and a stale one
        req = _request(W1)
        assert (await _post(s, orch, "/v1/work", req))[0] == 200
        code, got = await _post(s, orch, "/v1/work", req)
        assert code == 400 and "replay" in got["error"]
        code, got = await _post(s, orch, "/v1/work", _request(W1, unix=time.time() - 3600))
        assert code == 400 and "stale" in got["error"]
        # a stranger's verdicts and version notices do not count
        code, _ = await _post(s, orch, "/v1/claim", _request(W1, "validator"))
        assert code == 403
        notice = wire.VersionNotice("rl", 9, "9" * 64, 0, time.time(), ["http://x:1"]).to_body()
        forged = Envelope.seal(W1, wire.VERSION, notice).to_json()
        assert (await _post(s, orch, "/v1/version", forged))[0] == 403
        assert orch.planner.latest_version == 1
        # rollouts: bad signature, someone else's assignment, tampered assignment, duplicates
        code, got = await _post(s, orch, "/v1/work", _request(W1))
        [a] = got["assignments"]
        good = _rollout(W1, a, 0, "1")
        bad_sig = dict(good, signature="0" * 128)
        stolen = _rollout(W2, a, 1, "2")
        tampered_a = dict(a, body=dict(a["body"], task_seed=1))
        tampered = _rollout(W1, tampered_a, 1, "3")
        resigned = _rollout(W1, a, 0, "9")  # the same sample again with other contents
        rollouts = [bad_sig, stolen, tampered, good, good, resigned, "x"]
        code, got = await _post(s, orch, "/v1/rollouts", {"rollouts": rollouts})
        checks = [(r["status"], r.get("check")) for r in got["results"]]
        assert checks == [
            ("rejected", "signature"),
            ("rejected", "signature"),
            ("rejected", "signature"),
            ("queued", None),
            ("rejected", "duplicate"),
            ("rejected", "duplicate"),
            ("rejected", "schema"),
        ], checks
        assert "counts once" in got["results"][4]["reason"]
        code, got = await _post(s, orch, "/v1/work", _request(W2))
        assert got["assignments"] == []  # both slots of the step are W1's, and live
        status = orch.status()
        assert status["rejected_by_check"] == {"signature": 3, "duplicate": 2, "schema": 1}
        # the identical envelope again (a retry after a lost reply) is no strike; W1 has 3
        # (bad signature, tampered, re-signed sample): banned
        assert orch.planner.strikes[W1.public_hex] == 3
        code, got = await _post(s, orch, "/v1/work", _request(W1))
        assert code == 403 and "banned" in got["error"]

    serve(cfg, body)


def test_restart_replays_the_journal(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    saved: dict[str, Any] = {}

    async def first(orch: Orchestrator, s: aiohttp.ClientSession) -> None:
        await _post(s, orch, "/v1/version", _version(1))
        [a] = (await _post(s, orch, "/v1/work", _request(W1)))[1]["assignments"]
        answer = orch.env.task(a["body"]["task_seed"], 0).answer
        r0, r1 = _rollout(W1, a, 0, answer), _rollout(W1, a, 1, "no idea")
        await _post(s, orch, "/v1/rollouts", {"rollouts": [r0, r1]})
        await _post(s, orch, "/v1/claim", _request(VALIDATOR, "validator", max_items=8))
        aid = a["body"]["id"]
        await _post(s, orch, "/v1/verdicts", {"verdicts": [_verdict(r0, aid, 0, True)]})
        saved.update(a=a, r1=r1, status=orch.status())

    serve(cfg, first)
    # torn last line, as if killed mid-write
    journal = tmp_path / "orchestrator" / "journal.jsonl"
    with open(journal, "a") as f:
        f.write('{"e": "verdict", "envelo')

    async def second(orch: Orchestrator, s: aiohttp.ClientSession) -> None:
        before, now = saved["status"], orch.status()
        for key in ("issued", "submitted", "accepted", "latest_version", "queued"):
            assert now[key] == before[key], key
        # the same assignment is still known; its pending rollout can be judged
        r1 = saved["r1"]
        got = await _post(s, orch, "/v1/claim", _request(VALIDATOR, "validator", max_items=8))
        assert len(got[1]["items"]) == 1
        aid = saved["a"]["body"]["id"]
        await _post(s, orch, "/v1/verdicts", {"verdicts": [_verdict(r1, aid, 1, True)]})
        assert orch.planner.batch(1) is not None
        # a rollout submitted again after the restart is still a duplicate
        _, got = await _post(s, orch, "/v1/rollouts", {"rollouts": [r1]})
        assert got["results"][0]["check"] == "duplicate"
        orch.flush_store()

    serve(cfg, second)
    # killed after step 1 formed (journaled) but before its write to the store (which runs
    # off the event loop): the restart writes it from the journal
    stored = tmp_path / "rollouts" / "step_000001.jsonl"
    written = stored.read_text()
    stored.unlink()
    torn = stored.with_name(f"{stored.name}.999999999.tmp")  # a writer killed mid-write
    torn.write_text("half")

    async def third(orch: Orchestrator, s: aiohttp.ClientSession) -> None:
        orch.flush_store()
        assert stored.read_text() == written
        assert [r["status"] for r in orch.store.read_step(1)] == ["accepted", "accepted"]
        assert orch.store.steps() == {1} and not torn.exists()
        async with s.get(orch.url + "/v1/rollouts", params={"step": "1"}) as r:
            assert r.status == 200 and len((await r.json())["records"]) == 2
        # a store that lost a formed step answers with the reason, not a server error
        stored.unlink()
        async with s.get(orch.url + "/v1/rollouts", params={"step": "1"}) as r:
            assert r.status == 503 and "not in the rollout store" in (await r.json())["error"]

    serve(cfg, third)


def test_a_silent_worker_loses_its_slot_before_the_deadline(tmp_path: Path) -> None:
    """A worker that stops sending heartbeats (killed mid-rollout) is taken for dead after
    ``worker_timeout_s``: its slot goes to another worker, with the same task, long before
    the assignment's deadline; a worker that keeps beating keeps it."""
    cfg = _cfg(tmp_path)
    cfg.orchestrator.worker_timeout_s = 5.0
    cfg.orchestrator.assignment_timeout_s = 600.0
    offset = [0.0]

    async def body(orch: Orchestrator, s: aiohttp.ClientSession) -> None:
        orch.clock = lambda: time.time() + offset[0]
        assert (await _post(s, orch, "/v1/version", _version(1)))[0] == 200
        [a1] = (await _post(s, orch, "/v1/work", _request(W1)))[1]["assignments"]
        offset[0] = 4.0  # W1 beats; W2 finds nothing to do
        assert (await _post(s, orch, "/v1/heartbeat", _request(W1)))[0] == 200
        assert (await _post(s, orch, "/v1/work", _request(W2)))[1]["assignments"] == []
        offset[0] = 8.0  # 4 s after W1's beat: still alive
        assert (await _post(s, orch, "/v1/work", _request(W2)))[1]["assignments"] == []
        offset[0] = 9.5  # 5.5 s of silence: dead
        [a2] = (await _post(s, orch, "/v1/work", _request(W2)))[1]["assignments"]
        assert a2["body"]["slot"] == a1["body"]["slot"] and a2["body"]["worker"] != W1.public_hex
        assert a2["body"]["task_seed"] == a1["body"]["task_seed"]
        assert a2["body"]["seeds"] == a1["body"]["seeds"]
        # a forged heartbeat (another key's signature) is refused and keeps nobody alive
        forged = _request(W1)
        forged["signature"] = _request(W2)["signature"]
        assert (await _post(s, orch, "/v1/heartbeat", forged))[0] == 400

    serve(cfg, body)


def test_a_slot_dropped_by_a_reject_completes_its_step(tmp_path: Path) -> None:
    """When a rejected rollout drops the last open slot of a step (``max_slot_rejects``), the
    step's batch forms at once, without that group: the run does not wait for an accept that
    can never come."""
    cfg = _cfg(tmp_path)
    cfg.orchestrator.max_slot_rejects = 1

    async def body(orch: Orchestrator, s: aiohttp.ClientSession) -> None:
        assert (await _post(s, orch, "/v1/version", _version(1)))[0] == 200
        [a] = (await _post(s, orch, "/v1/work", _request(W1)))[1]["assignments"]
        r0 = _rollout(W1, a, 0, "wrong")
        assert (await _post(s, orch, "/v1/rollouts", {"rollouts": [r0]}))[0] == 200
        await _post(s, orch, "/v1/claim", _request(VALIDATOR, "validator", max_items=8))
        verdict = _verdict(r0, a["body"]["id"], 0, False)
        code, got = await _post(s, orch, "/v1/verdicts", {"verdicts": [verdict]})
        assert code == 200
        assert [r["status"] for r in got["results"]] == ["rejected"]
        async with s.get(orch.url + "/v1/batch", params={"step": "1", "wait_s": "0"}) as r:
            got = await r.json()
        assert got["status"] == "ready", got
        batch = wire.Batch.from_json(got["batch"])
        assert batch.groups == 0 and batch.dropped_groups == 1 and batch.samples == []

    serve(cfg, body)
