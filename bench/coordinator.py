"""Signed work submissions against the coordinator: throughput, latency, and the audit.

    python bench/coordinator.py --quick            # a few seconds per database
    python bench/coordinator.py --json coord.json  # 45 s of load per database (>= 10^5 entries)
    python bench/coordinator.py --soak-s 600       # also: memory over 10 minutes of load

For each database (SQLite, then PostgreSQL when a throwaway cluster can start here: root and
the postgresql package), a real ``cotrain coordinator`` process serves one open task with
--nodes registered members. Requests are signed beforehand (ed25519 over method, path, body
hash, time and nonce, each nonce once) and replayed by ``wrk`` (apt-get install wrk: a Python
client cannot saturate the server) over --connections connections; every answer that is not
200 counts as an error. Then ``cotrain audit`` fetches and replays the whole ledger.

The baseline in the same run: the same coordinator answering ``GET /v1/status`` (no signature,
no ledger, no database), which bounds what the HTTP stack alone gives on this machine.

Printed: a table; written (``--json``): ``rows`` [{``db``, ``submissions_per_s``, ``p50_ms``,
``p99_ms``, ``errors``, ``ledger_entries``, ``audit_s``, ``baseline_status_per_s``}] and, with
--soak-s, ``soak`` {``db``, ``seconds``, ``submissions``, ``rss_mb`` (samples),
``growth_mb``}. Targets (issue 13): >= 2,000 submissions/s with p99 < 50 ms on SQLite; audit of
10^5 entries < 30 s; growth < 50 MB over a 10-minute soak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cotrain.core.identity import Identity
from cotrain.core.signed import canonical
from cotrain.protocol import auth
from cotrain.protocol.client import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "harness"))
from pg_harness import Unavailable, postgres_cluster

LUA = r"""
-- Replays pre-signed requests, each once; thread i takes lines i, i+T, i+2T, ...
local threads = {}
local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end
function init(args)
  reqs = {}
  local n = 0
  local nthreads = tonumber(args[2])
  for line in io.lines(args[1]) do
    if n % nthreads == tid then
      local path, key, ts, nonce, sig, body =
        line:match("^(%S+)\t(%S+)\t(%S+)\t(%S+)\t(%S+)\t(.*)$")
      table.insert(reqs, wrk.format("POST", path, {
        ["X-Cotrain-Key"] = key, ["X-Cotrain-Time"] = ts, ["X-Cotrain-Nonce"] = nonce,
        ["X-Cotrain-Signature"] = sig, ["Content-Type"] = "application/json"}, body))
    end
    n = n + 1
  end
  idx = 0
  bad = 0
  spare = wrk.format("GET", "/v1/status")
end
function request()
  idx = idx + 1
  if idx > #reqs then return spare end
  return reqs[idx]
end
function response(status, headers, body)
  if status ~= 200 then
    bad = bad + 1
    if bad <= 3 then io.stderr:write("non-200: " .. status .. " " .. body .. "\n") end
  end
end
function done(summary, latency, requests)
  local b = 0
  for _, t in ipairs(threads) do b = b + (t:get("bad") or 0) end
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "bad": %d, ' ..
    '"socket_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), b,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""

STATUS_LUA = r"""
function done(summary, latency, requests)
  io.write(string.format('{"requests": %d, "duration_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, latency:percentile(99)))
end
"""


class Server:
    """A ``cotrain coordinator`` process."""

    def __init__(self, db: str, workdir: Path, extra: list[str]) -> None:
        cmd = [
            sys.executable,
            "-m",
            "cotrain",
            "coordinator",
            "--port",
            "0",
            "--db",
            db,
            "--key",
            str(workdir / "coord.pem"),
            *extra,
        ]
        with open(workdir / "coordinator.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the coordinator did not start: see {workdir / 'coordinator.log'}")
        ready = json.loads(line)
        self.url, self.pid = ready["url"], ready["pid"]

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def setup_task(url: str, nodes: int) -> tuple[str, list[Identity]]:
    """One initiator, an open task, ``nodes`` registered members."""
    initiator = Identity.generate()
    async with Client(url, initiator) as c:
        await c.register(["initiator"], "bench-initiator")
        task = (
            await c.write(
                "/v1/tasks",
                {
                    "name": "bench",
                    "kind": "rl",
                    "budget": 10**15,
                    "rate_per_unit": 1,
                    "admission": "open",
                    "weights": {"rollout_tokens": 1},
                },
            )
        )["task"]
        await c.write(f"/v1/tasks/{task}/open")
    members = [Identity.generate() for _ in range(nodes)]

    async def enrol(ident: Identity, i: int) -> None:
        async with Client(url, ident) as c:
            await c.register(["node"], f"bench-node-{i}")
            await c.write(f"/v1/tasks/{task}/join", {})

    await asyncio.gather(*(enrol(m, i) for i, m in enumerate(members)))
    return task, members


