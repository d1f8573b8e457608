"""``cotrain market launch|status|cost|terminate|watch`` on loopback: a real coordinator with an
open DiLoCo task, real sshd hosts that cost money, and the budget.

- a launch whose nodes would cost more than the budget over --max-hours is refused before
  anything starts;
- the cheapest host fails its install, the launch falls over to the next offer, whose node
  joins the task on the coordinator;
- the watchdog terminates the node when the spend reaches the budget (no process left on the
  host), and from then on no launch for the task starts;
- a cloud launch that never becomes ready (Vast's replay: the machine never runs a node) is
  given up after --ready-timeout-s and terminated at the provider; the API key is in no output
  and no file the market wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from market_harness import Coordinator, cli, master_key, publish, start_master
from market_replays import vast as vast_replay
from sshd_harness import SshServer, hosts_toml, kill_under, processes_under, require_sshd

from cotrain.core.identity import Identity
from cotrain.rl.launch import free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sshd logs in as root here")


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    c = Coordinator.start(tmp_path)
    try:
        yield c
    finally:
        c.stop()


@pytest.mark.timeout(300)
def test_budget_fallover_watchdog(tmp_path: Path, coordinator: Coordinator) -> None:
    require_sshd()
    server = SshServer.start(tmp_path, "box")
    master = None
    try:
        good = server.ssh_host(tmp_path, usd_per_hour=3600.0)  # a dollar a second
        bad = server.ssh_host(
            tmp_path, name="bargain", usd_per_hour=1800.0, workdir=str(tmp_path / "bargain"),
            pip_args=["--no-index", "--find-links", str(tmp_path / "nothing"), "no-such-pkg"],
        )  # fmt: skip
        hosts = tmp_path / "hosts.toml"
        hosts.write_text(hosts_toml([good, bad]))
        # one worker trains for long: the node runs until something stops it
        port = free_port()
        task = publish(
            tmp_path, coordinator.url, master=f"127.0.0.1:{port}", master_key=master_key(tmp_path),
            **{"world": 1, "total_steps": 100_000, "checkpoint": "none", "save_model": False},
        )  # fmt: skip
        master = start_master(tmp_path, coordinator, task, port)
        state = tmp_path / "state"
        common = ("--task", task, "--coordinator", coordinator.url, "--hosts", str(hosts))
        common += ("--state-dir", str(state), "--provider", "ssh")

        # two nodes for an hour cost $5400: over a $100 budget, refused, nothing started
        cp = cli("market", "launch", *common, "--count", "2", "--budget-usd", "100",
                 "--max-hours", "1")  # fmt: skip
        assert cp.returncode == 1, cp.stdout + cp.stderr
        assert "exceeds the budget of $100.00" in cp.stderr, cp.stderr
        assert not (state / "ssh" / "instances.json").exists()

        # one node: the bargain fails its install, the box's node joins (a budget large enough
        # for however long the launch takes on a loaded machine)
        cp = cli("market", "launch", *common, "--budget-usd", "3000", "--watch-every-s", "0.3",
                 "--json")  # fmt: skip
        assert cp.returncode == 0, cp.stdout + cp.stderr
        rec = json.loads(cp.stdout)
        assert "bargain: installing cotrain failed" in cp.stderr, cp.stderr
        [failure] = rec["failures"]
        assert failure["offer_id"] == "bargain"
        joined = [n for n in rec["nodes"] if n["state"] == "joined"]
        assert [n["offer_id"] for n in joined] == ["box"] and joined[0]["node_key"]
        status = cli("market", "status", "--json", "--task", task, "--state-dir", str(state),
                     "--hosts", str(hosts))  # fmt: skip
        members = json.loads(status.stdout)[0]["members"]
        assert joined[0]["node_key"] in members

        # the budget lowered to $6 more than is spent: the watchdog stops the node before that
        spent0 = json.loads(cli("market", "cost", "--task", task, "--state-dir", str(state),
                                "--json").stdout)["spent_usd"]  # fmt: skip
        cap = round(spent0 + 6, 2)
        cp = cli("market", "budget", "--task", task, "--usd", str(cap), "--state-dir", str(state),
                 "--hosts", str(hosts), "--watch-every-s", "0.3")  # fmt: skip
        assert cp.returncode == 0, cp.stderr
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            rec = json.loads((state / "launches" / f"{task}.json").read_text())
            if rec["stopped"] == "budget" and all(n["ended_at"] for n in rec["nodes"]):
                break
            time.sleep(0.2)
        assert rec["stopped"] == "budget", (state / "launches" / f"{task}.watch.log").read_text()
        box = next(n for n in rec["nodes"] if n["offer_id"] == "box")
        assert box["state"] == "terminated (budget)"
        spent = sum(
            n["usd_per_hour"] * ((n["ended_at"] or time.time()) - n["started_at"]) / 3600
            for n in rec["nodes"]
        )
        assert cap - 6 <= spent <= cap, (spent, cap)  # stopped before the cap
        assert processes_under(Path(good.workdir)) == []

        report = json.loads(cli("market", "cost", "--task", task, "--state-dir", str(state),
                                "--json").stdout)  # fmt: skip
        assert report["spent_usd"] == pytest.approx(spent, abs=0.05)
        assert {r["node"].split("-")[0] for r in report["nodes"]} == {"ssh"}

        # the budget is spent: no launch starts, with the same budget or none given
        for again in (("--budget-usd", str(cap)), ()):
            cp = cli("market", "launch", *common, *again)
            assert cp.returncode == 1 and "budget is spent" in cp.stderr, cp.stderr
    finally:
        server.stop()
        if master is not None:
            master.kill()
            master.wait(10)
        kill_under(tmp_path)


@pytest.mark.timeout(180)
def test_a_cloud_launch_that_never_becomes_ready_falls_over_and_keys_stay_secret(
    tmp_path: Path, coordinator: Coordinator
) -> None:
    replay = vast_replay.Replay()
    replay.rate_limit_once = False
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(replay.app())
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        task = publish(
            tmp_path,
            coordinator.url,
            master="127.0.0.1:9",
            master_key=Identity.generate().public_hex,
        )
        state = tmp_path / "state"
        keyed = {"VAST_API_KEY": vast_replay.KEY, "COTRAIN_VAST_URL": f"http://127.0.0.1:{port}"}
        cp = cli(
            *("market", "launch", "--task", task, "--coordinator", coordinator.url),
            *("--provider", "vast", "--gpu", "H100", "--ready-timeout-s", "2"),
            *("--state-dir", str(state), "--no-watch"),
            extra_env=keyed,
        )
        assert cp.returncode == 1, cp.stdout + cp.stderr
        assert "not joined after 2 s" in cp.stderr, cp.stderr
        assert "0 of 1 node(s) joined" in cp.stderr, cp.stderr
        assert replay.instances == {}, "the machine that never joined was not terminated"
        deletes = [c for c in replay.calls if c[0] == "PUT"]
        assert deletes, replay.calls
        cp2 = cli("market", "status", "--task", task, "--state-dir", str(state), extra_env=keyed)
        assert "failed" in cp2.stdout, cp2.stdout + cp2.stderr
        written = "".join(
            p.read_text(errors="replace") for p in state.rglob("*") if p.is_file()
        )  # fmt: skip
        for text in (cp.stdout, cp.stderr, cp2.stdout, cp2.stderr, written):
            assert vast_replay.KEY not in text
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def test_launch_mistakes_are_one_line(tmp_path: Path, coordinator: Coordinator) -> None:
    state = ("--state-dir", str(tmp_path / "state"))
    for args, want in [
        ((), "--task: which task"),
        (("--task", "t999", "--coordinator", coordinator.url), "no task t999 at"),
        (("--task", "t1", "--coordinator", "http://127.0.0.1:9"), "cannot reach the coordinator"),
        (("--task", "t1", "x:y", "--cheapest"), "not both"),
        (("--task", "t1", "--secure", "--community"), "exclude each other"),
    ]:
        cp = cli("market", "launch", *args, *state)
        assert cp.returncode == 2, (args, cp.stdout, cp.stderr)
        assert want in cp.stderr and "Traceback" not in cp.stderr, cp.stderr
    for cmd in ("status", "cost", "terminate", "watch"):
        cp = cli("market", cmd, "--task", "t5", *state)
        assert cp.returncode == 2 and "no launch for task t5" in cp.stderr, (cmd, cp.stderr)


@pytest.mark.timeout(180)
def test_a_node_on_a_machine_that_is_not_what_was_offered_is_terminated(
    tmp_path: Path, coordinator: Coordinator
) -> None:
    """The node registers what it runs on; a machine with fewer GPUs than its offer promised
    is reported, terminated, and the slot falls over to the next offer."""
    from cotrain.market.launcher import Launcher, Ledger
    from cotrain.market.local import LocalProvider
    from cotrain.market.offers import OfferQuery
    from cotrain.market.provider import LaunchSpec, ProviderError

    port = free_port()
    task = publish(
        tmp_path, coordinator.url, master=f"127.0.0.1:{port}", master_key=master_key(tmp_path),
        **{"world": 1, "total_steps": 100_000, "checkpoint": "none", "save_model": False},
    )  # fmt: skip
    master = start_master(tmp_path, coordinator, task, port)
    lines: list[str] = []

    async def main() -> None:
        local = LocalProvider(tmp_path / "local")
        [real] = await local.offers(OfferQuery())
        fake = real.model_copy(update={"offer_id": "local:8xH100", "gpu": "H100_80GB",
                                       "gpu_count": 8, "gpu_mem_gb": 80.0})  # fmt: skip
        ln = Launcher({"local": local}, Ledger(tmp_path / "state"), say=lines.append, poll_s=0.2)
        spec = LaunchSpec(coordinator=coordinator.url, task=task)
        rec = await ln.launch(spec, [fake, real], count=1)
        [failure] = rec.failures
        assert failure["offer_id"] == "local:8xH100"
        assert "reports 0 GPU(s), the offer promised 8" in failure["why"], lines
        states = {i.instance_id: i.state for i in await local.instances()}
        assert sorted(states.values()) == ["running", "terminated"], states
        await ln.terminate(task)
        with pytest.raises(ProviderError, match="0 of 1 node"):
            await ln.launch(spec, [fake], count=1)
        assert {i.state for i in await local.instances()} == {"terminated"}

    try:
        asyncio.run(asyncio.wait_for(main(), 150))
    finally:
        master.kill()
        master.wait(10)
        kill_under(tmp_path)


def test_the_budget_counts_every_node_and_cannot_be_dodged(tmp_path: Path) -> None:
    """A machine type launched N times costs N times; leaving out --budget-usd keeps the
    task's budget; once the watchdog stopped a task only a larger budget launches again."""
    from cotrain.market.launcher import BudgetExceeded, Launcher, Ledger
    from cotrain.market.local import LocalProvider
    from cotrain.market.offers import Offer

    def offer(oid: str, rate: float) -> Offer:
        return Offer(provider="local", offer_id=oid, gpu="cpu", gpu_count=0, gpu_mem_gb=0,
                     usd_per_hour=rate, usd_per_gpu_hour=rate)  # fmt: skip

    ln = Launcher({"local": LocalProvider(tmp_path / "local")}, Ledger(tmp_path / "state"))
    two = offer("a", 2.0)
    with pytest.raises(BudgetExceeded, match=r"4 node\(s\) at \$8.00/h for 5 h cost \$40.00"):
        ln.check_budget("t1", [two], 4, 10.0, 5.0)  # four of one type, not one
    assert ln.check_budget("t1", [two], 1, 10.0, 5.0) == 10.0
    with ln.ledger.update("t1", "http://c") as rec:
        rec.budget_usd, rec.stopped = 10.0, "budget"
    with pytest.raises(BudgetExceeded, match="its budget is spent"):
        ln.check_budget("t1", [two], 1, None, None)  # no --budget-usd: the task's own applies
    with pytest.raises(BudgetExceeded, match="its budget is spent"):
        ln.check_budget("t1", [two], 1, 10.0, None)
    assert ln.check_budget("t1", [two], 1, 20.0, None) == 20.0  # raised: allowed again
