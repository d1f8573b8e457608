"""Link latency for TCP without netem: a transparent delay agent in every host.

``WanNetwork.set_delay(i, d)`` gives host ``i``'s link a one-way latency of ``d`` ms. Since the
kernel has no netem, TCP connections are delayed in userspace, at the client's end::

    host A: app ── connect(B.ip:p) ──> nft "redirect" (nat output, eth0, unmarked TCP)
            └──> agent (127.0.0.1) ── reads the original destination (SO_ORIGINAL_DST),
                 connects to B.ip:p with a marked socket (the rule skips it), holds every
                 block d_A + d_B each way ──> link ──> host B: app sees A.ip as its peer

so an A-B connection's RTT grows by 2 (d_A + d_B), as if each link carried its own latency.
Servers need no change and see the client host's address. Limits: TCP only (UDP and ICMP are
not delayed); a connection opened before the first delay was set stays direct; one opened
while delays are set keeps going through the agent, whose delays follow every later change.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import IO

from cotrain.core.clock import Deadline
from cotrain.netem.delay_proxy import STOP_TIMEOUT_S, await_port, launch_proxy, terminate
from cotrain.netem.errors import ProxyError
from cotrain.netem.host import Host
from cotrain.netem.netns import in_ns, run_cmd

AGENT_MARK = 0x213  # SO_MARK of the agents' own upstream sockets
CONTROL_TIMEOUT_S = 5.0
AGENT_START_TIMEOUT_S = 20.0
_TABLE = "cotrain_delay"


@dataclass
class _Agent:
    host: Host
    process: subprocess.Popen[bytes]
    port: int
    control_path: str
    stderr: IO[bytes] = field(repr=False)

    def push(self, delays_ms: dict[str, float]) -> None:
        """Send the delay table and wait until the agent applied it to every connection."""
        deadline = Deadline.after(CONTROL_TIMEOUT_S)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CONTROL_TIMEOUT_S)
            sock.connect(self.control_path)
            sock.sendall(json.dumps({"delays_ms": delays_ms}).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                sock.settimeout(deadline.check(f"the delay agent of {self.host.name}"))
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        if not reply.strip() or not json.loads(reply).get("ok"):
            raise ProxyError(f"delay agent of {self.host.name} refused the delays: {reply!r}")

    def stop(self, timeout_s: float) -> None:
        terminate(self.process, timeout_s)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.stderr.close()


class LinkDelays:
    """The per-host link delays of one network and the agents that apply them."""

    def __init__(self, hosts: list[Host], dev: str, tag: str) -> None:
        self.hosts = hosts
        self.dev = dev
        self.tag = tag
        self.delays_ms = [0.0] * len(hosts)
        self._agents: list[_Agent] = []
        self._dir: str | None = None
        self._redirecting = False

    def update(self, delays_ms: dict[int, float]) -> None:
        """Set the one-way delay of the hosts named by index; returns once it applies."""
        for delay_ms in delays_ms.values():
            if not delay_ms >= 0:
                raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        for index, delay_ms in delays_ms.items():
            self.delays_ms[index] = float(delay_ms)
        if not self._agents and not any(self.delays_ms):
            return  # never delayed: stay without agents
        if not self._agents:
            self._start_agents()
        table = {h.ip: d for h, d in zip(self.hosts, self.delays_ms, strict=True)}
        # Agents first, then the redirect: when this returns, every new connection is
        # delayed by the new table and every proxied one follows it already.
        for agent in self._agents:
            agent.push(table)
        self._redirect(any(self.delays_ms))

    def _start_agents(self) -> None:
        self._dir = tempfile.mkdtemp(prefix=f"{self.tag}-")
        launched = []
        for host in self.hosts:  # start them all, then wait for each: they boot in parallel
            control = f"{self._dir}/{host.index}.sock"
            args = [
                "--transparent-for", host.ip, "--control", control,
                "--listen-host", "127.0.0.1", "--mark", hex(AGENT_MARK),
            ]  # fmt: skip
            launched.append((host, control, *launch_proxy(host.name, args)))
        deadline = Deadline.after(AGENT_START_TIMEOUT_S)
        try:
            for host, control, process, stderr in launched:
                port = await_port(process, stderr, max(deadline.remaining(), 0.1))
                self._agents.append(_Agent(host, process, port, control, stderr))
        finally:
            for _, _, process, stderr in launched[len(self._agents) :]:
                terminate(process)
                stderr.close()

    def _redirect(self, on: bool) -> None:
        if on == self._redirecting:
            return
        for agent in self._agents:
            lines = [
                f"table ip {_TABLE} {{",
                "  chain output { type nat hook output priority -100; policy accept; }",
                "}",
                f"flush chain ip {_TABLE} output",
            ]
            if on:
                lines.append(
                    f'add rule ip {_TABLE} output oifname "{self.dev}" meta mark != {AGENT_MARK} '
                    f"meta l4proto tcp redirect to :{agent.port}"
                )
            run_cmd(in_ns(agent.host.name, ["nft", "-f", "-"]), input_text="\n".join(lines) + "\n")
        self._redirecting = on

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        for agent in self._agents:
            agent.stop(timeout_s)
        self._agents.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
