"""Link shaping without netem: rate with ``tc tbf``, random loss with an nftables rule.

Both act on one interface inside one namespace and both shape *egress* for rate; loss is
applied on the host side to packets leaving (output hook) and arriving (input hook) through the
host's WAN interface, so ``lo`` inside the host never loses anything.
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


def set_loss(ns: str, dev: str, loss_pct: float) -> None:
    """Drop ``loss_pct`` % of packets leaving and of packets arriving on ``dev`` in ``ns``.

    The table and its drop counters are created once; the rules are replaced atomically (one
    ``nft -f`` transaction), so changing the loss at run time never opens a window without it.
    """
    check_loss(loss_pct)
    threshold = round(loss_pct * _LOSS_SCALE / 100)
    lines = [
        f"table inet {_TABLE} {{",
        "  counter egress_drops { }",
        "  counter ingress_drops { }",
        "  chain egress { type filter hook output priority 0; policy accept; }",
        "  chain ingress { type filter hook input priority 0; policy accept; }",
        "}",
        f"flush chain inet {_TABLE} egress",
        f"flush chain inet {_TABLE} ingress",
    ]
    if threshold > 0:
        # numgen yields 0..SCALE-1, so "< SCALE" would not parse: 100 % is a plain drop.
        chance = (
            f"numgen random mod {_LOSS_SCALE} < {threshold} " if threshold < _LOSS_SCALE else ""
        )
        for chain, match in (("egress", "oifname"), ("ingress", "iifname")):
            lines.append(
                f'add rule inet {_TABLE} {chain} {match} "{dev}" '
                f'{chance}counter name "{chain}_drops" drop'
            )
    run_cmd(in_ns(ns, ["nft", "-f", "-"]), input_text="\n".join(lines) + "\n")


@dataclass(frozen=True)
class DropCounts:
    """Packets dropped by the loss rule of one host since the network was built."""

    egress_packets: int
    ingress_packets: int

    @property
    def total(self) -> int:
        return self.egress_packets + self.ingress_packets


def drop_counts(ns: str) -> DropCounts:
    out = run_cmd(in_ns(ns, ["nft", "-j", "list", "counters", "table", "inet", _TABLE]))
    counts = {"egress_drops": 0, "ingress_drops": 0}
    for item in json.loads(out)["nftables"]:
        counter = item.get("counter")
        if counter is not None and counter["name"] in counts:
            counts[counter["name"]] = int(counter["packets"])
    return DropCounts(counts["egress_drops"], counts["ingress_drops"])