def sign_requests(path: Path, task: str, members: list[Identity], n: int, start: int) -> None:
    """``n`` signed work submissions, one per line, for the Lua script."""
    lines = []
    for i in range(start, start + n):
        ident = members[i % len(members)]
        body = {
            "work_key": os.urandom(32).hex(),
            "kind": "rollout_tokens",
            "units": 512,
            "step": i // 1000,
            "meta": {},
        }
        req = auth.sign(ident, "POST", f"/v1/tasks/{task}/work", body)
        lines.append(
            "\t".join(
                [
                    req.path,
                    req.key,
                    str(req.ts_ms),
                    req.nonce,
                    req.sig,
                    canonical(req.body).decode(),
                ]
            )
        )
    path.write_text("\n".join(lines) + "\n")


def run_wrk(
    url: str, script: Path, args: list[str], *, connections: int, threads: int, seconds: float
) -> dict[str, Any]:
    cmd = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{seconds:.0f}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
        "--",
        *args,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            got = dict(json.loads(line))
            got["first_errors"] = [x for x in out.stderr.splitlines() if x.startswith("non-200")]
            return got
    raise SystemExit(f"wrk printed no result: {out.stdout[-500:]} {out.stderr[-500:]}")


def audit_seconds(url: str, workdir: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cotrain",
            "audit",
            url,
            "--cache",
            "",
            "--json",
            str(workdir / "audit.json"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    took = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"the audit failed: {out.stdout[-800:]} {out.stderr[-800:]}")
    return took, int(json.loads((workdir / "audit.json").read_text())["size"])


def measure(db_name: str, db: str, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"cotrain-bench-coord-{db_name}-"))
    extra = [
        "--rate_per_key",
        "1000000",
        "--burst_per_key",
        "1000000",
        # the requests are signed before the load starts (up to a minute of them, then sent
        # over up to a minute): a two-minute window lets the last ones pass the time check
        "--window_s",
        "120",
        "--ingest",
        str(args.ingest),
        # the members only submit, never heartbeat: keep them alive for the whole run
        *("--unhealthy_after_s", "86400", "--dead_after_s", "86400"),
    ]
    server = Server(db, workdir, extra)
    try:
        task, members = asyncio.run(setup_task(server.url, args.nodes))
        status = workdir / "status.lua"
        status.write_text(STATUS_LUA)
        base = run_wrk(
            server.url + "/v1/status",
            status,
            [],
            connections=args.connections,
            threads=args.threads,
            seconds=min(5, args.seconds),
        )
        n = int(args.seconds * args.max_rate)
        console.print(f"[{db_name}] signing {n} requests ...")
        reqs = workdir / "requests.tsv"
        sign_requests(reqs, task, members, n, 0)
        script = workdir / "submit.lua"
        script.write_text(LUA)
        console.print(f"[{db_name}] {args.seconds:.0f} s of load, {args.connections} connections")
        got = run_wrk(
            server.url,
            script,
            [str(reqs), str(args.threads)],
            connections=args.connections,
            threads=args.threads,
            seconds=args.seconds,
        )
        for line in got["first_errors"]:
            console.print(f"[yellow]{db_name}: {line[:300]}")
        served = min(got["requests"], n)
        if got["requests"] > n:
            console.print(f"[yellow]{db_name}: ran out of signed requests: raise --max-rate")
        rate = served / (got["duration_us"] / 1e6)
        console.print(f"[{db_name}] auditing the ledger ...")
        audit_s, entries = audit_seconds(server.url, workdir)
        row = {
            "db": db_name,
            "submissions_per_s": round(rate, 1),
            "p50_ms": got["p50_us"] / 1000,
            "p99_ms": got["p99_us"] / 1000,
            "errors": got["bad"] + got["socket_errors"],
            "ledger_entries": entries,
            "audit_s": round(audit_s, 2),
            "audit_entries_per_s": round(entries / audit_s, 1),
            "baseline_status_per_s": round(base["requests"] / (base["duration_us"] / 1e6), 1),
            "rss_mb": round(server.rss_mb(), 1),
            "ingest": args.ingest,
        }
        if args.soak_s and db_name == args.soak_db:
            row["soak"] = soak(server, task, members, args, workdir, console)
        return row
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def soak(
    server: Server,
    task: str,
    members: list[Identity],
    args: argparse.Namespace,
    workdir: Path,
    console: Console,
) -> dict[str, Any]:
    """Load in one-minute rounds (each with freshly signed requests); RSS after each."""
    rss = [server.rss_mb()]
    script = workdir / "submit.lua"
    total, t_end, start = 0, time.monotonic() + args.soak_s, 10**9
    while time.monotonic() < t_end:
        chunk = min(60.0, t_end - time.monotonic())
        if chunk < 5:
            break
        n = int(chunk * args.max_rate)
        reqs = workdir / "soak.tsv"
        sign_requests(reqs, task, members, n, start)
        start += n
        got = run_wrk(
            server.url,
            script,
            [str(reqs), str(args.threads)],
            connections=args.connections,
            threads=args.threads,
            seconds=chunk,
        )
        total += min(got["requests"], n)
        rss.append(server.rss_mb())
        console.print(f"  soak: {total} submissions, rss {rss[-1]:.0f} MB")
    return {
        "db": args.soak_db,
        "seconds": args.soak_s,
        "submissions": total,
        "rss_mb": [round(x, 1) for x in rss],
        "growth_mb": round(rss[-1] - rss[1], 1) if len(rss) > 1 else 0.0,
    }


