"""``cotrain market launch --provider ssh --count 3`` against three real sshd hosts, each in its
own network namespace behind a shaped link (100 Mbit/s each way), as remote machines are.

The user's machine (namespace h0) runs the coordinator, the task's master and the market CLI;
the task admits by invite, and the launch mints one for each node with the initiator's key.
The hosts file lists the three hosts and a fourth, cheaper entry whose install fails: the
launch tries it first (cheapest), falls over to the next offer, and ends with three nodes that
installed cotrain into a venv on their host, passed their benchmark, joined the task on the
coordinator (each measured first: compute, its link both ways, round trips to the other hosts)
and train in one DiLoCo run (the master syncs three workers; each node submits its
pseudo-gradients as work). ``cotrain market terminate`` then leaves no process on any host
but its sshd.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from market_harness import Coordinator, cli, master_key, publish, start_master
from sshd_harness import SshServer, hosts_toml, kill_under, require_sshd

from cotrain.netem.netns import netns_pids, netns_unavailable_reason

pytestmark = pytest.mark.skipif(
    netns_unavailable_reason() is not None, reason=str(netns_unavailable_reason())
)


@pytest.mark.timeout(600)
def test_launch_three_ssh_hosts_that_join_a_diloco_run_then_terminate(tmp_path: Path) -> None:
    from cotrain.netem.network import WanNetwork

    require_sshd()
    servers: list[SshServer] = []
    procs = []
    with WanNetwork(n_hosts=4, rate_mbit=100) as net:
        h0 = net.hosts[0]
        try:
            servers = [SshServer.start(tmp_path, f"h{i}", host=net.hosts[i]) for i in (1, 2, 3)]
            coordinator = Coordinator.start(tmp_path, host=h0)
            procs.append(coordinator.proc)
            port = 29500
            mkey = master_key(tmp_path)
            task = publish(
                tmp_path, coordinator.url, master=f"{h0.ip}:{port}", master_key=mkey, host=h0,
                admission="invite",
                **{"world": 3, "total_steps": 4000, "algo.min_workers": 3,
                   "algo.min_workers_timeout_s": 300, "checkpoint": "none", "save_model": False,
                   "comm.heartbeat_interval_s": 0.3},
            )  # fmt: skip
            procs.append(start_master(tmp_path, coordinator, task, port, host=h0))
            hosts = [s.ssh_host(tmp_path, usd_per_hour=0.40, region="wan") for s in servers]
            bargain = servers[0].ssh_host(
                tmp_path, name="bargain", usd_per_hour=0.10, workdir=str(tmp_path / "bargain"),
                pip_args=["--no-index", "--find-links", str(tmp_path / "none"), "no-such-pkg"],
            )  # fmt: skip
            (tmp_path / "hosts.toml").write_text(hosts_toml([*hosts, bargain]))
            state = tmp_path / "state"
            common = ("--task", task, "--state-dir", str(state))
            common += ("--hosts", str(tmp_path / "hosts.toml"))

            t0 = time.monotonic()
            cp = cli(
                *("market", "launch", *common, "--coordinator", coordinator.url),
                *("--provider", "ssh", "--count", "3", "--json", "--no-watch"),
                *("--key", str(tmp_path / "init.pem")),  # an invite minted for each node
                host=h0,
                timeout_s=400,
            )
            launch_s = time.monotonic() - t0
            assert cp.returncode == 0, cp.stdout + cp.stderr
            rec = json.loads(cp.stdout)
            assert [f["offer_id"] for f in rec["failures"]] == ["bargain"], cp.stderr
            joined = {n["offer_id"]: n for n in rec["nodes"] if n["state"] == "joined"}
            assert set(joined) == {"h1", "h2", "h3"}, cp.stderr
            for line in ("installing cotrain", "measuring the link", "benchmarking", "joined"):
                assert line in cp.stderr, cp.stderr
            # measured before it counted: its compute, and its link, which the 100 Mbit/s
            # shaping shows (a blob over SFTP each way), and round trips to the other hosts
            for n in joined.values():
                m = n["measured"]
                assert m["gflops"] > 0 and m["rtt_ms"] is not None, m
                assert 2 < m["up_mbps"] < 120 and 2 < m["down_mbps"] < 120, m
                assert all(v is not None for v in m.get("peer_rtt_ms", {}).values()), m
            assert any(n["measured"].get("peer_rtt_ms") for n in joined.values()), joined

            # they train together: every node's work reaches the coordinator
            keys = {n["node_key"] for n in joined.values()}
            deadline = time.monotonic() + 240
            members: dict[str, dict[str, object]] = {}
            while time.monotonic() < deadline:
                st = cli("market", "status", *common, "--json", host=h0, timeout_s=60)
                assert st.returncode == 0, st.stderr
                members = json.loads(st.stdout)[0]["members"]
                if all(int(members.get(k, {}).get("submitted_units", 0)) > 0 for k in keys):
                    break
                time.sleep(1)
            assert all(int(members[k]["submitted_units"]) > 0 for k in keys), members
            events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
            rounds = [e for e in events if e.get("event") == "collective" and "keys" in e]
            assert any(len(e["keys"]) == 3 for e in rounds), rounds[-3:]

            cp = cli("market", "terminate", *common, host=h0, timeout_s=120)
            assert cp.returncode == 0 and "3 node(s) terminated" in cp.stdout, cp.stderr

            # nothing but sshd is left on any host
            for s, h in zip(servers, net.hosts[1:], strict=True):
                deadline = time.monotonic() + 20
                while True:
                    left = [p for p in netns_pids(h.name) if p != s.proc.pid]
                    if not left or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                cmds = [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left]
                assert left == [], (s.name, cmds)
            st = json.loads(cli("market", "status", *common, "--json", host=h0).stdout)[0]
            assert {n["state"] for n in st["nodes"] if n["offer_id"] != "bargain"} == {"terminated"}
            print(f"launch of 3 nodes (one fall-over) in {launch_s:.1f} s")
        finally:
            for s in servers:
                s.stop()
            for p in procs:
                p.kill()
                p.wait(10)
            kill_under(tmp_path)
