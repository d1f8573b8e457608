"""``WanNetwork``: N emulated hosts on one switch, each behind a rate-limited, lossy link.

Topology (one instance; every name below lives inside namespaces of this instance only)::

      host ns  <tag>-h0              switch ns  <tag>-sw               host ns  <tag>-h1
    lo, eth0 10.213.0.2 ══veth══ p0 ─┐                  ┌─ p1 ══veth══ eth0 10.213.0.3, lo
      tbf on eth0 (upload)           │   br0 (bridge)   │   tbf on p1 (host 1's download)
                                  p0: tbf (download), nft loss on what p0 forwards in and out
      delay agent on 127.0.0.1 (only once a delay is set; TCP out of eth0 goes through it)

Each host's upload is shaped by ``tbf`` on its ``eth0`` and its download by ``tbf`` on the
switch end of its veth, so both are ``rate_mbit``. Loss is an nftables rule on the bridge, on
the wire as it were: it drops IPv4 frames forwarded from and to a host's port, and neither end
is told (see shaping.py); a packet between two lossy hosts crosses two such rules. Latency
(``delay_ms``, ``set_delay``) is added to TCP in userspace by a transparent delay agent per
host (this kernel has no netem; see latency.py); an explicit ``DelayProxy`` in front of one
server (``Host.start_delay_proxy``) works too.

Addresses are 10.213.0.(index + 2)/24. They may repeat across instances: each instance has its
own switch, so instances (parallel tests, parallel engineers) never see each other.
"""

from __future__ import annotations

import atexit
import dataclasses
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from cotrain.core.config import ConfigModel
from cotrain.netem import shaping
from cotrain.netem.delay_proxy import STOP_TIMEOUT_S
from cotrain.netem.host import Host
from cotrain.netem.latency import LinkDelays
from cotrain.netem.netns import delete_netns, new_network_tag, require_netns, run_cmd
from cotrain.netem.shaping import DropCounts

SUBNET = "10.213.0"
PREFIX_LEN = 24
HOST_DEV = "eth0"
MAX_HOSTS = 250
Segmentation = Literal["mtu", "gso"]


class WanConfig(ConfigModel):
    """An emulated WAN: how many hosts, and the link every host starts with."""

    n_hosts: int = Field(default=2, ge=1, le=MAX_HOSTS)
    """Number of emulated hosts, each in its own network namespace."""
    rate_mbit: float | None = Field(default=100.0, gt=0)
    """Each host's upload and (separately) download limit in Mbit/s; None for unlimited."""
    loss_pct: float = Field(default=0.0, ge=0.0, le=100.0)
    """Random packet loss in percent on each host's link, in each direction."""
    delay_ms: float = Field(default=0.0, ge=0.0)
    """One-way latency of each host's link for TCP: an A-B connection's RTT grows by
    2 (delay_A + delay_B). Applied by a transparent delay agent per host (see latency.py)."""
    segmentation: Segmentation = "mtu"
    """How TCP hands bytes to a link. "mtu": one segment per packet, so loss drops single
    packets as on a real WAN (costs CPU: about 0.6 Gbit/s per flow on a 2-core machine).
    "gso": the kernel's batches of up to 64 KB, several Gbit/s, but the loss rule would drop a
    whole batch at once, so it is refused with loss."""

    @model_validator(mode="after")
    def _gso_has_no_loss(self) -> WanConfig:
        if self.segmentation == "gso" and self.loss_pct > 0:
            raise ValueError(
                "loss_pct > 0 needs segmentation='mtu' (with 'gso' one lost packet would be a "
                "64 KB batch of segments)"
            )
        return self


@dataclass(frozen=True)
class LinkSettings:
    """What one host's link is set to now."""

    rate_mbit: float | None
    loss_pct: float
    delay_ms: float


