"""Checkpoint delivery: cotrain.shardcast vs plain HTTP from the origin vs PyPI shardcast 0.3.2.

    python bench/shardcast.py --quick       # < 2 min: 32 MB, netns (loopback without root)
    nice python bench/shardcast.py --json bench/out/shardcast.json   # 1 GB, as issue 4 asks

1 origin, 2 relays, 8 clients, one safetensors checkpoint of random weights. The clock starts
when the checkpoint file is handed to the system (cotrain: ``publish``; shardcast: its
``broadcast``; direct: the file appears in the served directory) with every server and client
already running and waiting, and stops when the last client holds a file whose SHA-256 matches.
Each system publishes its own way (cotrain and shardcast cut and hash shards on the critical
path; direct does nothing), and every client checks what it got; the benchmark checks every
output file again (``corrupt_files``).

Setups: ``loopback`` (every process on 127.0.0.1; this machine's cores are the limit) and
``netns`` (cotrain.netem: 11 hosts, each link 200 Mbit/s both ways, 10 ms added by a delay proxy
in front of every server; the network is the limit). Systems, arranged the same way (relays
mirror the origin, clients download from the relays):

- ``cotrain``: ``cotrain shardcast origin|relay|fetch`` (long-poll, parallel verified shards;
  relays stream each shard on while it still arrives: ``--relay-forward`` picks that or store
  and forward of whole verified shards);
- ``direct``: all clients GET the file from the origin over plain HTTP (aiohttp, sendfile);
- ``shardcast_pkg``: PyPI ``shardcast`` 0.3.2 (benchmark-only dependency; its servers are bound
  to the test addresses, its middle nodes check upstream every second instead of every 30 s,
  and each client gets a private temp path, as separate machines would have).

Clients use the relays only (the origin's uplink feeds the relays), for both relay systems;
``--clients-use-origin`` adds the origin to every client's servers, for both alike. Capacity
bounds in the netns setup (1 GB, 8 clients, 200 Mbit/s = 25 MB/s per link, about 24 MB/s of
it payload): direct is 8 GB through the origin's uplink, 320 s at best; through 2 relays it is
4 GB out of each relay's uplink, 160 s at best, reached only if relays forward bytes as they
arrive (store and forward of 50 MB shards leaves their uplinks idle until a whole shard is in).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import selectors
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# This file is named like the PyPI package it measures: keep its folder off the import path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent / "src"))

BENCH = str(Path(__file__).resolve())
CLI = [sys.executable, "-c", "from cotrain.cli import main; main()", "shardcast"]
LOG = ["--log-level", os.environ.get("BENCH_LOG_LEVEL", "warning")]
LOCAL = "127.0.0.1"


# ---- helpers -------------------------------------------------------------------------------------


def read_json_line(proc: subprocess.Popen[Any], timeout_s: float, what: str) -> dict[str, Any]:
    """The first stdout line of ``proc`` as JSON (servers announce their port this way)."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout=timeout_s):
        raise RuntimeError(f"{what} did not start within {timeout_s} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{what} exited before announcing itself (rc={proc.wait()})")
    return json.loads(line)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a live or zombie process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_checkpoint(path: Path, size_mb: float) -> str:
    """A safetensors file of random bf16/fp32 weights, about ``size_mb`` MB; returns its SHA-256."""
    if not path.exists():
        import torch
        from safetensors.torch import save_file

        g = torch.Generator().manual_seed(0)
        tensors: dict[str, torch.Tensor] = {}
        left = int(size_mb * 1e6)
        i = 0
        while left > 0:
            numel = min(left // 4, 16 << 20) or 1
            tensors[f"layers.{i}.weight"] = torch.randn(numel, generator=g, dtype=torch.float32)
            left -= numel * 4
            i += 1
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.rename(path)
    return sha256_file(path)


# ---- where processes run -------------------------------------------------------------------------


class Loopback:
    """Every host is this machine; servers are reached on 127.0.0.1."""

    name = "loopback"

    def spawn(self, host: int, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(argv, **kw)

    def url(self, host: int, port: int) -> str:
        return f"http://{LOCAL}:{port}"

    def get_json(self, host: int, port: int, path: str) -> Any:
        import urllib.request

        with urllib.request.urlopen(f"http://{LOCAL}:{port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def end_run(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


class Netns:
    """Hosts in network namespaces; each server is reached through a delay proxy on its host."""

    name = "netns"

    def __init__(self, n_hosts: int, rate_mbit: float, delay_ms: float) -> None:
        from cotrain.netem import WanNetwork

        self.net = WanNetwork(n_hosts=n_hosts, rate_mbit=rate_mbit)
        self.delay_ms = delay_ms
        self._proxies: list[Any] = []

    def spawn(self, host: int, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        return self.net.hosts[host].popen(argv, **kw)

    def url(self, host: int, port: int) -> str:
        h = self.net.hosts[host]
        proxy = h.start_delay_proxy(target=(LOCAL, port), delay_ms=self.delay_ms)
        self._proxies.append(proxy)
        return f"http://{h.ip}:{proxy.port}"

    def get_json(self, host: int, port: int, path: str) -> Any:
        """GET a server's local URL from inside its host (the benchmark is outside the WAN)."""
        url = f"http://{LOCAL}:{port}{path}"
        return json.loads(self.net.hosts[host].run(["curl", "-sf", url], check=True).stdout)

    def end_run(self) -> float:
        """Stop this run's proxies; return the CPU time they used."""
        cpu = sum(cpu_seconds(p.process.pid) for p in self._proxies)
        for p in self._proxies:
            p.stop()
        self._proxies.clear()
        return cpu

    def close(self) -> None:
        self.end_run()
        self.net.close()


# ---- one run -------------------------------------------------------------------------------------


@dataclass
class Row:
    system: str
    setup: str
    clients: int
    size_mb: float
    shard_size_mb: float
    seconds_to_last_client: float | None
    clients_ok: int
    corrupt_files: int
    client_seconds: list[float | None] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    note: str = ""
    ratio_vs_direct: float | None = None
    ratio_vs_shardcast_pkg: float | None = None


class Run:
    """Processes of one (system, setup) run; stops them all at the end."""

    def __init__(self, topo: Any, work: Path, args: argparse.Namespace) -> None:
        self.topo, self.work, self.args = topo, work, args
        self.procs: list[subprocess.Popen[Any]] = []
        self.logs: list[Any] = []
        self.cpu_s = {"clients": 0.0, "servers": 0.0, "proxies": 0.0}
        self.local: dict[str, tuple[int, int]] = {}  # server url -> (host, port on that host)
        work.mkdir(parents=True, exist_ok=True)

    def spawn(self, host: int, name: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115
        self.logs.append(log)
        kw.setdefault("stdout", subprocess.PIPE)
        env = {**os.environ, "SHARDCAST_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
        p = self.topo.spawn(host, argv, stderr=log, env=env, **kw)
        self.procs.append(p)
        return p

    def server(self, host: int, name: str, argv: list[str], **kw: Any) -> str:
        p = self.spawn(host, name, argv, **kw)
        info = read_json_line(p, 60.0, name)
        port = info["port"] if "port" in info else int(info["url"].rsplit(":", 1)[1])
        url = self.topo.url(host, port)
        self.local[url] = (host, port)
        return url

    def settle(self, servers: list[str], path: str = "/v1/health") -> str:
        """Start the clock only once every client is up and waiting at every server it uses.

        Client processes take a second or more of CPU to start (imports); counting that would
        measure Python's start-up on a busy machine, not delivery.
        """
        deadline = time.monotonic() + 120
        waiting: list[int] = []
        while time.monotonic() < deadline:
            waiting = [self.topo.get_json(*self.local[u], path)["waiting"] for u in servers]
            if min(waiting) >= self.args.clients:
                break
            time.sleep(0.2)
        time.sleep(0.5)
        return "" if min(waiting) >= self.args.clients else f"only {waiting} clients waiting"

    def wait_clients(self, clients: list[subprocess.Popen[Any]], t0: float) -> list[float | None]:
        ends: list[float | None] = [None] * len(clients)

        deadline = t0 + self.args.timeout_s

        def watch(i: int, p: subprocess.Popen[Any]) -> None:
            # wait4 rather than wait: it also tells how much CPU the client used.
            while time.monotonic() < deadline:
                pid, status, usage = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    p.returncode = os.waitstatus_to_exitcode(status)
                    self.cpu_s["clients"] += usage.ru_utime + usage.ru_stime
                    if p.returncode == 0:
                        ends[i] = time.monotonic() - t0
                    return
                time.sleep(0.01)

        threads = [threading.Thread(target=watch, args=(i, p)) for i, p in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return ends

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                self.cpu_s["servers"] += cpu_seconds(p.pid)
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            if p.stdout is not None:
                p.stdout.close()
            if p.stdin is not None:
                p.stdin.close()
        for log in self.logs:
            log.close()
        self.cpu_s["proxies"] += self.topo.end_run()


def finish(
    system: str, run: Run, outs: list[Path], ends: list[float | None], sha: str, note: str = ""
) -> Row:
    a = run.args
    corrupt = ok = 0
    for out, end in zip(outs, ends, strict=True):
        if out.exists():
            if sha256_file(out) != sha:
                corrupt += 1
            elif end is not None:
                ok += 1
    done = [e for e in ends if e is not None]
    last = max(done) if done and ok == len(outs) else None
    return Row(
        system,
        run.topo.name,
        a.clients,
        a.size_mb,
        a.shard_size_mb,
        last,
        ok,
        corrupt,
        client_seconds=[round(e, 2) if e is not None else None for e in ends],
        note=note,
    )


def keep_logs(work: Path) -> None:
    """Delete a run's data (gigabytes) but keep its logs for a post-mortem."""
    for p in work.iterdir():
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.suffix != ".log":
            p.unlink()


def clients_hosts(a: argparse.Namespace) -> list[int]:
    return [1 + a.relays + c for c in range(a.clients)]


def run_cotrain(run: Run, ckpt: Path, sha: str) -> Row:
    from cotrain.core.identity import Identity
    from cotrain.shardcast import PublishConfig, publish

    a, w = run.args, run.work
    ident = Identity.generate()
    bind = ["--port", "0", "--host", LOCAL]
    origin = run.server(0, "origin", [*CLI, "origin", "--dir", str(w / "origin"), *bind])
    relays = [
        run.server(
            r,
            f"relay{r}",
            [
                *CLI,
                "relay",
                "--upstream",
                origin,
                "--dir",
                str(w / f"relay{r}"),
                "--publisher-key",
                ident.public_hex,
                *bind,
                *LOG,
                *(
                    []
                    if a.relay_parallel is None
                    else ["--set", f"transfer.parallel_downloads={a.relay_parallel}"]
                ),
                *([] if a.relay_forward is None else ["--set", f"forward={a.relay_forward}"]),
            ],
        )
        for r in range(1, a.relays + 1)
    ]
    used = relays + ([origin] if a.clients_use_origin else [])
    servers = ",".join(used)
    outs = [w / f"client{c}" / "ckpt.safetensors" for c in range(a.clients)]
    clients = [
        run.spawn(
            h,
            f"client{c}",
            [
                *CLI,
                "fetch",
                "--servers",
                servers,
                "--out",
                str(outs[c]),
                "--publisher-key",
                ident.public_hex,
                "--wait-s",
                "600",
                "--set",
                f"timeout_s={a.timeout_s}",
                *LOG,
            ],
        )
        for c, h in enumerate(clients_hosts(a))
    ]
    note = run.settle(used)
    t0 = time.monotonic()
    publish(
        ckpt,
        dir=w / "origin",
        identity=ident,
        config=PublishConfig(shard_size_mb=a.shard_size_mb, file_mode="link"),
    )
    publish_s = time.monotonic() - t0
    ends = run.wait_clients(clients, t0)
    return finish("cotrain", run, outs, ends, sha, f"publish {publish_s:.1f} s {note}".strip())


def run_direct(run: Run, ckpt: Path, sha: str) -> Row:
    a, w = run.args, run.work
    served = w / "served"
    served.mkdir(parents=True)
    url = run.server(0, "origin", [sys.executable, BENCH, "_direct-server", "--dir", str(served)])
    outs = [w / f"client{c}" / "ckpt.safetensors" for c in range(a.clients)]
    clients = [
        run.spawn(
            h,
            f"client{c}",
            [
                sys.executable,
                BENCH,
                "_direct-client",
                "--url",
                f"{url}/ckpt",
                "--out",
                str(outs[c]),
                "--sha",
                sha,
            ],
        )
        for c, h in enumerate(clients_hosts(a))
    ]
    note = run.settle([url], "/waiting")
    t0 = time.monotonic()
    os.link(ckpt, served / "ckpt.bin")  # the file appears at once
    ends = run.wait_clients(clients, t0)
    return finish("direct", run, outs, ends, sha, note)


def run_shardcast_pkg(run: Run, ckpt: Path, sha: str) -> Row:
    a, w = run.args, run.work
    py = [sys.executable, BENCH]
    origin_p = run.spawn(
        0, "origin", [*py, "_pkg-origin", "--dir", str(w / "origin")], stdin=subprocess.PIPE
    )
    origin = run.topo.url(0, read_json_line(origin_p, 60.0, "origin")["port"])
    relays = [
        run.server(
            r, f"relay{r}", [*py, "_pkg-relay", "--upstream", origin, "--dir", str(w / f"relay{r}")]
        )
        for r in range(1, a.relays + 1)
    ]
    servers = ",".join(relays + ([origin] if a.clients_use_origin else []))
    outs = [w / f"client{c}" / "ckpt.safetensors" for c in range(a.clients)]
    clients = []
    for c, h in enumerate(clients_hosts(a)):
        # One at a time: the package probes every server through one fixed /tmp path.
        p = run.spawn(
            h,
            f"client{c}",
            [
                *py,
                "_pkg-client",
                "--servers",
                servers,
                "--dir",
                str(w / f"client{c}"),
                "--out",
                str(outs[c]),
            ],
        )
        read_json_line(p, 60.0, f"client{c}")
        clients.append(p)
    time.sleep(0.5)  # every client announced itself after probing the servers
    t0 = time.monotonic()
    assert origin_p.stdin is not None
    origin_p.stdin.write(f"{ckpt} {int(a.shard_size_mb * 1e6)}\n".encode())
    origin_p.stdin.flush()
    ends = run.wait_clients(clients, t0)
    return finish("shardcast_pkg", run, outs, ends, sha)


SYSTEMS: dict[str, Callable[[Run, Path, str], Row]] = {
    "cotrain": run_cotrain,
    "direct": run_direct,
    "shardcast_pkg": run_shardcast_pkg,
}


# ---- roles run as subprocesses -------------------------------------------------------------------


def role_direct_server(args: argparse.Namespace) -> None:
    """Plain HTTP: GET /ckpt waits for the file to appear, then sends it (sendfile)."""
    import asyncio

    from aiohttp import web

    path = Path(args.dir) / "ckpt.bin"
    waiting = 0

    async def ckpt(request: web.Request) -> web.StreamResponse:
        nonlocal waiting
        deadline = time.monotonic() + 900
        waiting += 1
        while not path.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        waiting -= 1
        return web.FileResponse(path)

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"waiting": waiting})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/ckpt", ckpt)
        app.router.add_get("/waiting", count)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, LOCAL, 0, backlog=1024)
        await site.start()
        print(json.dumps({"port": runner.addresses[0][1]}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def role_direct_client(args: argparse.Namespace) -> None:
    """GET the file, hashing as it streams; keep it only if the hash matches."""
    import asyncio

    import aiohttp

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")

    async def main() -> bool:
        h = hashlib.sha256()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with (
            aiohttp.ClientSession(timeout=timeout, read_bufsize=1 << 20) as s,
            s.get(args.url) as resp,
        ):
            resp.raise_for_status()
            with open(part, "wb") as f:
                async for chunk in resp.content.iter_any():
                    h.update(chunk)
                    f.write(chunk)
        if h.hexdigest() != args.sha:
            part.unlink()
            return False
        part.rename(out)
        return True

    sys.exit(0 if asyncio.run(main()) else 1)


def _bind_pkg_servers_to_localhost() -> None:
    """shardcast 0.3.2 binds 0.0.0.0; bind to the test address instead (behind the proxy)."""
    import shardcast.server as pkg_server

    base = pkg_server.ShardcastServer

    class Bound(base):  # type: ignore[misc, valid-type]
        def __init__(self, address: tuple[str, int], *rest: Any, **kw: Any) -> None:
            super().__init__((LOCAL, address[1]), *rest, **kw)

    pkg_server.ShardcastServer = Bound  # type: ignore[misc]


def _probe_file(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "data1.bin").write_bytes(b"x" * 1024)  # its clients probe every server for this file


def role_pkg_origin(args: argparse.Namespace) -> None:
    _bind_pkg_servers_to_localhost()
    from shardcast import OriginServer

    _probe_file(Path(args.dir))
    origin = OriginServer(args.dir, port=0)
    print(json.dumps({"port": origin.http_server.server_address[1]}), flush=True)
    line = sys.stdin.readline().split()  # "<file> <shard bytes>" starts the clock
    origin.broadcast(line[0], int(line[1]))
    sys.stdin.read()  # serve until the benchmark closes stdin or terminates us


def role_pkg_relay(args: argparse.Namespace) -> None:
    _bind_pkg_servers_to_localhost()
    from shardcast import MiddleNode

    _probe_file(Path(args.dir))
    node = MiddleNode([args.upstream], args.dir, port=0, check_interval=1)
    print(json.dumps({"port": node.http_server.server_address[1]}), flush=True)
    threading.Event().wait()


def role_pkg_client(args: argparse.Namespace) -> None:
    import shardcast.client as pkg_client

    # Its distribution file goes next to the package (shared by all processes of a machine);
    # give this client a private one, as a separate machine would have.
    pkg_client.__file__ = str(Path(args.dir) / "pkg" / "client.py")
    from shardcast import ClientNode

    node = ClientNode(args.servers.split(","), output_dir=args.dir)
    print(json.dumps({"ready": True}), flush=True)
    while "v1" not in node.list_available_versions():
        time.sleep(0.25)
    # download_version gives up (returns None) when a listing times out on a busy server; a
    # caller would try again, so we do (the benchmark's deadline still applies).
    while not node.download_version("v1", args.out):
        time.sleep(1.0)


ROLES = {
    "_direct-server": role_direct_server,
    "_direct-client": role_direct_client,
    "_pkg-origin": role_pkg_origin,
    "_pkg-relay": role_pkg_relay,
    "_pkg-client": role_pkg_client,
}


def run_role(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    for flag in ("--dir", "--url", "--out", "--sha", "--upstream", "--servers"):
        p.add_argument(flag)
    ROLES[argv[0]](p.parse_args(argv[1:]))


# ---- main ----------------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="time until the last client holds the verified checkpoint")
    for col in (
        "setup",
        "system",
        "MB",
        "s to last",
        "x direct",
        "x shardcast",
        "ok",
        "corrupt",
        "CPU s",
        "note",
    ):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r.setup,
            r.system,
            f"{r.size_mb:g}",
            "DNF" if r.seconds_to_last_client is None else f"{r.seconds_to_last_client:.1f}",
            _fmt(r.ratio_vs_direct),
            _fmt(r.ratio_vs_shardcast_pkg),
            f"{r.clients_ok}/{r.clients}",
            str(r.corrupt_files),
            f"{sum(r.cpu_s.values()):.0f}",
            r.note,
        )
    Console().print(t)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ROLES:
        run_role(sys.argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 MB checkpoint, 2 MB shards")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--size-mb", type=float, default=None, help="checkpoint size (1000)")
    ap.add_argument("--shard-size-mb", type=float, default=None, help="shard size (50)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--relays", type=int, default=2)
    ap.add_argument("--setups", default=None, help="loopback,netns (quick: netns, else loopback)")
    ap.add_argument("--systems", default="cotrain,direct,shardcast_pkg")
    ap.add_argument("--rate-mbit", type=float, default=200.0, help="netns link rate")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="netns added latency")
    ap.add_argument(
        "--clients-use-origin",
        action="store_true",
        help="clients also download from the origin (all systems)",
    )
    ap.add_argument("--relay-parallel", type=int, default=None, help="shards a relay pulls at once")
    ap.add_argument(
        "--relay-forward",
        choices=["cut_through", "verified_shards"],
        default=None,
        help="cotrain relays: stream shards on as they arrive (default) or only once verified",
    )
    ap.add_argument("--timeout-s", type=float, default=None, help="per run (600; quick 45)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cotrain-bench-shardcast"))
    args = ap.parse_args()
    # Quick: 16 shards or more, since shardcast 0.3.2 clients can hang below 10 (when a listing
    # fails they probe shards 1..10 and retry a missing one forever).
    args.size_mb = args.size_mb or (32.0 if args.quick else 1000.0)
    args.shard_size_mb = args.shard_size_mb or (2.0 if args.quick else 50.0)
    args.timeout_s = args.timeout_s or (45.0 if args.quick else 600.0)

    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / f"ckpt-{args.size_mb:g}MB.safetensors"
    sha = make_checkpoint(ckpt, args.size_mb)
    args.size_mb = round(ckpt.stat().st_size / 1e6, 1)
    if args.setups is None:
        from cotrain.netem import netns_unavailable_reason

        netns = netns_unavailable_reason() is None
        args.setups = ("netns" if netns else "loopback") if args.quick else "loopback,netns"
    rows: list[Row] = []
    for setup in args.setups.split(","):
        if setup == "netns":
            from cotrain.netem import netns_unavailable_reason

            reason = netns_unavailable_reason()
            if reason is not None:
                print(f"skipping netns: {reason}", file=sys.stderr)
                continue
            topo: Any = Netns(1 + args.relays + args.clients, args.rate_mbit, args.delay_ms)
        else:
            topo = Loopback()
        try:
            for system in args.systems.split(","):
                work = args.workdir / f"{setup}-{system}"
                shutil.rmtree(work, ignore_errors=True)
                run = Run(topo, work, args)
                try:
                    row = SYSTEMS[system](run, ckpt, sha)
                except (RuntimeError, OSError) as e:  # a system that cannot even start: DNF
                    row = Row(
                        system,
                        setup,
                        args.clients,
                        args.size_mb,
                        args.shard_size_mb,
                        None,
                        0,
                        0,
                        note=f"failed: {e}",
                    )
                finally:
                    run.close()
                    keep_logs(run.work)
                row.cpu_s = {k: round(v, 1) for k, v in run.cpu_s.items()}
                rows.append(row)
                print(json.dumps(asdict(row)), file=sys.stderr, flush=True)
        finally:
            topo.close()
    for r in rows:  # ratios within the same setup
        base = {x.system: x.seconds_to_last_client for x in rows if x.setup == r.setup}
        for other in ("direct", "shardcast_pkg"):
            mine, theirs = r.seconds_to_last_client, base.get(other)
            if mine and theirs and other != r.system:
                setattr(r, f"ratio_vs_{other}", round(mine / theirs, 3))
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
