"""Real ``sshd`` servers for the market's SSH provider tests (``../shared/MACHINE.md``).

``SshServer.start(tmp, name)`` runs ``/usr/sbin/sshd -D`` on 127.0.0.1 at a free port, or, with
``host=`` a ``netem`` ``Host``, inside that host's network namespace on port 22 of its WAN
address, so it behaves like a remote machine behind a shaped link. Each server has its own host
key; one client key (``client_key(tmp)``) logs into all of them as root. ``ssh_host(...)`` is
the matching ``SshHost`` entry: its known_hosts holds the server's real key, and its ``env``
points the host's Python at this test environment's packages (``PYTHONPATH``), so installing
cotrain there needs no package index: the wheel is copied and installed for real, its
dependencies are found already installed. Each host gets its own ``workdir``: the namespaces
share this machine's files.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cotrain.market.ssh import SshHost
from cotrain.rl.launch import free_port

SSHD = "/usr/sbin/sshd"


def require_sshd() -> None:
    if not Path(SSHD).exists() or shutil.which("ssh-keygen") is None:
        pytest.skip("needs openssh-server (apt install openssh-server)")


def client_key(tmp: Path) -> Path:
    key = tmp / "client_ed25519"
    if not key.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
        )
    auth = tmp / "authorized_keys"
    auth.write_text(key.with_suffix(".pub").read_text())
    return key


@dataclass
class SshServer:
    name: str
    address: str
    port: int
    dir: Path
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(cls, tmp: Path, name: str, host: Any = None) -> SshServer:
        require_sshd()
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        d = tmp / f"sshd-{name}"
        d.mkdir(parents=True)
        client_key(tmp)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_ed25519")],
            check=True,
            timeout=30,
        )
        address, port = (host.ip, 22) if host is not None else ("127.0.0.1", free_port())
        (d / "sshd_config").write_text(
            f"Port {port}\nListenAddress {address}\nHostKey {d / 'host_ed25519'}\n"
            f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\nMaxSessions 64\nMaxStartups 64\nPermitRootLogin yes\n"
            "Subsystem sftp internal-sftp\n"
        )
        argv = [SSHD, "-D", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")]
        proc = host.popen(argv) if host is not None else subprocess.Popen(argv)
        server = cls(name, address, port, d, proc)
        server._wait_listening(host)
        return server

    def _wait_listening(self, host: Any) -> None:
        deadline = time.monotonic() + 20
        probe = ["ssh-keyscan", "-T", "2", "-p", str(self.port), self.address]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sshd {self.name} exited: {self.log()}")
            cp = host.run(probe) if host is not None else subprocess.run(
                probe, capture_output=True, text=True, timeout=10
            )  # fmt: skip
            if cp.returncode == 0 and cp.stdout.strip():
                return
            time.sleep(0.05)
        raise AssertionError(f"sshd {self.name} is not listening: {self.log()}")

    def log(self) -> str:
        p = self.dir / "sshd.log"
        return p.read_text(errors="replace")[-2000:] if p.exists() else ""

    def known_hosts_line(self) -> str:
        key = (self.dir / "host_ed25519.pub").read_text().split()
        where = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{where} {key[0]} {key[1]}\n"

    def ssh_host(self, tmp: Path, **kw: Any) -> SshHost:
        known = tmp / f"known_hosts-{self.name}"
        known.write_text(self.known_hosts_line())
        fields: dict[str, Any] = {
            "name": self.name,
            "address": self.address,
            "port": self.port,
            "user": "root",
            "identity": str(client_key(tmp)),
            "known_hosts": str(known),
            "workdir": str(tmp / f"host-{self.name}"),
            "pip_args": ["--no-index"],
            "env": {"PYTHONPATH": sysconfig.get_paths()["purelib"]},
            "listen_host": self.address,
        }
        fields.update(kw)
        return SshHost(**fields)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def processes_under(path: Path) -> list[int]:
    """Live processes (not zombies) whose command line mentions ``path``."""
    import os

    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(path) in cmd and state != "Z":
            out.append(int(d))
    return out


def kill_under(path: Path) -> None:
    """Whatever a failed test left running under ``path`` (nodes, watchdogs)."""
    import os
    import signal

    for pid in processes_under(path):
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def hosts_toml(hosts: list[SshHost]) -> str:
    """A hosts file (``[[host]]`` tables) listing ``hosts``, as a user would write it."""
    import json

    lines = []
    for h in hosts:
        lines.append("[[host]]")
        for k, v in h.model_dump().items():
            if isinstance(v, dict):
                inner = ", ".join(f"{a} = {json.dumps(b)}" for a, b in v.items())
                lines.append(f"{k} = {{ {inner} }}")
            elif v is not None:
                lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"
