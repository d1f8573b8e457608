"""The ``ssh`` provider: machines you can log into, each running one ``cotrain node``.

The hosts are listed in a TOML file (``~/.config/cotrain/ssh-hosts.toml``)::

    [[host]]
    name = "box1"                        # its offer id
    address = "203.0.113.5"
    user = "ubuntu"                      # default: you
    identity = "~/.ssh/id_ed25519"       # the client key
    known_hosts = "~/.ssh/known_hosts"   # host keys are checked, always
    usd_per_hour = 1.10                  # what it costs you (0: your own, billing "owned")
    # port = 22, python = "python3", workdir = ".cotrain", region = "home",
    # pip_args = ["--index-url", "https://..."], env = {CUDA_VISIBLE_DEVICES = "0"}

Offers: every host, probed over SSH (Python, CPUs, memory, free disk, GPUs from ``nvidia-smi``);
a host that cannot be reached, or that already runs one of our nodes, is listed out of stock.

A launch, each step with a deadline and a progress line:

1. connect and check the host (Python 3.11 or newer, the GPUs the offer promised);
2. install cotrain into a virtual environment under ``workdir``: the wheel of the cotrain
   running here, copied over SFTP (the host's pip fetches its dependencies with ``pip_args``);
   a host of another Python or architecture installs ``cotrain==<version>`` from its index;
3. benchmark it (``python -m cotrain.market.probe``: matmul GFLOP/s and the round trip to the
   coordinator), below ``min_gflops`` it fails;
4. start ``cotrain node`` in its own session (``setsid``), recorded by pid and start time.

Any step that fails raises ``ProviderError`` naming the host and the step, and leaves no node
running there, so the launcher moves on to the next offer. ``terminate`` sends SIGTERM to the
node's process group (the node leaves its task), SIGKILL after a grace period, and checks that
no process of the group is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import getpass
import json
import os
import re
import shlex
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cotrain.core.files import write_atomic
from cotrain.market.offers import TFLOPS, Offer, OfferQuery, Tier, canonical_gpu, matches
from cotrain.market.probe import FACTS
from cotrain.market.provider import Cap, Instance, LaunchSpec, ProviderError

if TYPE_CHECKING:
    import asyncssh


def _asyncssh() -> Any:
    """asyncssh, imported when first needed (it takes a fifth of a second: ``cotrain market
    offers`` from the cache needs none of it)."""
    import warnings

    with warnings.catch_warnings():  # it still imports cryptography's DSA: not ours to show
        warnings.filterwarnings("ignore", message="DSA is deprecated")
        import asyncssh

    return asyncssh


HOSTS_FILE = Path("~/.config/cotrain/ssh-hosts.toml")
OFFER_PROBE_S = 6.0
COPY_TIMEOUT_S = 300.0
STALE_START_S = 3600.0
"""A launch recorded as starting for longer than this was interrupted: the host is free."""
Progress = Callable[[str], None]

# Run by the host's python3: is the recorded process (pid, start ticks) alive, and which
# processes are left in its group (zombies do not count)?
_GROUP = r"""
import os, signal, sys, time
pid, ticks, action, grace = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
def fields(p):
    try:
        with open(f"/proc/{p}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
def ours():
    f = fields(pid)
    return f is not None and f[19] == ticks and f[0] != "Z"
def group():
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = fields(int(d))
            if f is not None and f[2] == str(pid) and f[0] != "Z":
                out.append(int(d))
    return out
if action == "status":
    print("running" if ours() else "exited")
    raise SystemExit(0)
if ours() or (fields(pid) is None and group()):
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while group() and time.time() < deadline:
            time.sleep(0.1)
        if not group():
            break
left = group()
print("left " + " ".join(map(str, left)) if left else "gone")
"""


class SshHost(BaseModel):
    """One host of the hosts file."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    address: str = Field(min_length=1)
    port: int = Field(default=22, ge=1, le=65535)
    user: str = Field(default_factory=getpass.getuser)
    identity: str = "~/.ssh/id_ed25519"
    known_hosts: str = "~/.ssh/known_hosts"
    python: str = "python3"
    workdir: str = ".cotrain"
    """Where cotrain lives on the host (relative to the user's home, or absolute)."""
    pip_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    """Set for the install, the benchmark and the node (a proxy, CUDA_VISIBLE_DEVICES...)."""

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = next((k for k in v if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)), None)
        if bad is not None:
            raise ValueError(f"{bad!r} is not an environment variable name")
        return v

    usd_per_hour: float = Field(default=0.0, ge=0)
    region: str | None = None
    tier: Tier = "unknown"
    listen_host: str = "0.0.0.0"
    """Where the node's ring server listens on the host."""
    advertise_host: str | None = None
    """The address other nodes dial (default: ``address``)."""


