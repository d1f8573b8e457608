"""``cotrain market offers`` across every provider: how fast, cold and from the cache.

    python bench/market.py --quick            # one round
    python bench/market.py --json market.json  # five rounds, 150 ms per API answer

The seven clouds' APIs are their replay servers (``tests/harness/market_replays``: responses
written from each provider's API documentation, with their pagination and a 429 on the first
call), each answer delayed by --latency-ms as an API across the internet would be; the local
machine and, where ``sshd`` can run here (root, openssh-server), one SSH host on loopback.

Measured, each round, as a user would see it (a new ``cotrain`` process each time):
- ``cold_s``: ``cotrain market offers --json --refresh`` with an empty cache (every provider
  asked, concurrently);
- ``warm_s``: the same command again, served from the cache (60 s);
- the baseline in the same run, in-process: the same providers asked one after another
  (``sequential_s``), as a loop over provider CLIs would, against asking them at once
  (``concurrent_s``).

Printed: a table; written (``--json``): ``rounds`` [{``providers``, ``offers``, ``cold_s``,
``warm_s``, ``concurrent_s``, ``sequential_s``}] and ``summary`` (medians, and
``sequential_over_concurrent``). Targets (issue 14): >= 7 providers, warm < 1 s, cold < 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "harness"))
from market_harness import Replays


def _cli(args: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    cp = subprocess.run(
        [sys.executable, "-m", "cotrain", "market", "offers", "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    took = time.perf_counter() - t0
    if cp.returncode != 0:
        raise SystemExit(f"cotrain market offers failed: {cp.stderr[-500:]}")
    return took, json.loads(cp.stdout)


def _ssh_host(tmp: Path) -> tuple[Any, Path | None]:
    if os.geteuid() != 0 or not Path("/usr/sbin/sshd").exists():
        return None, None
    from sshd_harness import SshServer, hosts_toml

    s = SshServer.start(tmp, "bench")
    f = tmp / "hosts.toml"
    f.write_text(hosts_toml([s.ssh_host(tmp, usd_per_hour=0.2)]))
    return s, f


async def _in_process(env: dict[str, str], state: Path, hosts: Path | None) -> tuple[float, float]:
    from cotrain.market.offers import OfferQuery
    from cotrain.market.registry import configured

    old = dict(os.environ)
    os.environ.update(env)
    try:
        providers = list(configured(state, hosts_file=hosts).values())
    finally:
        os.environ.clear()
        os.environ.update(old)
    q = OfferQuery()
    t0 = time.perf_counter()
    for p in providers:
        await p.offers(q)
    sequential = time.perf_counter() - t0
    t0 = time.perf_counter()
    await asyncio.gather(*(p.offers(q) for p in providers))
    return time.perf_counter() - t0, sequential


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--latency-ms", type=float, default=150.0, help="added to each API answer")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    rounds = 1 if args.quick else args.rounds
    rows = []
    with tempfile.TemporaryDirectory(prefix="cotrain-bench-market-") as d, Replays(
        args.latency_ms / 1000
    ) as replays:  # fmt: skip
        tmp = Path(d)
        server, hosts = _ssh_host(tmp)
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("COTRAIN_")}
            env.update(replays.env)
            extra = ["--hosts", str(hosts or tmp / "no-hosts.toml")]
            for i in range(rounds):
                state = tmp / f"state-{i}"
                for r in replays.replays.values():
                    r.rate_limit_once = True  # every cold round meets the 429 once
                cold, got = _cli(["--refresh", "--state-dir", str(state), *extra], env)
                warm, again = _cli(["--state-dir", str(state), *extra], env)
                assert len(again["offers"]) == len(got["offers"])
                for r in replays.replays.values():
                    r.rate_limit_once = False
                concurrent, sequential = asyncio.run(_in_process(env, tmp / f"inproc-{i}", hosts))
                failed = [s["provider"] for s in got["sources"] if s["error"]]
                if failed:
                    raise SystemExit(f"providers failed: {failed}: {got['sources']}")
                rows.append(
                    {
                        "providers": len({s["provider"] for s in got["sources"]}),
                        "offers": len(got["offers"]),
                        "cold_s": round(cold, 3),
                        "warm_s": round(warm, 3),
                        "concurrent_s": round(concurrent, 3),
                        "sequential_s": round(sequential, 3),
                    }
                )
        finally:
            if server is not None:
                server.stop()
    summary = {
        k: statistics.median(r[k] for r in rows)
        for k in ("providers", "offers", "cold_s", "warm_s", "concurrent_s", "sequential_s")
    }
    summary["sequential_over_concurrent"] = round(
        summary["sequential_s"] / summary["concurrent_s"], 2
    )
    summary["latency_ms"] = args.latency_ms
    t = Table(title=f"cotrain market offers ({args.latency_ms:g} ms per API answer)")
    for col in rows[0]:
        t.add_column(col)
    for r in rows:
        t.add_row(*(str(v) for v in r.values()))
    Console().print(t)
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"rounds": rows, "summary": summary}, indent=1))
    ok = summary["providers"] >= 7 and summary["warm_s"] < 1 and summary["cold_s"] < 5
    print("targets (>= 7 providers, warm < 1 s, cold < 5 s):", "met" if ok else "MISSED")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