@contextlib.contextmanager
def databases(console: Console, skip_pg: bool) -> Iterator[list[tuple[str, str]]]:
    """The databases to measure; each is removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="cotrain-bench-sqlite-"))
    dbs = [("sqlite", str(tmp / "c.db"))]
    try:
        if skip_pg:
            yield dbs
            return
        try:
            cluster = postgres_cluster()
            pg = cluster.__enter__()
        except Unavailable as e:
            console.print(f"[yellow]PostgreSQL skipped: {e}")
            yield dbs
            return
        try:
            yield [*dbs, ("postgresql", pg.create_database("bench"))]
        finally:
            cluster.__exit__(None, None, None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="5 s of load per database")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--seconds", type=float, default=45.0, help="load per database")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--nodes", type=int, default=64, help="members submitting work")
    p.add_argument(
        "--max-rate",
        type=float,
        default=6000.0,
        help="requests signed per second of load (more than the server can take)",
    )
    p.add_argument("--no-postgres", action="store_true")
    p.add_argument(
        "--ingest",
        type=int,
        default=0,
        help="ingest processes in front of the sequencer (coordinator --ingest); on 2 cores "
        "shared with wrk, 0 is faster (2273/s against 1988/s with 1)",
    )
    p.add_argument("--soak-s", type=float, default=0.0, help="then this long of load, RSS sampled")
    p.add_argument("--soak-db", default="sqlite")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.nodes = 5.0, 16
    if shutil.which("wrk") is None:
        print("error: this benchmark needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    console = Console(width=max(120, shutil.get_terminal_size().columns))
    rows = []
    with databases(console, args.no_postgres) as dbs:
        for name, url in dbs:
            rows.append(measure(name, url, args, console))
    table = Table(title="coordinator: signed work submissions (wrk)")
    for col in (
        "db",
        "submissions/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "entries",
        "audit s",
        "audit entries/s",
        "GET /v1/status/s (baseline)",
    ):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["db"],
            f"{r['submissions_per_s']:.0f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            str(r["errors"]),
            str(r["ledger_entries"]),
            f"{r['audit_s']:.1f}",
            f"{r['audit_entries_per_s']:.0f}",
            f"{r['baseline_status_per_s']:.0f}",
        )
    console.print(table)
    for r in rows:
        if "soak" in r:
            s = r["soak"]
            console.print(
                f"soak ({s['db']}, {s['seconds']:.0f} s, {s['submissions']} "
                f"submissions): RSS {s['rss_mb']} MB, growth {s['growth_mb']} MB"
            )
    if args.json:
        soak_rows = [r.pop("soak") for r in rows if "soak" in r]
        out: dict[str, Any] = {"rows": rows}
        if soak_rows:
            out["soak"] = soak_rows[0]
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