def load_hosts(path: str | Path = HOSTS_FILE) -> list[SshHost]:
    """The hosts of ``path`` (``[[host]]`` tables); a mistake is one ``ProviderError`` line."""
    p = Path(path).expanduser()
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        return []
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ProviderError(f"{p}: {e}") from None
    extra = set(raw) - {"host"}
    if extra:
        raise ProviderError(f"{p}: unknown table {sorted(extra)[0]!r} (hosts are [[host]])")
    hosts = []
    for i, h in enumerate(raw.get("host", [])):
        try:
            hosts.append(SshHost.model_validate(h))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ProviderError(f"{p}: host {i + 1}: {where}: {err['msg']}") from None
    names = [h.name for h in hosts]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ProviderError(f"{p}: two hosts are named {dup!r}")
    return hosts


def local_wheel(out_dir: Path) -> Path:
    """The wheel of the cotrain running here: built from its source tree when it runs from
    one (an editable install, a checkout), else downloaded from the package index."""
    import subprocess

    import cotrain

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("cotrain-*.whl"):
        old.unlink()
    root = Path(cotrain.__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file():
        # offline with the setuptools here first; in an isolated build env if that is too old
        tries = [[str(root), "--no-build-isolation"], [str(root)]]
    else:
        tries = [[f"cotrain=={metadata.version('cotrain')}"]]
    for src in tries:
        try:
            cp = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out_dir), *src],
                capture_output=True,
                text=True,
                timeout=600,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ProviderError(f"could not build cotrain's wheel: {e}") from None
        if cp.returncode == 0:
            break
    wheels = sorted(out_dir.glob("cotrain-*.whl"))
    if cp.returncode != 0 or not wheels:
        raise ProviderError(f"could not build cotrain's wheel: {cp.stderr.strip()[-300:]}")
    return wheels[-1]


