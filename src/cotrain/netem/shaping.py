"""Link shaping without netem: rate with ``tc tbf``, random loss with an nftables rule.

Rate shapes the *egress* of one interface inside one namespace. Loss is applied on the wire:
by the switch's bridge, to the IPv4 frames it forwards from and to one host's port, so neither
end sees it happen, as with a real lossy link. (A drop in a host's own output hook is not
loss: the sending stack is told, and a listener whose SYN-ACK retransmission is refused so
drops the half-open connection, while the client, whose ACK was lost, waits on it as
established: a stall no wire produces.) ``lo`` inside a host never loses anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cotrain.netem.errors import NetemCommandError
from cotrain.netem.netns import in_ns, run_cmd

# Token bucket sizing. The bucket holds BURST_S seconds of traffic (at least MIN_BURST_BYTES so
# a full-size GSO chunk fits); the queue behind it holds QUEUE_S seconds. A short queue keeps
# the RTT of a loaded link close to the unloaded one, and with sub-millisecond veth RTTs TCP
# still fills the link (measured: ~95% goodput at 100 Mbit/s, the rest is header bytes).
BURST_S = 0.002
MIN_BURST_BYTES = 16 * 1024
QUEUE_S = 0.020
MIN_QUEUE_BYTES = 64 * 1024

_TABLE = "cotrain_netem"
# Loss probability resolution: 1/10000 (0.01 %).
_LOSS_SCALE = 10_000


def check_rate(rate_mbit: float | None) -> None:
    if rate_mbit is not None and not rate_mbit > 0:
        raise ValueError(f"rate_mbit must be > 0 (or None for unlimited), got {rate_mbit}")


def check_loss(loss_pct: float) -> None:
    if not 0.0 <= loss_pct <= 100.0:
        raise ValueError(f"loss_pct must be within [0, 100], got {loss_pct}")


def set_rate(ns: str, dev: str, rate_mbit: float | None) -> None:
    """Limit egress of ``dev`` in ``ns`` to ``rate_mbit`` (None removes the limit)."""
    check_rate(rate_mbit)
    if rate_mbit is None:
        try:
            run_cmd(in_ns(ns, ["tc", "qdisc", "del", "dev", dev, "root"]))
        except NetemCommandError as exc:
            # "handle of zero": the default (noqueue) is in place already, i.e. unlimited.
            if "handle of zero" not in exc.stderr:
                raise
        return
    rate_bytes_s = rate_mbit * 1e6 / 8
    burst = max(int(rate_bytes_s * BURST_S), MIN_BURST_BYTES)
    limit = max(int(rate_bytes_s * QUEUE_S), MIN_QUEUE_BYTES) + burst
    rate_bit = max(int(rate_mbit * 1e6), 8)
    run_cmd(
        in_ns(
            ns,
            [
                "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                "rate", f"{rate_bit}bit", "burst", str(burst), "limit", str(limit),
            ],
        )
    )  # fmt: skip


def set_loss(ns: str, port: str, loss_pct: float) -> None:
    """Drop ``loss_pct`` % of the IPv4 frames that the bridge in ``ns`` forwards in from
    ``port`` (its host's upload) and out to it (its host's download).

    Each port has a table and drop counters of its own, created once; the rules are replaced
    atomically (one ``nft -f`` transaction), so changing the loss at run time never opens a
    window without it.
    """
    check_loss(loss_pct)
    threshold = round(loss_pct * _LOSS_SCALE / 100)
    table = _loss_table(port)
    lines = [
        f"table bridge {table} {{",
        "  counter egress_drops { }",
        "  counter ingress_drops { }",
        "  chain forward { type filter hook forward priority 0; policy accept; }",
        "}",
        f"flush chain bridge {table} forward",
    ]
    if threshold > 0:
        # numgen yields 0..SCALE-1, so "< SCALE" would not parse: 100 % is a plain drop.
        chance = (
            f"numgen random mod {_LOSS_SCALE} < {threshold} " if threshold < _LOSS_SCALE else ""
        )
        # egress: leaving the host, so entering the bridge through its port; ingress: the reverse
        for counter, match in (("egress_drops", "iifname"), ("ingress_drops", "oifname")):
            lines.append(
                f'add rule bridge {table} forward {match} "{port}" ether type ip '
                f'{chance}counter name "{counter}" drop'
            )
    run_cmd(in_ns(ns, ["nft", "-f", "-"]), input_text="\n".join(lines) + "\n")


def _loss_table(port: str) -> str:
    return f"{_TABLE}_{port}"


@dataclass(frozen=True)
class DropCounts:
    """Packets dropped by the loss rule of one host's link since the network was built:
    ``egress`` on their way out of the host, ``ingress`` on their way in."""

    egress_packets: int
    ingress_packets: int

    @property
    def total(self) -> int:
        return self.egress_packets + self.ingress_packets


def drop_counts(ns: str, port: str) -> DropCounts:
    """What ``set_loss(ns, port, ...)``'s rules have dropped so far."""
    table = _loss_table(port)
    out = run_cmd(in_ns(ns, ["nft", "-j", "list", "counters", "table", "bridge", table]))
    counts = {"egress_drops": 0, "ingress_drops": 0}
    for item in json.loads(out)["nftables"]:
        counter = item.get("counter")
        if counter is not None and counter["name"] in counts:
            counts[counter["name"]] = int(counter["packets"])
    return DropCounts(counts["egress_drops"], counts["ingress_drops"])