class WanNetwork:
    """Build the namespaces on construction; ``close()`` (or leaving ``with``) removes them all.

    Construction raises ``NetnsUnavailable`` when namespaces cannot be built here. A crash that
    skips ``close()`` leaves namespaces that ``python -m cotrain.netem cleanup`` removes.
    """

    def __init__(
        self,
        n_hosts: int = 2,
        rate_mbit: float | None = 100.0,
        loss_pct: float = 0.0,
        *,
        delay_ms: float = 0.0,
        segmentation: Segmentation = "mtu",
    ) -> None:
        self.config = WanConfig(
            n_hosts=n_hosts,
            rate_mbit=rate_mbit,
            loss_pct=loss_pct,
            delay_ms=delay_ms,
            segmentation=segmentation,
        )
        require_netns()
        self.tag = new_network_tag()
        self.switch = f"{self.tag}-sw"
        self.hosts: list[Host] = [
            Host(f"{self.tag}-h{i}", f"{SUBNET}.{i + 2}", i) for i in range(n_hosts)
        ]
        self._links = [LinkSettings(rate_mbit, loss_pct, delay_ms) for _ in self.hosts]
        self._delays = LinkDelays(self.hosts, HOST_DEV, self.tag)
        self._created: list[str] = []
        self._closed = False
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(cls, config: WanConfig) -> WanNetwork:
        return cls(
            config.n_hosts,
            config.rate_mbit,
            config.loss_pct,
            delay_ms=config.delay_ms,
            segmentation=config.segmentation,
        )

    def _build(self) -> None:
        for ns in [self.switch] + [h.name for h in self.hosts]:
            run_cmd(["ip", "netns", "add", ns])
            self._created.append(ns)
        # One `ip -batch` per namespace keeps construction to a few process spawns.
        switch_cmds = ["link add name br0 type bridge", "link set br0 up"]
        for h in self.hosts:
            switch_cmds += [
                f"link add name p{h.index} type veth peer name {HOST_DEV} netns {h.name}",
                f"link set p{h.index} master br0",
                f"link set p{h.index} up",
            ]
        _ip_batch(self.switch, switch_cmds)
        for h in self.hosts:
            host_cmds = ["link set lo up", f"addr add {h.ip}/{PREFIX_LEN} dev {HOST_DEV}"]
            if self.config.segmentation == "mtu":
                # One MSS per packet; sockets read this when they connect, so it is fixed for
                # the network's life (hence no switching at run time).
                host_cmds.append(f"link set {HOST_DEV} gso_max_segs 1")
            _ip_batch(h.name, [*host_cmds, f"link set {HOST_DEV} up"])
            self._apply(h.index, self._links[h.index])
        self._delays.update({h.index: self.config.delay_ms for h in self.hosts})

    def _apply(self, index: int, link: LinkSettings) -> None:
        host = self.hosts[index]
        shaping.set_rate(host.name, HOST_DEV, link.rate_mbit)  # upload
        shaping.set_rate(self.switch, f"p{index}", link.rate_mbit)  # download
        shaping.set_loss(self.switch, f"p{index}", link.loss_pct)
        self._links[index] = link

    def _host(self, host_index: int) -> Host:
        if self._closed:
            raise RuntimeError("this WanNetwork is closed")
        if not 0 <= host_index < len(self.hosts):
            raise ValueError(f"host_index must be in [0, {len(self.hosts) - 1}], got {host_index}")
        return self.hosts[host_index]

    def link(self, host_index: int) -> LinkSettings:
        """The rate, loss and delay host ``host_index``'s link has now."""
        self._host(host_index)
        return self._links[host_index]

    def set_rate(self, host_index: int, rate_mbit: float | None) -> None:
        """Change host ``host_index``'s upload and download limit (None: unlimited) now."""
        host = self._host(host_index)
        shaping.set_rate(host.name, HOST_DEV, rate_mbit)
        shaping.set_rate(self.switch, f"p{host_index}", rate_mbit)
        self._links[host_index] = dataclasses.replace(self._links[host_index], rate_mbit=rate_mbit)

    def set_loss(self, host_index: int, loss_pct: float) -> None:
        """Change host ``host_index``'s random loss (each direction) now; 100 cuts the link."""
        self._host(host_index)
        if loss_pct > 0 and self.config.segmentation == "gso":
            raise ValueError("set_loss needs a network built with segmentation='mtu'")
        shaping.set_loss(self.switch, f"p{host_index}", loss_pct)
        self._links[host_index] = dataclasses.replace(self._links[host_index], loss_pct=loss_pct)

    def set_delay(self, host_index: int, delay_ms: float) -> None:
        """Change host ``host_index``'s one-way link latency for TCP now.

        When this returns, new TCP connections from or to the host see the new delay, and so do
        connections already going through the delay agents (any opened while some delay was
        set); connections opened before the network's first delay stay undelayed.
        """
        self._host(host_index)
        self._delays.update({host_index: delay_ms})
        self._links[host_index] = dataclasses.replace(self._links[host_index], delay_ms=delay_ms)

    def drop_counts(self, host_index: int) -> DropCounts:
        """Packets the loss rule of host ``host_index`` dropped so far, per direction."""
        self._host(host_index)
        return shaping.drop_counts(self.switch, f"p{host_index}")

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop every process we started here, then delete all namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        errors: list[BaseException] = []
        try:
            self._delays.close(timeout_s)
        except Exception as exc:
            errors.append(exc)
        for host in self.hosts:
            try:
                host.stop_processes(timeout_s)
            except Exception as exc:  # keep tearing down; report the first failure after
                errors.append(exc)
        for ns in reversed(self._created):
            try:
                delete_netns(ns)
            except Exception as exc:
                errors.append(exc)
        self._created.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> WanNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.hosts)} hosts"
        return f"WanNetwork({self.tag}, {state})"


def _ip_batch(ns: str, commands: list[str]) -> None:
    run_cmd(["ip", "-n", ns, "-batch", "-"], input_text="\n".join(commands) + "\n")