class SshProvider:
    name = "ssh"
    caps = frozenset({Cap.MULTI_NODE, Cap.OPEN_PORTS})
    one_per_offer = True
    """An offer is a host, and a host runs one node."""

    def __init__(
        self,
        hosts: list[SshHost],
        state_dir: str | Path,
        *,
        connect_timeout_s: float = 10.0,
        install_timeout_s: float = 900.0,
        probe_seconds: float = 1.0,
        link_bytes: int = 4 * 2**20,
        min_gflops: float = 0.0,
        progress: Progress | None = None,
    ) -> None:
        self.hosts = {h.name: h for h in hosts}
        self.dir = Path(state_dir)
        self.connect_timeout_s = connect_timeout_s
        self.install_timeout_s = install_timeout_s
        self.probe_seconds = probe_seconds
        self.link_bytes = link_bytes
        self.min_gflops = min_gflops
        self.progress = progress or (lambda line: None)
        self._wheel: Path | None = None
        self._wheel_lock = asyncio.Lock()

    # ---- records -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _records(self) -> Iterator[dict[str, dict[str, Any]]]:
        """The instance records, locked against another cotrain process, saved on exit."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "instances.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            recs = self._load()
            before = json.dumps(recs, sort_keys=True)
            yield recs
            if json.dumps(recs, sort_keys=True) != before:
                write_atomic(self.dir / "instances.json", json.dumps(recs, indent=1).encode())

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            return dict(json.loads((self.dir / "instances.json").read_text()))
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise ProviderError(f"{self.dir / 'instances.json'} is not JSON: {e}") from None

    def _host(self, name: str) -> SshHost:
        h = self.hosts.get(name)
        if h is None:
            raise ProviderError(f"ssh: no host {name!r} in the hosts file")
        return h

    # ---- SSH ---------------------------------------------------------------------------------

    async def _connect(self, h: SshHost) -> asyncssh.SSHClientConnection:
        asyncssh = _asyncssh()
        known = Path(h.known_hosts).expanduser()
        if not known.is_file():
            raise ProviderError(
                f"ssh {h.name}: no known_hosts file {known} (add the host's key: "
                f"ssh-keyscan -p {h.port} {h.address} >> {known})"
            )
        try:
            return await asyncio.wait_for(
                asyncssh.connect(
                    h.address,
                    port=h.port,
                    username=h.user,
                    client_keys=[str(Path(h.identity).expanduser())],
                    known_hosts=str(known),
                    agent_path=None,
                    keepalive_interval=15,
                    keepalive_count_max=4,
                    config=[],
                ),
                self.connect_timeout_s,
            )
        except TimeoutError:
            raise ProviderError(
                f"ssh {h.name}: no connection in {self.connect_timeout_s:g} s"
            ) from None
        except (OSError, asyncssh.Error) as e:
            raise ProviderError(f"ssh {h.name}: cannot connect: {_why(e)}") from None

    @contextlib.asynccontextmanager
    async def _session(self, h: SshHost) -> AsyncIterator[asyncssh.SSHClientConnection]:
        asyncssh = _asyncssh()
        conn = await self._connect(h)
        try:
            yield conn
        finally:
            conn.close()
            with contextlib.suppress(OSError, asyncssh.Error, TimeoutError):
                await asyncio.wait_for(conn.wait_closed(), 5)

    async def _run(
        self,
        conn: asyncssh.SSHClientConnection,
        h: SshHost,
        cmd: str,
        timeout_s: float,
        *,
        stdin: str | None = None,
    ) -> asyncssh.SSHCompletedProcess:
        """``cmd`` in ``sh`` on the host (whatever the user's login shell), with the host's
        ``env``; ``stdin`` is what it reads (a secret: not on any command line)."""
        asyncssh = _asyncssh()
        env = [f"{k}={v}" for k, v in h.env.items()]
        try:
            return await conn.run(
                shlex.join(["env", *env, "sh", "-c", cmd]),
                check=False,
                timeout=timeout_s,
                input=stdin,
            )
        except asyncssh.TimeoutError:
            raise ProviderError(
                f"ssh {h.name}: {cmd.split()[0]} took over {timeout_s:g} s"
            ) from None
        except (OSError, asyncssh.Error) as e:
            raise ProviderError(f"ssh {h.name}: {_why(e)}") from None

    async def _facts(self, conn: asyncssh.SSHClientConnection, h: SshHost) -> dict[str, Any]:
        out = await self._python(conn, h, FACTS)
        try:  # the last line: a login script may print before it
            facts = json.loads(out.splitlines()[-1])
            facts["python"], facts["gpus"]
            return dict(facts)
        except (ValueError, IndexError, KeyError, TypeError):
            raise ProviderError(f"ssh {h.name}: cannot read its facts: {_tail(out)}") from None

    async def _python(
        self, conn: asyncssh.SSHClientConnection, h: SshHost, script: str, *args: str
    ) -> str:
        cmd = shlex.join([h.python, "-c", script, *args])
        r = await self._run(conn, h, cmd, 60)
        if r.exit_status != 0:
            raise ProviderError(f"ssh {h.name}: {h.python} failed: {_tail(r.stderr)}")
        return str(r.stdout).strip()

    # ---- offers ------------------------------------------------------------------------------

    async def offers(self, q: OfferQuery) -> list[Offer]:
        recs = self._load()
        busy = {r["host"] for r in recs.values() if _busy(r)}
        measured = {  # the latest benchmark of each host
            r["host"]: dict(r["probe"])
            for r in sorted(recs.values(), key=lambda r: r.get("started_at", 0))
            if r.get("probe")
        }
        got = await asyncio.gather(
            *(self._offer(h, h.name in busy, measured.get(h.name, {})) for h in self.hosts.values())
        )
        return [o for o in got if matches(o, q)]

    async def _offer(self, h: SshHost, busy: bool, link: dict[str, Any]) -> Offer:
        gflops = link.get("gflops")
        facts: dict[str, Any] = {}

        async def probe() -> dict[str, Any]:
            async with self._session(h) as conn:
                return await self._facts(conn, h)

        try:  # well inside the catalog's 10 s: one dead host must not hide the others
            facts = await asyncio.wait_for(probe(), OFFER_PROBE_S)
        except (ProviderError, TimeoutError):
            pass  # unreachable: listed, out of stock
        gpus = facts.get("gpus") or []
        n = len(gpus)
        mem = float(gpus[0][1]) if gpus else 0.0
        price = h.usd_per_hour
        return Offer(
            provider=self.name,
            offer_id=h.name,
            gpu=canonical_gpu(gpus[0][0], mem) if gpus else "cpu",
            gpu_count=n,
            gpu_mem_gb=mem,
            vcpus=facts.get("vcpus"),
            ram_gb=facts.get("ram_gb"),
            disk_gb=facts.get("disk_free_gb"),
            region=h.region or h.address,
            tier=h.tier,
            billing="on_demand" if price > 0 else "owned",
            usd_per_hour=price,
            usd_per_gpu_hour=price / max(n, 1),
            stock="none" if busy or not facts else "available",
            measured_gflops=gflops,
            net_down_mbps=link.get("down_mbps"),
            net_up_mbps=link.get("up_mbps"),
            fetched_at=time.time(),
        )

    # ---- launch ------------------------------------------------------------------------------

    def _wheel_file(self) -> Path:
        if self._wheel is None or not self._wheel.exists():
            self._wheel = local_wheel(self.dir / f"wheel-{os.getpid()}")
        return self._wheel

    async def launch(self, offer: Offer, spec: LaunchSpec) -> Instance:
        if offer.provider != self.name:
            raise ProviderError(f"offer {offer.offer_id} is {offer.provider}'s, not ssh's")
        h = self._host(offer.offer_id)
        with self._records() as recs:
            busy = [k for k, r in recs.items() if r["host"] == h.name and _busy(r)]
            if busy:
                raise ProviderError(f"ssh {h.name}: already runs {busy[0]}")
            n = 1 + max((int(k.rsplit("-", 1)[1]) for k in recs), default=0)
            iid = f"ssh-{h.name}-{n}"
            recs[iid] = {
                "host": h.name,
                "offer": offer.offer_id,
                "task": spec.task,
                "state": "starting",
                "started_at": time.time(),
                "usd_per_hour": h.usd_per_hour,
            }
        started: dict[str, Any] = {}
        try:
            probe, pid, ticks = await self._launch(h, offer, spec, iid, started)
        except BaseException as e:
            why = str(e)[:300] if isinstance(e, ProviderError) else "interrupted"
            if "pid" in started:  # started, then interrupted: stop it, it is no one's now
                rec = {"pid": started["pid"], "ticks": started["ticks"]}
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.wait_for(self._group(h, rec, "terminate", 5), 60))
            with self._records() as recs:
                recs[iid]["state"] = "failed"
                recs[iid]["detail"] = why
                recs[iid].update(started)
            raise
        with self._records() as recs:
            recs[iid].update(state="running", pid=pid, ticks=ticks, probe=probe)
            rec = recs[iid]
        return self._instance(iid, rec)

    async def _launch(
        self, h: SshHost, offer: Offer, spec: LaunchSpec, iid: str, started: dict[str, Any]
    ) -> tuple[dict[str, Any], int, str]:
        say = self.progress
        say(f"{iid}: connecting to {h.user}@{h.address}:{h.port}")
        async with self._session(h) as conn:
            facts = await self._facts(conn, h)
            if tuple(facts["python"]) < (3, 11):
                ver = ".".join(map(str, facts["python"]))
                raise ProviderError(f"ssh {h.name}: {h.python} is {ver}; cotrain needs 3.11+")
            if len(facts["gpus"]) < offer.gpu_count:
                raise ProviderError(
                    f"ssh {h.name}: the offer promised {offer.gpu_count} GPUs, the host has "
                    f"{len(facts['gpus'])}"
                )
            await self._install(conn, h, facts, iid)
            link = await self._link(conn, h, iid) if self.link_bytes else {}
            peers = self._peers(spec.task, h.name)
            venv = f"{h.workdir}/venv/bin"
            say(f"{iid}: benchmarking ({self.probe_seconds:g} s)")
            probe_cmd = [f"{venv}/python", "-m", "cotrain.market.probe"]
            probe_cmd += ["--coordinator", spec.coordinator, "--seconds", str(self.probe_seconds)]
            probe_cmd += ["--peers", ",".join(peers)] if peers else []
            cmd = shlex.join(probe_cmd)
            r = await self._run(conn, h, cmd, 120 + 2 * self.probe_seconds)
            if r.exit_status != 0:
                raise ProviderError(f"ssh {h.name}: the benchmark failed: {_tail(r.stderr)}")
            try:
                probe = {**json.loads(str(r.stdout).strip().splitlines()[-1]), **link}
            except (ValueError, IndexError):
                raise ProviderError(f"ssh {h.name}: the benchmark said {_tail(r.stdout)}") from None
            if probe["gflops"] < self.min_gflops:
                raise ProviderError(
                    f"ssh {h.name}: the benchmark measured {probe['gflops']:.0f} GFLOP/s, below "
                    f"the floor of {self.min_gflops:.0f}"
                )
            per_gpu = TFLOPS.get(offer.gpu)  # the benchmark runs on one GPU
            if per_gpu and probe["device"] == "cuda" and probe["gflops"] < 250 * per_gpu:
                raise ProviderError(
                    f"ssh {h.name}: the benchmark measured {probe['gflops']:.0f} GFLOP/s on one "
                    f"GPU, under a quarter of the {per_gpu:.0f} TFLOP/s a {offer.gpu} promises"
                )
            if probe.get("rtt_ms") is None:
                raise ProviderError(f"ssh {h.name}: cannot reach the coordinator from the host")
            say(f"{iid}: {probe['gflops']:.0f} GFLOP/s on {probe['device']}, "
                f"{probe['rtt_ms']:.1f} ms to the coordinator; starting the node")  # fmt: skip
            node = ["../../venv/bin/cotrain", "node", "--coordinator", spec.coordinator]
            node += ["--task", spec.task, "--name", spec.name or iid, "--key", "node.pem"]
            node += ["--work_dir", ".", "--worker.listen_host", h.listen_host]
            node += ["--worker.advertise_host", h.advertise_host or h.address]
            if spec.max_hours:  # the host itself stops the node when its time is up
                node = ["timeout", "-k", "60", f"{int(spec.max_hours * 3600)}s", *node]
            d = f"{h.workdir}/nodes/{iid}"
            # the invite comes on stdin, into the node's environment: never on a command line
            start = (
                f"mkdir -p {shlex.quote(d)} && cd {shlex.quote(d)} && "
                'read -r COTRAIN_INVITE; [ -n "$COTRAIN_INVITE" ] && export COTRAIN_INVITE; '
                f"(setsid {shlex.join(node)} > node.out 2> node.err < /dev/null & "
                "echo $! $(cut -d' ' -f22 /proc/$!/stat 2>/dev/null || echo -))"
            )
            r = await self._run(conn, h, start, 30, stdin=f"{spec.invite}\n")
            try:
                pid_s, ticks = str(r.stdout).split()[-2:]
                pid = int(pid_s)
            except ValueError:
                raise ProviderError(
                    f"ssh {h.name}: the node did not start: {_tail(r.stderr)}"
                ) from None
            started["pid"], started["ticks"] = pid, ticks
            return probe, pid, ticks

    def _peers(self, task: str, me: str) -> list[str]:
        """``address:port`` of the other hosts running (or being launched for) ``task``."""
        out = []
        for r in self._load().values():
            h = self.hosts.get(r["host"])
            if h is not None and r["host"] != me and r.get("task") == task and _busy(r):
                out.append(f"{h.address}:{h.port}")
        return sorted(set(out))

    async def _link(
        self, conn: asyncssh.SSHClientConnection, h: SshHost, iid: str
    ) -> dict[str, float]:
        """The link between here and the host, both ways: ``link_bytes`` of noise copied over
        SFTP there (the host's download) and back (its upload), in Mbit/s."""
        import tempfile

        asyncssh = _asyncssh()
        self.progress(f"{iid}: measuring the link ({self.link_bytes // 2**20} MiB each way)")
        remote = f"{h.workdir}/link-{iid}.bin"
        with tempfile.TemporaryDirectory() as d:
            blob, back = Path(d) / "blob", Path(d) / "back"
            blob.write_bytes(os.urandom(self.link_bytes))

            async def both() -> tuple[float, float]:
                async with conn.start_sftp_client() as sftp:
                    t0 = time.perf_counter()
                    await sftp.put(str(blob), remote)
                    t1 = time.perf_counter()
                    await sftp.get(remote, str(back))
                    t2 = time.perf_counter()
                    await sftp.remove(remote)
                return t1 - t0, t2 - t1

            try:
                down_s, up_s = await asyncio.wait_for(both(), COPY_TIMEOUT_S)
            except (OSError, asyncssh.Error, TimeoutError) as e:
                raise ProviderError(f"ssh {h.name}: measuring the link failed: {_why(e)}") from None
        bits = self.link_bytes * 8 / 1e6
        return {"down_mbps": round(bits / down_s, 1), "up_mbps": round(bits / up_s, 1)}

    async def _install(
        self, conn: asyncssh.SSHClientConnection, h: SshHost, facts: dict[str, Any], iid: str
    ) -> None:
        import platform

        asyncssh = _asyncssh()
        say = self.progress
        wd = shlex.quote(h.workdir)
        same = tuple(facts["python"]) == sys.version_info[:2] and (
            facts["machine"] == platform.machine()
        )
        if same:
            async with self._wheel_lock:  # one build for every host launched at once
                wheel = await asyncio.to_thread(self._wheel_file)
            say(f"{iid}: copying {wheel.name} ({wheel.stat().st_size // 1024} KiB)")
            await self._run(conn, h, f"mkdir -p {wd}/wheels", 30)

            async def copy() -> None:
                async with conn.start_sftp_client() as sftp:
                    await sftp.put(str(wheel), f"{h.workdir}/wheels/{wheel.name}")

            try:
                await asyncio.wait_for(copy(), COPY_TIMEOUT_S)
            except (OSError, asyncssh.Error, TimeoutError) as e:
                raise ProviderError(f"ssh {h.name}: copying the wheel failed: {_why(e)}") from None
            target = f"{h.workdir}/wheels/{wheel.name}"
        else:
            target = f"cotrain=={metadata.version('cotrain')}"
        say(f"{iid}: installing cotrain into {h.workdir}/venv")
        py = shlex.quote(h.python)
        pip = [f"{h.workdir}/venv/bin/pip", "install", "-q", "--disable-pip-version-check"]
        cmd = (
            f"mkdir -p {wd} && ( [ -x {wd}/venv/bin/python ] || {py} -m venv {wd}/venv ) && "
            + shlex.join([*pip, *h.pip_args, target])
        )
        if same:  # this very build, even where the same version is installed already
            again = [*pip, *h.pip_args, "--no-deps", "--force-reinstall", target]
            cmd += " && " + shlex.join(again)
        r = await self._run(conn, h, cmd, self.install_timeout_s)
        if r.exit_status != 0:
            raise ProviderError(f"ssh {h.name}: installing cotrain failed: {_tail(r.stderr)}")

    # ---- status, terminate -------------------------------------------------------------------

    def _instance(self, iid: str, rec: dict[str, Any], state: str | None = None) -> Instance:
        h = self.hosts.get(rec["host"])
        probe = rec.get("probe") or {}
        detail = rec.get("detail", "")
        if probe:
            detail = f"pid {rec.get('pid')}, {probe.get('gflops', 0):.0f} GFLOP/s" + (
                f", {detail}" if detail else ""
            )
        return Instance(
            provider=self.name,
            instance_id=iid,
            offer_id=rec["offer"],
            state=state or rec["state"],  # type: ignore[arg-type]
            usd_per_hour=rec.get("usd_per_hour", 0.0),
            started_at=rec["started_at"],
            host=h.address if h else None,
            detail=detail[:300],
            task=rec.get("task"),
            measured=probe,
        )

    async def _group(self, h: SshHost, rec: dict[str, Any], action: str, grace_s: float) -> str:
        async with self._session(h) as conn:
            return await self._python(
                conn, h, _GROUP, str(rec["pid"]), str(rec["ticks"]), action, str(grace_s)
            )

    async def status(self, instance_id: str) -> Instance:
        rec = self._load().get(instance_id)
        if rec is None:
            raise ProviderError(f"ssh: no instance {instance_id}")
        return await self._status(instance_id, rec)

    async def _status(self, iid: str, rec: dict[str, Any]) -> Instance:
        if rec["state"] != "running":
            return self._instance(iid, rec)
        try:
            state = await self._group(self._host(rec["host"]), rec, "status", 0)
        except ProviderError as e:
            return self._instance(iid, {**rec, "detail": str(e)}, "unknown")
        if state == "exited":
            with self._records() as recs:
                recs[iid]["state"] = "exited"
        return self._instance(iid, rec, state)

    async def instances(self) -> list[Instance]:
        recs = self._load()
        return list(await asyncio.gather(*(self._status(k, v) for k, v in sorted(recs.items()))))

    async def terminate(self, instance_id: str, *, grace_s: float = 20.0) -> None:
        """SIGTERM the node's process group, SIGKILL after ``grace_s``; raises if any process
        of it is left on the host."""
        rec = self._load().get(instance_id)
        if rec is None:
            raise ProviderError(f"ssh: no instance {instance_id}")
        if rec.get("pid") is not None and rec["state"] in ("running", "exited", "unknown"):
            said = await self._group(self._host(rec["host"]), rec, "terminate", grace_s)
            if said != "gone":
                raise ProviderError(f"ssh {rec['host']}: {instance_id} left processes: {said}")
        with self._records() as recs:
            if recs[instance_id]["state"] != "failed":
                recs[instance_id]["state"] = "terminated"
            recs[instance_id]["ended_at"] = time.time()


def _busy(rec: dict[str, Any]) -> bool:
    """Whether this record holds its host: a node runs there, or a launch is at work on it."""
    if rec.get("state") == "running":
        return True
    return rec.get("state") == "starting" and time.time() - rec["started_at"] < STALE_START_S


def _why(e: BaseException) -> str:
    text = getattr(e, "reason", None) or str(e) or type(e).__name__
    return str(text).splitlines()[0][:200]


def _tail(text: Any, n: int = 300) -> str:
    s = str(text or "").strip()
    return s[-n:].replace("\n", " | ") if s else "(no output)"
