"""The whole protocol with real processes: a DiLoCo task from publication to an audited finish.

A coordinator (``cotrain coordinator``), the run's master (``cotrain master --coordinator``),
two validators (``cotrain validator``) and four nodes (``cotrain node``), each its own process
with its own key. One node poisons its pseudo-gradients (``harness/forger.py``: -3x its honest
update, tokens still claimed). The validators' quorum hard-rejects it, the coordinator ejects
it, the master bans it from the ring, and the three honest nodes finish the run. The initiator
finalizes, the shares are exported and checked offline, and ``cotrain audit`` replays every
balance and share from the ledger alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from diloco_harness import tiny_train_config, write_fake_shakespeare

from cotrain.core.identity import Identity
from cotrain.protocol.client import Client
from cotrain.rl.launch import free_port

WAIT_S = 240.0
HARNESS = Path(__file__).resolve().parents[1] / "harness"


class Procs:
    """Child processes with their output in files; all killed at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COTRAIN_")}
        self.env["PYTHONUNBUFFERED"] = "1"

    def start(self, name: str, *args: str, script: str | None = None) -> subprocess.Popen[bytes]:
        head = [sys.executable, script] if script else [sys.executable, "-m", "cotrain"]
        with (
            (self.tmp / f"{name}.out").open("wb") as fo,
            (self.tmp / f"{name}.err").open("wb") as fe,
        ):
            p = subprocess.Popen([*head, *args], stdout=fo, stderr=fe, env=self.env)
        self.procs[name] = p
        return p

    def out(self, name: str) -> str:
        return (self.tmp / f"{name}.out").read_text(errors="replace")

    def output(self, name: str) -> str:
        err = (self.tmp / f"{name}.err").read_text(errors="replace")
        return f"--- {name} stdout\n{self.out(name)[-1500:]}\n--- {name} stderr\n{err[-3000:]}"

    def ready(self, name: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for line in self.out(name).splitlines():
                with contextlib.suppress(ValueError):
                    obj = json.loads(line)
                    if isinstance(obj, dict) and obj.get("event") == "ready":
                        return obj
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{name}: no ready line\n{self.output(name)}")

    def wait(self, name: str, timeout_s: float) -> int:
        try:
            return self.procs[name].wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running\n{self.all_output()}") from None

    def all_output(self) -> str:
        return "\n".join(self.output(n) for n in self.procs)

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(30)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.kill_all()


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


async def _until(check: Any, what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = await check()
        if got:
            return got
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# On PostgreSQL: the same lifecycle on SQLite (the default) runs with real processes in
# tests/demo/test_demo_network.py (``cotrain demo --quick``), which keeps the suite's time.
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.timeout(600)
def test_diloco_task_published_trained_judged_finalized_and_audited(
    tmp_path: Path, procs: Procs, db_url: str
) -> None:
    cache = tmp_path / "cache"
    write_fake_shakespeare(cache)
    keys = {}
    for name in ("init", "master", "v1", "v2", "n1", "n2", "n3", "forger"):
        ident = Identity.generate()
        ident.save(tmp_path / f"{name}.pem")
        keys[name] = ident

    procs.start(
        "coordinator",
        *("coordinator", "--port", "0", "--db", db_url),
        *("--key", str(tmp_path / "coord.pem"), "--checkpoint_every", "20"),
    )
    ready = procs.ready("coordinator")
    url, coord_key = ready["url"], ready["key"]

    def cotrain(*args: str) -> str:
        cp = subprocess.run(
            [sys.executable, "-m", "cotrain", *args],
            capture_output=True,
            env=procs.env,
            timeout=300,
            cwd=tmp_path,
        )
        assert cp.returncode == 0, f"{args}: {cp.stdout.decode()}{cp.stderr.decode()}"
        return cp.stdout.decode()

    H, batch, seq, rounds = 4, 4, 16, 6
    train = tiny_train_config(
        cache,
        tmp_path / "unused",
        **{
            "total_steps": H * rounds,
            "world": 4,
            "inner.warmup_steps": 0,
            "comm.heartbeat_interval_s": 0.3,
            # survivors wait for a third worker: the killed node's restart rejoins the run
            "algo.min_workers": 3,
            "algo.min_workers_timeout_s": 120,
            "checkpoint": "none",
            "save_model": False,
        },
    )
    del train["out_dir"]
    master_port = free_port()
    store = tmp_path / "store"
    init = keys["init"]

    async def validators() -> None:
        for v in ("v1", "v2"):  # validators stand for election before tasks name them
            async with Client(url, keys[v]) as c:
                await c.register(["validator"], v)

    _run(validators())
    task_file = tmp_path / "task.json"
    task_file.write_text(
        json.dumps(
            {
                "name": "tiny gpt",
                "kind": "diloco",
                "spec": {
                    "master": f"127.0.0.1:{master_port}",
                    "master_key": keys["master"].public_hex,
                    "store": str(store),
                    "train": train,
                },
                "budget": 100_000,
                "rate_per_unit": 10,
                "validator_fee": 1,
                "lock_s": 3600,
                "admission": "invite",
                "validators": [keys["v1"].public_hex, keys["v2"].public_hex],
                "quorum": 2,
                "weights": {"tokens": 1},
                "max_units": H * batch * seq,
            }
        )
    )
    as_init = ("--coordinator", url, "--key", str(tmp_path / "init.pem"))
    tid = cotrain("task", "publish", str(task_file), *as_init).strip()
    invites = cotrain("task", "invite", tid, "--count", "5", *as_init).split()
    assert len(invites) == 5
    procs.start(
        "master",
        *("master", "--port", str(master_port), "--run_id", tid),
        *("--key_file", str(tmp_path / "master.pem")),
        *("--events_file", str(tmp_path / "events.jsonl")),
        *("--token_issuers", json.dumps([coord_key]), "--coordinator", url),
        *("--coordinator_poll_s", "0.3", "--heartbeat_timeout_s", "5", "--secret", ""),
    )
    procs.ready("master")
    for v in ("v1", "v2"):
        procs.start(
            v,
            *("validator", "--coordinator", url, "--key", str(tmp_path / f"{v}.pem")),
            *("--task", tid, "--work_dir", str(tmp_path / v), "--poll_s", "0.2"),
        )

    def node_args(name: str, invite: str) -> tuple[str, ...]:
        return (
            *("--coordinator", url, "--key", str(tmp_path / f"{name}.pem"), "--task", tid),
            *("--invite", invite, "--work_dir", str(tmp_path / name), "--name", name),
        )

    procs.start("n1", "node", *node_args("n1", invites[0]))
    procs.start("n2", "node", *node_args("n2", invites[1]))
    # n3 dies (SIGKILL) as its third synchronisation starts: its pseudo-gradient is in the
    # store, the collective goes on without it; restarted, it records that work as dropped
    kill = '[{kind = "kill", at_collective = 2, after_chunks = 0}]'
    procs.start("n3", "node", *node_args("n3", invites[2]), "--worker.faults.faults", kill)
    procs.start("forger", *node_args("forger", invites[3]), script=str(HARNESS / "forger.py"))
    assert procs.wait("n3", WAIT_S) == -9, procs.output("n3")
    pending = json.loads((tmp_path / "n3" / tid / "pending-work.json").read_text())
    assert len(pending) == 1, pending
    procs.start("n3-again", "node", *node_args("n3", invites[4]))

    # the honest nodes finish the run; the poisoner is ejected and banned, and exits 1
    for name in ("n1", "n2", "n3-again"):
        rc = procs.wait(name, WAIT_S)
        assert rc == 0, procs.all_output()
    assert procs.wait("forger", 60) == 1, procs.output("forger")
    assert "out of the task" in (tmp_path / "forger.err").read_text()
    for name in ("n1", "n2", "n3-again"):
        line = [x for x in procs.out(name).splitlines() if '"node_done"' in x][-1]
        done = json.loads(line)
        assert done["step"] == H * rounds and done["work_unrecorded"] == 0, done

    async def judged_and_finalized() -> dict[str, Any]:
        async with Client(url, init) as c:

            async def all_judged() -> list[dict[str, Any]] | None:
                rows = (await c.get(f"/v1/tasks/{tid}/work", limit=1000))["work"]
                honest = [r for r in rows if r["node"] != keys["forger"].public_hex]
                if honest and all(r["state"] != "submitted" for r in honest):
                    return rows  # type: ignore[no-any-return]
                return None

            rows = await _until(all_judged, "the validators' verdicts on every honest record")
            view = await c.get(f"/v1/tasks/{tid}")
            finalized = await asyncio.to_thread(cotrain, "task", "finalize", tid, *as_init)
            assert json.loads(finalized)["state"] == "finalized"
            export = await c.get(f"/v1/tasks/{tid}/shares/export")
            state = await c.get("/v1/state")
            return {"rows": rows, "view": view, "export": export, "state": state}

    got = _run(judged_and_finalized())
    rows, view = got["rows"], got["view"]
    members = {m["node"]: m for m in view["members"]}
    forger = members[keys["forger"].public_hex]
    assert forger["status"] == "ejected", forger
    assert forger["weight"] == 0 and forger["earned"] == 0 and forger["locked"] == 0
    forged = [r for r in rows if r["node"] == keys["forger"].public_hex]
    assert forged and forged[0]["state"] == "hard_rejected", forged
    honest = [r for r in rows if r["node"] != keys["forger"].public_hex]
    # n3's work of the synchronisation it died in: recorded, judged dropped (credit, no share)
    dropped = [r for r in honest if r["state"] == "dropped"]
    assert [(r["node"], r["key"]) for r in dropped] == [
        (keys["n3"].public_hex, next(iter(pending.values()))[0])
    ], [(r["node"][:8], r["step"], r["state"], r["meta"]) for r in honest]
    assert dropped[0]["meta"]["used"] is False and dropped[0]["credit"] > 0
    # every other honest contribution was used by the run and judged; nearly all lower the loss
    assert all(r["meta"]["used"] is True for r in honest if r not in dropped)
    accepted = [r for r in honest if r["state"] == "accepted"]
    assert len(accepted) >= len(honest) - 3, [(r["step"], r["state"]) for r in honest]
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["key"] for e in events if e["event"] == "banned"] == [keys["forger"].public_hex]

    # shares: frozen at finalize, the accepted tokens of each node; the poisoner holds none
    shares_file = tmp_path / "shares.json"

    cotrain("shares", "export", url, tid, "--out", str(shares_file), "--key", coord_key)
    leaves = {x["node"]: x["weight"] for x in json.loads(shares_file.read_text())["leaves"]}
    assert keys["forger"].public_hex not in leaves
    for name in ("n1", "n2", "n3"):
        key = keys[name].public_hex
        units = sum(r["units"] for r in accepted if r["node"] == key)
        assert leaves[key] == members[key]["weight"] == units > 0
        proof = tmp_path / f"{name}.proof.json"
        cotrain("shares", "prove", str(shares_file), "--node", key, "--out", str(proof))
        assert f"holds {units} of {sum(leaves.values())}" in cotrain(
            "shares", "verify", str(proof), "--key", coord_key
        )

    # the validators stop when the task is finalized
    for v in ("v1", "v2"):
        assert procs.wait(v, 120) == 0, procs.output(v)

    # the audit replays every balance and share from the ledger alone (and the coordinator's
    # published state matches it)
    report = tmp_path / "audit.json"
    out = cotrain("audit", url, "--key", coord_key, "--json_out", str(report), "--cache", "")
    assert "audit ok" in out, out
    replayed = json.loads(report.read_text())["state"]
    assert {k: w for k, w in replayed["tasks"][tid]["shares"].items() if w} == leaves
    forger_key = keys["forger"].public_hex
    assert replayed["members"][f"{tid}/{forger_key}"]["status"] == "ejected"
    for name in ("n1", "n2", "n3"):
        key = keys[name].public_hex
        assert replayed["members"][f"{tid}/{key}"]["weight"] == leaves[key]
        assert replayed["members"][f"{tid}/{key}"]["locked"] > 0  # locked for lock_s
